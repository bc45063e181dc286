"""Per-example weights of 002 Eq. 8-9 and the oversampling baseline.

  R(θ) = α E_real[w1(y, a) L] + (1 - α) E_synth[w2(y, a) L]

- w1(y, a) = (p_f(a|y) / p_train(a|y))^l with p_f(a|y) uniform over the
  property's known values and p_train estimated by counting the labelled
  training data; l = 0 gives 1 everywhere. Unknown properties (-1) get 1.
- w2(y, a) = 0 for synthetic examples of the dominant classes (the k most
  frequent in the labelled training data), else 1.
- y is the label's class for softmax (argmax of the soft label) and binary
  heads, and the set of positive findings for multi-label heads.
"""
from __future__ import annotations

import numpy as np

from synth_med.errors import SynthMedError


def label_keys(labels: np.ndarray, label_kind: str) -> np.ndarray:
  """An integer key per example naming its label 'y' (see the module docstring)."""
  labels = np.asarray(labels, np.float32)
  if label_kind == "softmax":
    return np.argmax(labels, axis=-1).astype(np.int64)
  bits = (labels > 0.5).astype(np.int64).reshape(len(labels), -1)
  return (bits * (1 << np.arange(bits.shape[1], dtype=np.int64))).sum(-1)


def equality_weights(keys: np.ndarray, attrs: np.ndarray, level: float) -> np.ndarray:
  """w1 per real training example: (p_f(a|y) / p_train(a|y))^level."""
  if level < 0:
    raise SynthMedError(f"the equality level l must be >= 0, got {level}.")
  keys, attrs = np.asarray(keys), np.asarray(attrs)
  w = np.ones(len(keys), np.float32)
  known = attrs >= 0
  if level == 0 or not known.any():
    return w
  num_values = len(np.unique(attrs[known]))
  for k in np.unique(keys[known]):
    in_y = known & (keys == k)
    n_y = in_y.sum()
    for a in np.unique(attrs[in_y]):
      p_train = np.sum(in_y & (attrs == a)) / n_y
      w[in_y & (attrs == a)] = ((1.0 / num_values) / p_train) ** level
  return w


def dominant_classes(labels: np.ndarray, k: int) -> tuple[int, ...]:
  """The k most frequent classes (by argmax of the label) of the labelled training data."""
  if k <= 0:
    return ()
  counts = np.bincount(np.argmax(np.asarray(labels), -1), minlength=np.asarray(labels).shape[-1])
  order = np.argsort(-counts, kind="stable")
  return tuple(int(c) for c in order[:k] if counts[c] > 0)


def filter_weights(keys: np.ndarray, dominant: tuple[int, ...]) -> np.ndarray:
  """w2 per synthetic example: 0 for the dominant classes, else 1."""
  return np.where(np.isin(np.asarray(keys), np.asarray(dominant, np.int64)), 0.0, 1.0).astype(np.float32)


def oversample_rows(attrs: np.ndarray, seed: int) -> np.ndarray:
  """Row indices that make the property's known values equally frequent (002 E.2 'resampling').

  Each value's rows are repeated (whole copies, then a random remainder) up to the
  largest value's count; rows with an unknown value (-1) are kept once.
  """
  attrs = np.asarray(attrs)
  rng = np.random.default_rng(seed)
  known = [v for v in np.unique(attrs) if v >= 0]
  if not known:
    return np.arange(len(attrs))
  target = max(int(np.sum(attrs == v)) for v in known)
  parts = [np.flatnonzero(attrs < 0)]
  for v in known:
    idx = np.flatnonzero(attrs == v)
    whole, rest = divmod(target, len(idx))
    parts.append(np.concatenate([np.tile(idx, whole), rng.choice(idx, rest, replace=False)]))
  return np.sort(np.concatenate(parts))
