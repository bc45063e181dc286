"""Soft labels from several raters (002 §3.3).

Each rater gives a list of conditions with confidences. Within a rater the
conditions are ranked by confidence and weighted 1/rank; the weights are summed
over raters and normalised. Confidence only sets the order.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def aggregate_rater_lists(ratings: Sequence[Mapping[int, float]], num_classes: int) -> np.ndarray:
  """Soft label float32[num_classes] from per-rater {class: confidence} dicts.

  Ties in confidence keep the rater's listed order. Raters with no conditions
  are ignored; if nobody rated, the result is all zeros.
  """
  out = np.zeros(num_classes, np.float64)
  for rating in ratings:
    order = sorted(rating.items(), key=lambda kv: -kv[1])
    for rank, (cls, _) in enumerate(order, start=1):
      out[cls] += 1.0 / rank
  total = out.sum()
  return (out / total if total > 0 else out).astype(np.float32)


def aggregate_ranked(classes: np.ndarray, num_classes: int) -> np.ndarray:
  """Vectorised form: classes int[B, R, L] already ordered by confidence.

  Entry [b, r, l] is rater r's (l+1)-th choice for example b, or -1 for none.
  Returns float32[B, num_classes], rows summing to 1 (or 0 if nobody rated).
  """
  b, r, l = classes.shape
  weights = np.broadcast_to(1.0 / np.arange(1, l + 1, dtype=np.float64), (b, r, l))
  valid = classes >= 0
  out = np.zeros((b, num_classes), np.float64)
  rows = np.broadcast_to(np.arange(b)[:, None, None], (b, r, l))
  np.add.at(out, (rows[valid], classes[valid]), weights[valid])
  total = out.sum(axis=1, keepdims=True)
  return np.where(total > 0, out / np.maximum(total, 1e-12), 0.0).astype(np.float32)
