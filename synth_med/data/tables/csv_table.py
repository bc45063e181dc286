"""Bring your own data: one CSV whose columns the config names (`data.source='csv'`).

    data.csv                  the CSV; image paths are relative to its folder, or absolute
    data.channels             1 (greyscale) or 3 (RGB); any format PIL reads is converted
    data.columns.image        the image path column
    data.columns.label        the label column (class / pipe / soft forms)
    data.columns.label_format class    one column of class names or ints
                              findings one 1 / 0 / -1 / blank column per finding, listed in
                                       data.columns.findings; uncertain values follow data.label_policy
                              pipe     one column of 'A|B' findings (multi-label)
                              soft     one column of JSON {"class": weight}
    data.columns.attributes   comma list of sensitive-attribute columns (categorical)
    data.columns.buckets      continuous attributes: 'age=0|40|65|120' (';' between columns) gives
                              the buckets (0,40], (40,65], (65,120]
    data.columns.domain       site / hospital column; data.id_domains and data.ood_domains name its
                              values ('' or empty tuples: one domain 'all', everything ID)
    data.columns.split        train / val / test per row (also valid, validation, validate); with train and
                              test only, data.val_fraction of the train patients become validation; or
                              leave it '' for a seeded split by data.columns.patient (no patient crosses
                              splits)
    data.columns.labelled     optional 0/1 column; rows without a label are unlabelled anyway
    data.columns.report       optional free-text report column (paper 003; read with data.report_length > 0)

Rows without a label train only the generator. Vocabularies are built from the
data in a fixed order (sorted) and saved as `vocabulary.json` in each stage's
workdir, so evaluation names groups as the CSV wrote them (`tone=dark`).
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from synth_med.data.schema import AttributeSpec
from synth_med.data.tables.table import ImageTable, codes, patient_split, read_csv
from synth_med.errors import SynthMedError

LABEL_FORMATS = ("class", "findings", "pipe", "soft")
_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "validate": "val", "test": "test", "testing": "test"}
NO_FINDING = ("", "no finding", "none", "normal")


def _blank(v: Any) -> bool:
  return v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == ""


def _list(text: Any) -> list[str]:
  return [s.strip() for s in str(text or "").split(",") if s.strip()]


def _vocabulary(values) -> tuple[str, ...]:
  """Sorted distinct non-blank values; ints sort numerically ('2' before '10')."""
  uniq = {str(v).strip() for v in values if not _blank(v)}
  try:
    return tuple(sorted(uniq, key=lambda s: float(s)))
  except ValueError:
    return tuple(sorted(uniq))


def parse_buckets(text: str) -> dict[str, list[float]]:
  """'age=0|40|65|120;bmi=0|25|100' -> {'age': [0, 40, 65, 120], ...} (increasing edges)."""
  out = {}
  for part in (p.strip() for p in str(text or "").split(";")):
    if not part:
      continue
    if "=" not in part:
      raise SynthMedError(f"data.columns.buckets part {part!r}: write column=edge|edge|..., e.g. 'age=0|40|65|120'.")
    col, edges = part.split("=", 1)
    try:
      e = [float(x) for x in edges.split("|") if x.strip()]
    except ValueError as err:
      raise SynthMedError(f"data.columns.buckets {part!r}: edges must be numbers.") from err
    if len(e) < 2 or any(b <= a for a, b in zip(e, e[1:])):
      raise SynthMedError(f"data.columns.buckets {part!r}: give at least two increasing edges.")
    out[col.strip()] = e
  return out


def _labels(df, cols: Any, policy_note: str) -> tuple[tuple[str, ...], str, np.ndarray, np.ndarray | None]:
  """(class names, label kind, label float32[N, K], raw_label int8[N, K] or None)."""
  fmt = str(cols.label_format)
  if fmt not in LABEL_FORMATS:
    raise SynthMedError(f"data.columns.label_format={fmt!r}; choose one of {list(LABEL_FORMATS)}.")
  if fmt == "findings":
    names = tuple(_list(cols.findings))
    if not names:
      raise SynthMedError("label_format 'findings' needs data.columns.findings, a comma list of the 0/1/-1 columns.")
    raw = np.zeros((len(df), len(names)), np.int8)
    blank_row = np.ones(len(df), bool)
    for k, c in enumerate(names):
      v = df[c].apply(lambda x: np.nan if _blank(x) else float(x)).to_numpy(np.float64)
      bad = ~np.isnan(v) & ~np.isin(v, (-1.0, 0.0, 1.0))
      if bad.any():
        raise SynthMedError(f"finding column {c!r} has values {sorted(set(v[bad].tolist()))[:5]}; use 1, 0, -1 "
                            f"(uncertain; {policy_note}) or blank.")
      blank_row &= np.isnan(v)
      raw[:, k] = np.where(np.isnan(v), 0, v).astype(np.int8)
    label = (raw == 1).astype(np.float32)
    return names, "multilabel", np.where(blank_row[:, None], 0.0, label), np.where(blank_row[:, None], 0, raw)
  values = df[str(cols.label)].tolist()
  if fmt == "class":
    names = _vocabulary(values)
    idx = codes(values, names)
    label = np.zeros((len(df), len(names)), np.float32)
    label[np.nonzero(idx >= 0)[0], idx[idx >= 0]] = 1.0
    return names, "softmax", label, None
  if fmt == "pipe":
    lists = [None if _blank(v) else [s.strip() for s in str(v).split("|")] for v in values]
    names = _vocabulary([s for fs in lists if fs for s in fs if s.lower() not in NO_FINDING])
    index = {n: i for i, n in enumerate(names)}
    label = np.zeros((len(df), len(names)), np.float32)
    for r, fs in enumerate(lists):
      for s in fs or ():
        if s in index:
          label[r, index[s]] = 1.0
    return names, "multilabel", label, None
  dicts = []
  for v in values:
    if _blank(v):
      dicts.append({})
      continue
    try:
      d = json.loads(str(v))
    except json.JSONDecodeError as e:
      raise SynthMedError(f"soft label {str(v)[:80]!r} is not JSON like {{\"eczema\": 0.7, \"psoriasis\": 0.3}}.") from e
    dicts.append({str(k): float(w) for k, w in d.items()})
  names = _vocabulary([k for d in dicts for k in d])
  index = {n: i for i, n in enumerate(names)}
  label = np.zeros((len(df), len(names)), np.float64)
  for r, d in enumerate(dicts):
    for k, w in d.items():
      label[r, index[k]] += w
  s = label.sum(1, keepdims=True)
  return names, "softmax", np.where(s > 0, label / np.maximum(s, 1e-12), 0.0).astype(np.float32), None


def load_csv(cfg: Any) -> ImageTable:
  """The `ImageTable` of a user's CSV (see the module docstring for the config keys)."""
  path = os.path.expanduser(str(cfg.get("csv", "") or ""))
  if not path:
    raise SynthMedError("data.source='csv' needs --config.data.csv=/path/to/metadata.csv.")
  cols = cfg.columns
  attr_cols = _list(cols.attributes)
  buckets = parse_buckets(cols.get("buckets", ""))
  fmt = str(cols.label_format)
  needed = [str(cols.image)] + ([str(cols.label)] if fmt != "findings" else _list(cols.findings))
  needed += attr_cols + [c for c in buckets if c not in attr_cols]
  needed += [str(cols[k]) for k in ("domain", "split", "patient", "labelled", "report") if str(cols.get(k, "") or "")]
  df = read_csv(path, needed, "data.csv", dtype=str, keep_default_na=True)
  if len(df) == 0:
    raise SynthMedError(f"data.csv {path!r} has no rows.")
  names, kind, label, raw = _labels(df, cols, f"data.label_policy={cfg.get('label_policy', 'drop_uncertain')!r}")
  if fmt in ("class", "soft"):
    labelled = label.sum(1) > 0
  else:
    label_cols = [str(cols.label)] if fmt == "pipe" else _list(cols.findings)
    labelled = ~df[label_cols].apply(lambda c: c.map(_blank)).all(axis=1).to_numpy()
  if str(cols.get("labelled", "") or ""):
    flag = df[str(cols.labelled)].astype(str).str.strip().str.lower().isin(["1", "true", "yes", "y"])
    labelled &= flag.to_numpy()
  if not labelled.any():
    raise SynthMedError(f"data.csv {path!r}: no row has a label in {needed[1]!r} (format {fmt!r}); at least the "
                        "training rows need one.")
  attributes, attrs = [], {}
  for c in attr_cols + [c for c in buckets if c not in attr_cols]:
    if c in buckets:
      import pandas as pd
      e = buckets[c]
      v = pd.to_numeric(df[c], errors="coerce").to_numpy(np.float64)
      idx = np.searchsorted(np.asarray(e), v, side="left") - 1
      bad = ~np.isfinite(v) | (v <= e[0]) | (v > e[-1])
      vocab = tuple(f"({_num(a)},{_num(b)}]" for a, b in zip(e[:-1], e[1:]))
      code = np.where(bad, -1, idx).astype(np.int32)
    else:
      vocab = _vocabulary(df[c].tolist())
      code = codes(df[c].tolist(), vocab)
    present = np.unique(code[code >= 0])
    if len(present) < 2:
      raise SynthMedError(f"attribute column {c!r} has {len(present)} distinct value(s) "
                          f"({[vocab[i] for i in present]}); a fairness attribute needs at least two groups.")
    attributes.append(AttributeSpec(c, vocab))
    attrs[c] = code
  domain_col = str(cols.get("domain", "") or "")
  if domain_col:
    domains = _vocabulary(df[domain_col].tolist())
    domain = codes(df[domain_col].tolist(), domains)
    if (domain < 0).any():
      raise SynthMedError(f"domain column {domain_col!r} is blank in {int((domain < 0).sum())} row(s); fill it in.")
  else:
    domains, domain = ("all",), np.zeros(len(df), np.int32)
  patient_col = str(cols.get("patient", "") or "")
  patient = df[patient_col].astype(str).to_numpy() if patient_col else np.arange(len(df)).astype(str)
  split_col = str(cols.get("split", "") or "")
  if split_col:
    split = df[split_col].astype(str).str.strip().str.lower().map(_SPLIT_NAMES)
    if split.isna().any():
      raise SynthMedError(f"split column {split_col!r} has values {sorted(set(df[split_col][split.isna()]))[:5]}; "
                          f"use {sorted(set(_SPLIT_NAMES))}.")
    split = split.to_numpy().astype(str)
    if not (split == "val").any():  # most data sets ship train / test only: validation patients from train
      train = split == "train"
      split[train] = patient_split(patient[train], {"train": 1.0 - float(cfg.val_fraction),
                                                    "val": float(cfg.val_fraction)}, int(cfg.seed))
    if patient_col:
      per = {}
      for p, s in zip(patient, split):
        per.setdefault(p, set()).add(s)
      crossing = [p for p, ss in per.items() if len(ss) > 1]
      if crossing:
        raise SynthMedError(f"{len(crossing)} patient(s) appear in more than one split, e.g. {crossing[:3]} "
                            f"(column {patient_col!r}); keep each patient's images in one split, or leave "
                            "data.columns.split empty for a seeded patient-level split.")
  else:
    v, t = float(cfg.val_fraction), float(cfg.id_test_fraction)
    split = patient_split(patient, {"train": 1.0 - v - t, "val": v, "test": t}, int(cfg.seed))
  channels = int(cfg.get("channels", 3))
  if channels not in (1, 3):
    raise SynthMedError(f"data.channels={channels}; use 1 (greyscale) or 3 (RGB).")
  name = os.path.splitext(os.path.basename(path))[0]
  return ImageTable(
      name=f"csv-{name}", root=os.path.dirname(os.path.abspath(path)),
      paths=df[str(cols.image)].astype(str).to_numpy(), class_names=names, label_kind=kind,
      label=label, label_mask=np.ones_like(label), labelled=labelled, attributes=tuple(attributes), attrs=attrs,
      domains=domains, domain=domain, split=split, patient=patient, channels=channels, raw_label=raw,
      reports=(df[str(cols.report)].fillna("").astype(str).to_numpy() if str(cols.get("report", "") or "") else None))


def _num(x: float) -> str:
  return str(int(x)) if float(x).is_integer() else f"{x:g}"
