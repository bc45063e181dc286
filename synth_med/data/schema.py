"""The one example schema shared by procedural worlds and real loaders.

Every source yields (batches of) dicts with these keys, so everything downstream
is source-blind:

| key          | shape / dtype        | meaning                                         |
|--------------|----------------------|-------------------------------------------------|
| image        | uint8[H, W, C]       | the image                                       |
| label        | float32[K]           | one-hot, multi-hot or soft label                |
| label_mask   | float32[K]           | 0 where uncertain or unknown                    |
| labelled     | bool                 | False: the label part of the condition is null  |
| attrs/<name> | int32 (-1 = unknown) | sensitive attributes (sex, age_bucket, ...)     |
| domain       | int32                | which domain the example comes from             |
| index        | int64                | stable per-example id                           |
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

UNKNOWN = -1

# 002 App. A age buckets: (15,25], (25,35], ..., (75,90].
AGE_BUCKET_EDGES = (15, 25, 35, 45, 55, 65, 75, 90)
AGE_BUCKET_NAMES = tuple(f"({a},{b}]" for a, b in zip(AGE_BUCKET_EDGES[:-1], AGE_BUCKET_EDGES[1:]))


AGE_DECADE_NAMES = tuple(f"{d}0s" for d in range(1, 10))  # paper 000 conditions on the age decade
RACE_NAMES = ("White", "Black", "Asian", "American Indian", "Pacific Islander")  # paper 000's five groups


def age_to_decade(age: np.ndarray) -> np.ndarray:
  """Ages in years to decades 10s..90s (codes 0..8); outside [10, 100) or NaN gives -1."""
  age = np.asarray(age, np.float64)
  ok = np.isfinite(age) & (age >= 10) & (age < 100)
  return np.where(ok, np.floor(np.where(ok, age, 10) / 10) - 1, UNKNOWN).astype(np.int32)


def age_to_bucket(age: np.ndarray) -> np.ndarray:
  """Maps ages in years to 002's 7 buckets; outside (15, 90] or NaN gives -1."""
  age = np.asarray(age, np.float64)
  edges = np.asarray(AGE_BUCKET_EDGES, np.float64)
  idx = np.searchsorted(edges, age, side="left") - 1
  bad = ~np.isfinite(age) | (age <= edges[0]) | (age > edges[-1])
  return np.where(bad, UNKNOWN, idx).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class AttributeSpec:
  """A sensitive attribute: its name and the names of its values (index = code)."""
  name: str
  values: tuple[str, ...]

  def value_name(self, code: int) -> str:
    return "unknown" if code < 0 else self.values[code]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a source provides: classes, label kind, attributes and domains."""
  name: str
  class_names: tuple[str, ...]
  label_kind: str  # 'softmax' (one-hot or soft), 'multilabel' or 'binary'
  attributes: tuple[AttributeSpec, ...]
  domains: tuple[str, ...]
  channels: int
  high_risk: tuple[str, ...] = ()

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def attribute(self, name: str) -> AttributeSpec:
    for a in self.attributes:
      if a.name == name:
        return a
    raise KeyError(f"attribute {name!r} not in {[a.name for a in self.attributes]}")

  def domain_id(self, name: str) -> int:
    return self.domains.index(name)


Batch = Mapping[str, np.ndarray]


def concat_batches(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Concatenates a list of example batches along the leading axis."""
  keys = batches[0].keys()
  return {k: np.concatenate([b[k] for b in batches], axis=0) for k in keys}


def take(batch: Mapping[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
  """Selects rows `idx` of every array of a batch."""
  return {k: np.asarray(v)[idx] for k, v in batch.items()}
