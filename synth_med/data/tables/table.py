"""A data set held as files on disk, as one table: the common form of every real-data loader.

Each loader (CheXpert, ChestX-ray14, CAMELYON17-WILDS, the generic CSV source,
...) reads its data set's own files and returns an `ImageTable`: one row per
image with its path, label, label mask, attributes, domain, split and patient.
`TableWorld` (table_world.py) then serves it to every stage exactly as the
procedural worlds are served, so fair sampling, mixing, evaluation and the
report work unchanged.
"""
from __future__ import annotations

import dataclasses
import os
import hashlib
from typing import Mapping, Sequence

import numpy as np

from synth_med.data.schema import (AGE_BUCKET_NAMES, AGE_DECADE_NAMES, RACE_NAMES, UNKNOWN, AttributeSpec, DatasetSpec,
                                   age_to_bucket, age_to_decade)
from synth_med.errors import SynthMedError

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class ImageTable:
  """One row per image. Arrays are aligned; `split` holds 'train', 'val' or 'test' per row.

  - `raw_label`: int8[N, K] of 1 / 0 / -1 (uncertain) for multi-label data (the label
    policy turns it into label + mask later), or None for softmax/binary data, which
    give `label` and `label_mask` directly.
  - `labelled`: False rows train only the generator (null label part).
  - `attrs`: name -> int32 codes (-1 unknown), with `attributes` naming the codes.
  - `domain`: int32 codes into `domains` (hospital, centre, site or one 'all').
  - `reports`: the report text per row, or None when the data set has none.
  """
  name: str
  root: str
  paths: np.ndarray
  class_names: tuple[str, ...]
  label_kind: str
  label: np.ndarray
  label_mask: np.ndarray
  labelled: np.ndarray
  attributes: tuple[AttributeSpec, ...]
  attrs: Mapping[str, np.ndarray]
  domains: tuple[str, ...]
  domain: np.ndarray
  split: np.ndarray
  patient: np.ndarray
  channels: int
  raw_label: np.ndarray | None = None
  high_risk: tuple[str, ...] = ()
  reports: np.ndarray | None = None  # str per row ('' where missing): the radiology report (paper 003)

  def __post_init__(self):
    n = len(self.paths)
    for name in ("label", "label_mask", "labelled", "domain", "split", "patient"):
      if len(getattr(self, name)) != n:
        raise SynthMedError(f"{self.name}: column {name!r} has {len(getattr(self, name))} rows, paths have {n}.")
    bad = sorted(set(np.unique(self.split)) - set(SPLITS))
    if bad:
      raise SynthMedError(f"{self.name}: split values {bad} are not among {list(SPLITS)}.")

  def __len__(self) -> int:
    return len(self.paths)

  @property
  def spec(self) -> DatasetSpec:
    return DatasetSpec(name=self.name, class_names=self.class_names, label_kind=self.label_kind,
                       attributes=self.attributes, domains=self.domains, channels=self.channels,
                       high_risk=self.high_risk)

  def select(self, rows: np.ndarray) -> "ImageTable":
    """The table restricted to `rows` (indices or a bool mask)."""
    rows = np.nonzero(rows)[0] if np.asarray(rows).dtype == bool else np.asarray(rows)
    return dataclasses.replace(
        self, paths=self.paths[rows], label=self.label[rows], label_mask=self.label_mask[rows],
        labelled=self.labelled[rows], attrs={k: v[rows] for k, v in self.attrs.items()},
        domain=self.domain[rows], split=self.split[rows], patient=self.patient[rows],
        raw_label=None if self.raw_label is None else self.raw_label[rows])

  def vocabulary(self) -> dict:
    """What the codes mean, as written in the data: classes, attribute values and domains."""
    return {"source": self.name, "classes": list(self.class_names), "label_kind": self.label_kind,
            "attributes": {a.name: list(a.values) for a in self.attributes}, "domains": list(self.domains)}

  def full_path(self, i: int) -> str:
    p = str(self.paths[i])
    return p if os.path.isabs(p) else os.path.join(self.root, p)


def require_folder(path: str, what: str, key: str = "data.manual_dir") -> str:
  """The folder, or a clear error naming the path and the config key to fix."""
  if not path:
    raise SynthMedError(f"{what}: {key} is not set; point it at your local copy, e.g. --config.{key}=/data/...")
  path = os.path.expanduser(str(path))
  if not os.path.isdir(path):
    raise SynthMedError(f"{what}: folder {path!r} does not exist; set --config.{key} to the folder "
                        "that holds the data set (see docs/data.md for the layout).")
  return path


def find_file(root: str, candidates: Sequence[str], what: str) -> str:
  """The first of `candidates` (relative to root) that exists, or an error listing them all."""
  for c in candidates:
    p = os.path.join(root, c)
    if os.path.exists(p):
      return p
  raise SynthMedError(f"{what}: none of {list(candidates)} exists under {root!r}; is data.manual_dir the "
                      "folder the data set unpacks to?")


def read_csv(path: str, required: Sequence[str], what: str, **kwargs):
  """pandas.read_csv with a clear error for a missing file or missing columns (listing those present)."""
  import pandas as pd
  if not os.path.exists(path):
    raise SynthMedError(f"{what}: CSV {path!r} does not exist.")
  try:
    df = pd.read_csv(path, **kwargs)
  except Exception as e:  # noqa: BLE001 - pandas raises many kinds
    raise SynthMedError(f"{what}: cannot read CSV {path!r}: {e}") from e
  missing = [c for c in required if c not in df.columns]
  if missing:
    raise SynthMedError(f"{what}: CSV {path!r} has no column(s) {missing}; its columns are {list(df.columns)}.")
  return df


def codes(values: Sequence, vocabulary: Sequence[str], mapping: Mapping[str, str] | None = None) -> np.ndarray:
  """Strings -> int32 codes into `vocabulary` (after `mapping`); anything else -> -1 (unknown)."""
  index = {v: i for i, v in enumerate(vocabulary)}
  out = np.full(len(values), UNKNOWN, np.int32)
  for i, v in enumerate(values):
    if v is None or (isinstance(v, float) and np.isnan(v)):
      continue
    key = str(v).strip()
    key = mapping.get(key, key) if mapping else key
    out[i] = index.get(key, UNKNOWN)
  return out


def sex_attribute(values: Sequence) -> tuple[AttributeSpec, np.ndarray]:
  """('female', 'male') codes from the many spellings data sets use (F/M, Female/Male, f/m)."""
  m = {"f": "female", "female": "female", "m": "male", "male": "male", "woman": "female", "man": "male"}
  return AttributeSpec("sex", ("female", "male")), codes([str(v).strip().lower() if isinstance(v, str) else v
                                                           for v in values], ("female", "male"), m)


def age_attribute(ages: Sequence) -> tuple[AttributeSpec, np.ndarray]:
  """002 App. A age buckets from ages in years (non-numbers and out-of-range ages are unknown)."""
  import pandas as pd
  a = pd.to_numeric(pd.Series(list(ages)), errors="coerce").to_numpy(np.float64)
  return AttributeSpec("age_bucket", AGE_BUCKET_NAMES), age_to_bucket(a)


def age_decade_attribute(ages: Sequence) -> tuple[AttributeSpec, np.ndarray]:
  """Paper 000's age decades (10s..90s) from ages in years (non-numbers and out-of-range ages are unknown)."""
  import pandas as pd
  a = pd.to_numeric(pd.Series(list(ages)), errors="coerce").to_numpy(np.float64)
  return AttributeSpec("age_decade", AGE_DECADE_NAMES), age_to_decade(a)


# Paper 000's five groups from the spellings MIMIC-IV and CheXpert's demographics use (checked in order).
_RACE_WORDS = (("pacific", "Pacific Islander"), ("hawaiian", "Pacific Islander"), ("american indian", "American Indian"),
               ("alaska", "American Indian"), ("native american", "American Indian"), ("black", "Black"),
               ("african", "Black"), ("asian", "Asian"), ("white", "White"))


def race_attribute(values: Sequence) -> tuple[AttributeSpec, np.ndarray]:
  """Race as paper 000's five groups (White, Black, Asian, American Indian, Pacific Islander), whatever the
  ethnicity written next to it ('Asian, non-Hispanic' is Asian); anything else (other, Hispanic/Latino
  alone, unknown, declined, blank) is -1."""
  out = np.full(len(values), -1, np.int32)
  for i, v in enumerate(values):
    text = "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip().lower()
    group = next((g for word, g in _RACE_WORDS if word in text), None)
    if group is not None:
      out[i] = RACE_NAMES.index(group)
  return AttributeSpec("race", RACE_NAMES), out


def patient_split(patients: np.ndarray, fractions: Mapping[str, float], seed: int) -> np.ndarray:
  """A split name per row, drawn per patient (hash of seed and patient id), so no patient crosses splits."""
  names = list(fractions)
  p = np.asarray([float(fractions[k]) for k in names], np.float64)
  if (p < 0).any() or p.sum() <= 0:
    raise SynthMedError(f"split fractions {dict(fractions)} must be >= 0 with a positive sum.")
  edges = np.cumsum(p / p.sum())
  uniq, inverse = np.unique(np.asarray(patients).astype(str), return_inverse=True)
  # blake2b, not crc32: crc32 is linear, so ids differing in one digit land in correlated places.
  u = np.asarray([int.from_bytes(hashlib.blake2b(f"{seed}:{pid}".encode(), digest_size=8).digest(), "big") / 2**64
                  for pid in uniq])
  which = np.minimum(np.searchsorted(edges, u, side="right"), len(names) - 1)
  return np.asarray(names, dtype=object)[which][inverse].astype(str)
