"""Classification metrics over a whole split (scikit-learn where it has them).

Every function takes `rows` (indices into the split's arrays) so the same code
serves the whole split, a subgroup and a bootstrap resample. A metric that is
undefined on the rows (e.g. ROC-AUC with a single class present, or no
high-risk cases) returns None, never 0.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
from sklearn import metrics as skm

Metric = Callable[[np.ndarray], "float | None"]


@dataclasses.dataclass(frozen=True)
class Predictions:
  """A split's labels and model outputs, host-side numpy."""
  label: np.ndarray  # float[N, K]: one-hot / soft / multi-hot
  label_mask: np.ndarray  # float[N, K]
  probs: np.ndarray  # float[N, K] (softmax) or float[N, K] sigmoid (multilabel) or [N, 1] (binary)
  attrs: dict[str, np.ndarray]  # name -> int[N], -1 unknown

  @property
  def true_class(self) -> np.ndarray:
    """argmax of the (soft) label: 002's reference class for derm."""
    return np.argmax(self.label, axis=1)


def topk_hits(p: Predictions, k: int) -> np.ndarray:
  """bool[N]: the true class is among the k most probable classes."""
  k = min(k, p.probs.shape[1])
  topk = np.argsort(-p.probs, axis=1, kind="stable")[:, :k]
  return (topk == p.true_class[:, None]).any(axis=1)


def topk_accuracy(p: Predictions, k: int) -> Metric:
  num = p.probs.shape[1]

  def fn(rows):
    if len(rows) == 0:
      return None
    if k >= num:
      return 1.0
    return float(skm.top_k_accuracy_score(p.true_class[rows], p.probs[rows], k=k, labels=np.arange(num)))
  return fn


def balanced_topk(p: Predictions, k: int) -> Metric:
  """Mean over the classes present of the per-class top-k recall (k=1: balanced accuracy)."""
  hits = topk_hits(p, k)

  def fn(rows):
    if len(rows) == 0:
      return None
    y = p.true_class[rows]
    if k == 1:
      return float(skm.balanced_accuracy_score(y, np.argmax(p.probs[rows], axis=1)))
    return float(np.mean([hits[rows][y == c].mean() for c in np.unique(y)]))
  return fn


def high_risk_sensitivity(p: Predictions, classes: Sequence[int], k: int = 3) -> Metric:
  """Over examples whose true class is high-risk, the fraction with it in the top-k (pooled)."""
  hits = topk_hits(p, k)
  is_hr = np.isin(p.true_class, np.asarray(classes, int))

  def fn(rows):
    sel = rows[is_hr[rows]]
    return float(hits[sel].mean()) if len(sel) else None
  return fn


def auc(p: Predictions, column: int) -> Metric:
  """ROC-AUC of one output over rows whose label there is known (mask > 0)."""
  def fn(rows):
    m = p.label_mask[rows, column] > 0
    y = p.label[rows, column][m] > 0.5
    if len(y) == 0 or y.all() or not y.any():
      return None
    return float(skm.roc_auc_score(y, p.probs[rows, column][m]))
  return fn


def mean_auc(p: Predictions) -> Metric:
  """Mean of the defined per-finding AUCs (None if none is defined)."""
  per = [auc(p, c) for c in range(p.label.shape[1])]

  def fn(rows):
    vals = [v for v in (f(rows) for f in per) if v is not None]
    return float(np.mean(vals)) if vals else None
  return fn


def binary_accuracy(p: Predictions, threshold: float = 0.5) -> Metric:
  def fn(rows):
    if len(rows) == 0:
      return None
    return float(skm.accuracy_score(p.label[rows, 0] > 0.5, p.probs[rows, 0] > threshold))
  return fn


def metric_suite(p: Predictions, label_kind: str, class_names: Sequence[str],
                 high_risk: Sequence[str] = (), top_k: Sequence[int] = (1, 3)
                 ) -> tuple[dict[str, Metric], dict[str, Metric]]:
  """(overall-only metrics, metrics also reported per group) for a label kind."""
  overall: dict[str, Metric] = {}
  grouped: dict[str, Metric] = {}
  if label_kind == "softmax":
    for k in top_k:
      grouped[f"top{k}"] = topk_accuracy(p, k)
      overall[f"balanced_top{k}"] = balanced_topk(p, k)
    if high_risk:
      idx = [class_names.index(c) for c in high_risk]
      grouped["high_risk_sensitivity"] = high_risk_sensitivity(p, idx)
      for c, i in zip(high_risk, idx):
        overall[f"high_risk_sensitivity/{c}"] = high_risk_sensitivity(p, [i])
  elif label_kind == "multilabel":
    grouped["mean_auc"] = mean_auc(p)
    for i, c in enumerate(class_names):
      overall[f"auc/{c}"] = auc(p, i)
  elif label_kind == "binary":
    grouped["accuracy"] = binary_accuracy(p)
    grouped["auc"] = auc(p, 0)
  else:
    raise ValueError(f"unknown label kind {label_kind!r}")
  return overall, grouped
