"""Public dermatology data sets as distributed: SCIN, Fitzpatrick17k, DDI, HAM10000.

None has a hospital split, so each is one domain; the ID val/test splits are
seeded case- (or lesion-) level slices (`data.val_fraction`,
`data.id_test_fraction`). Skin tone is the attribute 002 studies; sex and age
buckets are given where the data set has them.
"""
from __future__ import annotations

import ast
import os
import re
from typing import Any

import numpy as np

from synth_med.data.schema import UNKNOWN, AttributeSpec
from synth_med.data.tables.table import (ImageTable, age_attribute, codes, find_file, patient_split, read_csv,
                                         require_folder, sex_attribute)
from synth_med.data.worlds.skin import SKIN_TONES
from synth_med.errors import SynthMedError

HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
HAM_HIGH_RISK = ("akiec", "bcc", "mel")
DDI_TONES = ("FST I-II", "FST III-IV", "FST V-VI")


def _splits(cases: np.ndarray, cfg: Any) -> np.ndarray:
  v, t = float(cfg.val_fraction), float(cfg.id_test_fraction)
  return patient_split(cases, {"train": 1.0 - v - t, "val": v, "test": t}, int(cfg.seed))


def _one_domain(name: str, n: int) -> dict[str, Any]:
  return {"domains": (name,), "domain": np.zeros(n, np.int32)}


def _onehot(idx: np.ndarray, k: int) -> np.ndarray:
  out = np.zeros((len(idx), k), np.float32)
  ok = idx >= 0
  out[np.nonzero(ok)[0], idx[ok]] = 1.0
  return out


def _fst(values) -> np.ndarray:
  """Fitzpatrick type I..VI from 1..6, 'FST3', 'III' or 3.0 -> codes 0..5 of SKIN_TONES (else -1)."""
  roman = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6}
  out = np.full(len(values), UNKNOWN, np.int32)
  for i, v in enumerate(values):
    s = str(v).strip().upper()
    m = re.search(r"(-?\d+)", s)
    k = int(m.group(1)) if m else roman.get(s.replace("FST", "").strip(), 0)
    if 1 <= k <= 6:
      out[i] = k - 1
  return out


def parse_soft_label(text: Any) -> dict[str, float]:
  """"{'Eczema': 0.69, 'Psoriasis': 0.08}" (or JSON) -> dict; blank or unparsable -> {}."""
  if not isinstance(text, str) or not text.strip():
    return {}
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return {}
  return {str(k): float(w) for k, w in value.items()} if isinstance(value, dict) else {}


def soft_label_matrix(dicts: list[dict[str, float]], num_classes: int) -> tuple[tuple[str, ...], np.ndarray]:
  """The `num_classes - 1` conditions with the most total weight, plus 'Other' for the rest (as 002's 26 + Other);
  rows are normalised to sum 1 (all-zero rows stay zero: no label)."""
  totals: dict[str, float] = {}
  for d in dicts:
    for k, w in d.items():
      totals[k] = totals.get(k, 0.0) + w
  top = [k for k, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))][:max(1, num_classes - 1)]
  names = tuple(top) + ("Other",)
  index = {k: i for i, k in enumerate(top)}
  out = np.zeros((len(dicts), len(names)), np.float64)
  for r, d in enumerate(dicts):
    for k, w in d.items():
      out[r, index.get(k, len(top))] += w
  s = out.sum(1, keepdims=True)
  return names, np.where(s > 0, out / np.maximum(s, 1e-12), 0.0).astype(np.float32)


def load_scin(cfg: Any) -> ImageTable:
  """SCIN (Google): scin_cases.csv (case_id, image_1..3_path, sex_at_birth, age_group, fitzpatrick_skin_type)
  + scin_labels.csv (case_id, weighted_skin_condition_label: the raters' aggregated soft label,
  dermatologist_fitzpatrick_skin_type_label_1). One row per image; a case without a condition label is
  unlabelled (it trains the generator). Skin tone: the first dermatologist's Fitzpatrick label, else
  the self-reported one. Age groups map to 002's buckets by their midpoint."""
  root = require_folder(cfg.manual_dir, "SCIN")
  cases = read_csv(find_file(root, ["scin_cases.csv", "dataset/scin_cases.csv"], "SCIN"),
                   ["case_id", "image_1_path", "sex_at_birth", "age_group", "fitzpatrick_skin_type"], "SCIN",
                   dtype={"case_id": str})
  labels = read_csv(find_file(root, ["scin_labels.csv", "dataset/scin_labels.csv"], "SCIN"),
                    ["case_id", "weighted_skin_condition_label"], "SCIN", dtype={"case_id": str})
  df = cases.merge(labels, on="case_id", how="left")
  rows = []
  for col in ("image_1_path", "image_2_path", "image_3_path"):
    if col in df.columns:
      part = df[df[col].notna() & (df[col].astype(str).str.strip() != "")].copy()
      part["_path"] = part[col].astype(str)
      rows.append(part)
  import pandas as pd
  df = pd.concat(rows, ignore_index=True)
  # Paths read 'dataset/images/<id>.png' (relative to the bucket root); accept a copy rooted at dataset/.
  first = str(df["_path"].iloc[0]) if len(df) else ""
  image_root = root if os.path.exists(os.path.join(root, first)) or not first.startswith("dataset/") else \
      os.path.dirname(os.path.normpath(root))
  soft = [parse_soft_label(t) for t in df["weighted_skin_condition_label"].tolist()]
  names, label = soft_label_matrix(soft, int(cfg.num_classes))
  labelled = label.sum(1) > 0
  tone_col = "dermatologist_fitzpatrick_skin_type_label_1"
  tone = _fst(df[tone_col].tolist()) if tone_col in df.columns else np.full(len(df), UNKNOWN, np.int32)
  tone = np.where(tone >= 0, tone, _fst(df["fitzpatrick_skin_type"].tolist()))
  ages = [np.mean([float(x) for x in re.findall(r"\d+", str(g))]) if re.findall(r"\d+", str(g)) else np.nan
          for g in df["age_group"]]
  sex_spec, sex = sex_attribute(df["sex_at_birth"].tolist())
  age_spec, age = age_attribute(ages)
  case = df["case_id"].astype(str).to_numpy()
  return ImageTable(
      name="scin", root=image_root, paths=df["_path"].to_numpy().astype(str), class_names=names,
      label_kind="softmax", label=label, label_mask=np.ones_like(label), labelled=labelled,
      attributes=(sex_spec, age_spec, AttributeSpec("skin_tone", SKIN_TONES)),
      attrs={"sex": sex, "age_bucket": age, "skin_tone": tone}, split=_splits(case, cfg), patient=case,
      channels=3, **_one_domain("scin", len(df)))


def load_fitzpatrick17k(cfg: Any) -> ImageTable:
  """Fitzpatrick17k: fitzpatrick17k.csv (md5hash, fitzpatrick_scale, label, nine_partition_label,
  three_partition_label); images as <md5hash>.jpg in images/ (or next to the CSV). The class column is
  `data.fitzpatrick_partition`: 'three' (default), 'nine' or 'label' (114 conditions)."""
  root = require_folder(cfg.manual_dir, "Fitzpatrick17k")
  col = {"three": "three_partition_label", "nine": "nine_partition_label",
         "label": "label"}.get(str(cfg.get("fitzpatrick_partition", "three")))
  if col is None:
    raise SynthMedError(f"data.fitzpatrick_partition={cfg.fitzpatrick_partition!r}; choose three, nine or label.")
  df = read_csv(find_file(root, ["fitzpatrick17k.csv"], "Fitzpatrick17k"), ["md5hash", "fitzpatrick_scale", col],
                "Fitzpatrick17k")
  img_dir = "images" if os.path.isdir(os.path.join(root, "images")) else ""
  paths = [os.path.join(img_dir, f"{h}.jpg") for h in df["md5hash"].astype(str)]
  names = tuple(sorted(df[col].dropna().astype(str).unique()))
  label = _onehot(codes(df[col].tolist(), names), len(names))
  md5 = df["md5hash"].astype(str).to_numpy()
  return ImageTable(
      name="fitzpatrick17k", root=root, paths=np.asarray(paths).astype(str), class_names=names,
      label_kind="softmax", label=label, label_mask=np.ones_like(label), labelled=label.sum(1) > 0,
      attributes=(AttributeSpec("skin_tone", SKIN_TONES),), attrs={"skin_tone": _fst(df["fitzpatrick_scale"].tolist())},
      split=_splits(md5, cfg), patient=md5, channels=3, high_risk=("malignant",) if "malignant" in names else (),
      **_one_domain("fitzpatrick17k", len(df)))


def load_ddi(cfg: Any) -> ImageTable:
  """Diverse Dermatology Images: ddi_metadata.csv (DDI_ID, DDI_file, skin_tone in 12 / 34 / 56, malignant,
  disease); images next to the CSV. Binary target: malignant."""
  root = require_folder(cfg.manual_dir, "DDI")
  path = find_file(root, ["ddi_metadata.csv"], "DDI")
  df = read_csv(path, ["DDI_file", "skin_tone", "malignant"], "DDI")
  mal = df["malignant"].astype(str).str.strip().str.lower().map({"true": 1.0, "false": 0.0, "1": 1.0, "0": 0.0})
  if mal.isna().any():
    raise SynthMedError(f"DDI: column 'malignant' must be True/False; found {sorted(set(df['malignant'][mal.isna()]))}.")
  tone = codes(df["skin_tone"].astype(str).str.strip().tolist(), DDI_TONES, {"12": DDI_TONES[0], "34": DDI_TONES[1],
                                                                             "56": DDI_TONES[2]})
  files = df["DDI_file"].astype(str).to_numpy()
  label = mal.to_numpy(np.float32)[:, None]
  return ImageTable(
      name="ddi", root=os.path.dirname(path), paths=files, class_names=("malignant",), label_kind="binary",
      label=label, label_mask=np.ones_like(label), labelled=np.ones(len(df), bool),
      attributes=(AttributeSpec("skin_tone", DDI_TONES),), attrs={"skin_tone": tone}, split=_splits(files, cfg),
      patient=files, channels=3, high_risk=("malignant",), **_one_domain("ddi", len(df)))


def load_ham10000(cfg: Any) -> ImageTable:
  """HAM10000: HAM10000_metadata.csv (lesion_id, image_id, dx, age, sex); images <image_id>.jpg in
  HAM10000_images_part_1/ and _part_2/ (or images/). Splits by lesion, so no lesion crosses splits."""
  root = require_folder(cfg.manual_dir, "HAM10000")
  df = read_csv(find_file(root, ["HAM10000_metadata.csv", "HAM10000_metadata"], "HAM10000"),
                ["lesion_id", "image_id", "dx", "age", "sex"], "HAM10000")
  where = {}
  for sub in ("HAM10000_images_part_1", "HAM10000_images_part_2", "HAM10000_images", "images", ""):
    folder = os.path.join(root, sub)
    if os.path.isdir(folder):
      for f in os.listdir(folder):
        where.setdefault(os.path.splitext(f)[0], os.path.join(sub, f))
  paths = [where.get(i, os.path.join("HAM10000_images_part_1", f"{i}.jpg")) for i in df["image_id"].astype(str)]
  label = _onehot(codes(df["dx"].tolist(), HAM_CLASSES), len(HAM_CLASSES))
  sex_spec, sex = sex_attribute(df["sex"].tolist())
  age_spec, age = age_attribute(df["age"].tolist())
  lesion = df["lesion_id"].astype(str).to_numpy()
  return ImageTable(
      name="ham10000", root=root, paths=np.asarray(paths).astype(str), class_names=HAM_CLASSES, label_kind="softmax",
      label=label, label_mask=np.ones_like(label), labelled=label.sum(1) > 0, attributes=(sex_spec, age_spec),
      attrs={"sex": sex, "age_bucket": age}, split=_splits(lesion, cfg), patient=lesion, channels=3,
      high_risk=HAM_HIGH_RISK, **_one_domain("ham10000", len(df)))
