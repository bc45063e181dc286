"""Group metrics beyond the headline gap, from saved per-example predictions: what users of fairness
benchmarks (MEDFAIR) expect, 002's Beta-posterior spread (F.2, Fig. G6) and its underserved
individuals (G.3.4, Fig. G9)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from fairlearn.metrics import MetricFrame, false_positive_rate, true_positive_rate

from synth_med.evaluation.metrics import Predictions, topk_hits


def worst_group(groups: Mapping[str, Any], metric: str) -> dict[str, Any]:
  """The lowest value of `metric` over the groups that are not small (an evaluator's `groups[attr]`)."""
  vals = {g: e[metric]["value"] for g, e in groups.items()
          if isinstance(e.get(metric), dict) and e[metric]["value"] is not None and not e["small"]}
  if not vals:
    return {"value": None, "group": None}
  g = min(vals, key=vals.get)
  return {"value": float(vals[g]), "group": g}


def youden_threshold(scores: np.ndarray, positive: np.ndarray) -> float:
  """The score threshold maximising TPR − FPR (Youden's J) on one output; 0.5 if one class is absent."""
  if positive.all() or not positive.any():
    return 0.5
  cands = np.unique(scores)
  tpr = np.array([(scores[positive] >= c).mean() for c in cands])
  fpr = np.array([(scores[~positive] >= c).mean() for c in cands])
  return float(cands[int(np.argmax(tpr - fpr))])


def decision_outputs(p: Predictions, label_kind: str) -> list[int]:
  """The outputs with a yes/no decision: the one of a binary task, each finding of a multi-label one."""
  return [0] if label_kind == "binary" else list(range(p.label.shape[1])) if label_kind == "multilabel" else []


def equalised_odds(val: Predictions, test: Predictions, label_kind: str, attr: str, min_group_size: int
                   ) -> dict[str, Any] | None:
  """Equal opportunity (TPR difference) and equalised odds (the larger of the TPR and FPR differences),
  best − worst group (fairlearn `MetricFrame.difference`), at each output's Youden threshold chosen on
  the validation split; averaged over outputs. None for single-label multi-class tasks."""
  outputs = decision_outputs(test, label_kind)
  codes = test.attrs.get(attr)
  if not outputs or codes is None:
    return None
  per_output = []
  for c in outputs:
    vm = val.label_mask[:, c] > 0
    thr = youden_threshold(val.probs[vm, c], val.label[vm, c] > 0.5)
    known = (test.label_mask[:, c] > 0) & (codes >= 0)
    y, s, g = test.label[known, c] > 0.5, test.probs[known, c] >= thr, codes[known]
    big = [v for v in np.unique(g) if (g == v).sum() >= min_group_size
           and 0 < y[g == v].sum() < (g == v).sum()]  # both classes present: TPR and FPR defined
    if len(big) < 2:
      continue
    keep = np.isin(g, big)
    mf = MetricFrame(metrics={"tpr": true_positive_rate, "fpr": false_positive_rate}, y_true=y[keep],
                     y_pred=s[keep], sensitive_features=g[keep])
    diff = mf.difference(method="between_groups")
    per_output.append({"threshold": thr, "equal_opportunity": float(diff["tpr"]),
                       "equalised_odds": float(max(diff["tpr"], diff["fpr"]))})
  if not per_output:
    return None
  return {"equal_opportunity": float(np.mean([o["equal_opportunity"] for o in per_output])),
          "equalised_odds": float(np.mean([o["equalised_odds"] for o in per_output])), "outputs": len(per_output)}


def calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float | None:
  """Expected calibration error: Σ_b (n_b / n) |accuracy_b − confidence_b| over equal-width bins."""
  if len(confidence) == 0:
    return None
  edges = np.linspace(0.0, 1.0, bins + 1)
  which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
  total = 0.0
  for b in range(bins):
    sel = which == b
    if sel.any():
      total += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
  return float(total)


def ece(p: Predictions, label_kind: str, rows: np.ndarray) -> float | None:
  """ECE on `rows`: of the top-1 confidence for a softmax head; of each output's probability (against
  its known label) for binary and multi-label heads, averaged over outputs."""
  if label_kind == "softmax":
    conf = p.probs[rows].max(1)
    return calibration_error(conf, (p.probs[rows].argmax(1) == p.true_class[rows]).astype(float))
  vals = []
  for c in range(p.probs.shape[1]):
    known = rows[p.label_mask[rows, c] > 0]
    v = calibration_error(p.probs[known, c], (p.label[known, c] > 0.5).astype(float))
    if v is not None:
      vals.append(v)
  return float(np.mean(vals)) if vals else None


def ece_by_group(p: Predictions, label_kind: str, attr: str, value_names: Sequence[str], min_group_size: int
                 ) -> dict[str, Any]:
  """ECE overall and per known group of `attr` (small groups flagged), and its best − worst gap."""
  codes = p.attrs[attr]
  out: dict[str, Any] = {"overall": ece(p, label_kind, np.arange(len(codes))), "groups": {}}
  for v in np.unique(codes[codes >= 0]):
    rows = np.nonzero(codes == v)[0]
    out["groups"][value_names[int(v)]] = {"value": ece(p, label_kind, rows), "small": bool(len(rows) < min_group_size)}
  vals = [e["value"] for e in out["groups"].values() if e["value"] is not None and not e["small"]]
  out["gap"] = float(max(vals) - min(vals)) if len(vals) >= 2 else None
  return out


def intersection(codes_a: np.ndarray, codes_b: np.ndarray, names_a: Sequence[str], names_b: Sequence[str]
                 ) -> tuple[np.ndarray, list[str]]:
  """(codes, names) of the intersectional attribute a × b; -1 where either is unknown."""
  codes = np.where((codes_a >= 0) & (codes_b >= 0), codes_a * len(names_b) + codes_b, -1)
  return codes, [f"{x}×{y}" for x in names_a for y in names_b]


def beta_spread(posterior: Mapping[str, Any]) -> float | None:
  """002 F.2 / Fig. G6: the spread of the group-vs-outgroup posterior differences, i.e. the standard
  deviation over groups of their posterior means (lower is fairer). None with fewer than 2 groups."""
  means = [e["mean"] for e in posterior.values()]
  return float(np.std(means)) if len(means) >= 2 else None


def missed(p: Predictions, label_kind: str, high_risk: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """(at_risk, missed) bool[N]: the examples that count, and whether this run got each one wrong.

  softmax: true class high-risk (every class without a high-risk list); missed = not in the top 3
  (top 1 with 3 or fewer classes). binary: positives; missed = p < 0.5. multi-label: examples with a
  known positive finding; missed = any of them scored below 0.5."""
  if label_kind == "softmax":
    at_risk = np.isin(p.true_class, np.asarray(high_risk, int)) if len(high_risk) else np.ones(len(p.label), bool)
    return at_risk, ~topk_hits(p, 3 if p.probs.shape[1] > 3 else 1)
  positive = (p.label > 0.5) & (p.label_mask > 0)
  at_risk = positive.any(1)
  return at_risk, (positive & (p.probs < 0.5)).any(1)


def underserved(runs: Sequence[Predictions], label_kind: str, high_risk: Sequence[int], attr: str,
                value_names: Sequence[str]) -> dict[str, Any]:
  """002 G.3.4: the at-risk examples that every run (seed) of a method gets wrong, overall and per group,
  and the mask of them (to compare methods on the same individuals)."""
  at_risk, _ = missed(runs[0], label_kind, high_risk)
  always = np.logical_and.reduce([missed(p, label_kind, high_risk)[1] for p in runs]) & at_risk
  out: dict[str, Any] = {"at_risk": int(at_risk.sum()), "always_missed": int(always.sum()), "groups": {}}
  codes = runs[0].attrs.get(attr)
  if codes is not None:
    for v in np.unique(codes[codes >= 0]):
      g = codes == v
      out["groups"][value_names[int(v)]] = {"at_risk": int((at_risk & g).sum()), "always_missed": int((always & g).sum())}
  out["mask"] = always
  return out
