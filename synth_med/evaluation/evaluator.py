"""Evaluators behind one small protocol: `run(predict) -> nested metrics dict`.

`ClassificationEvaluator` runs a classifier over one split (ID test, each OOD
split, validation) and reports overall metrics, per-group metrics with
bootstrap CIs and small-group flags, fairness gaps, and the Beta posterior of
group-vs-outgroup top-3 (002 App. F.2) for softmax heads.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

import numpy as np
from jax.experimental import multihost_utils

from synth_med.data.pipeline import Source, eval_batches
from synth_med.data.schema import DatasetSpec
from synth_med.evaluation import fairness
from synth_med.evaluation.metrics import Predictions, metric_suite, topk_hits

PredictFn = Callable[[Mapping[str, np.ndarray]], np.ndarray]


class Evaluator(Protocol):
  name: str

  def run(self, predict: PredictFn) -> dict[str, Any]:
    """Metrics for `predict` (a local batch dict -> global probabilities)."""


class ClassificationEvaluator:
  """Classifier metrics and fairness on one split."""

  def __init__(self, name: str, source: Source, spec: DatasetSpec, eval_config: Any, batch_size: int,
               attributes: tuple[str, ...] | None = None, fairness: bool = True):
    self.name, self.source, self.spec, self.cfg = name, source, spec, eval_config
    self.batch_size = batch_size
    self.attributes = attributes if attributes is not None else tuple(a.name for a in spec.attributes)
    self.fairness = fairness

  def predictions(self, predict: PredictFn) -> Predictions:
    probs, label, mask, attrs = [], [], [], {a: [] for a in self.attributes}
    for batch, valid in eval_batches(self.source, self.batch_size):
      p = np.asarray(predict(batch))
      keep = multihost_utils.process_allgather(valid, tiled=True)
      gathered = {k: multihost_utils.process_allgather(np.asarray(batch[k]), tiled=True)
                  for k in ["label", "label_mask"] + [f"attrs/{a}" for a in self.attributes]}
      probs.append(p[keep])
      label.append(gathered["label"][keep])
      mask.append(gathered["label_mask"][keep])
      for a in self.attributes:
        attrs[a].append(gathered[f"attrs/{a}"][keep])
    return Predictions(label=np.concatenate(label), label_mask=np.concatenate(mask),
                       probs=np.concatenate(probs), attrs={a: np.concatenate(v) for a, v in attrs.items()})

  def run(self, predict: PredictFn) -> dict[str, Any]:
    return self.score(self.predictions(predict))

  def score(self, p: Predictions) -> dict[str, Any]:
    """The nested metrics dict for given predictions (no model needed)."""
    cfg = self.cfg
    overall_only, grouped = metric_suite(p, self.spec.label_kind, self.spec.class_names,
                                         self.spec.high_risk, tuple(cfg.top_k))
    rows = np.arange(len(p.label))
    out: dict[str, Any] = {"n": int(len(rows)), "overall": {}}
    for name, fn in {**grouped, **overall_only}.items():
      out["overall"][name] = fn(rows)
    if not self.fairness:
      return out
    out["groups"], out["gaps"], out["beta_posterior"] = {}, {}, {}
    for a in self.attributes:
      spec = self.spec.attribute(a)
      groups = fairness.per_group(grouped, p.attrs[a], spec.values, int(cfg.min_group_size),
                                  int(cfg.bootstrap), int(cfg.seed))
      if not groups:
        continue  # e.g. skin tone is unknown out of distribution
      out["groups"][a] = groups
      out["gaps"][a] = fairness.gaps(grouped, p.attrs[a], spec.values, int(cfg.min_group_size))
      if self.spec.label_kind == "softmax" and int(cfg.beta_samples) > 0:
        out["beta_posterior"][a] = fairness.beta_posterior(
            topk_hits(p, 3), p.attrs[a], spec.values, int(cfg.beta_samples), int(cfg.seed))
    return out


def flatten_for_writer(split: str, result: Mapping[str, Any]) -> dict[str, float]:
  """Scalars named '{split}/{metric}', '{split}/{metric}/{attr}={value}', '{split}/gap/{metric}/{attr}'."""
  flat = {}
  for m, v in result.get("overall", {}).items():
    if v is not None:
      flat[f"{split}/{m}"] = float(v)
  for a, groups in result.get("groups", {}).items():
    for g, entry in groups.items():
      for m, v in entry.items():
        if isinstance(v, dict) and v.get("value") is not None:
          flat[f"{split}/{m}/{a}={g}"] = float(v["value"])
  for a, gaps in result.get("gaps", {}).items():
    for m, entry in gaps.items():
      if entry["gap"] is not None:
        flat[f"{split}/gap/{m}/{a}"] = float(entry["gap"])
  return flat
