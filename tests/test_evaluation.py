"""Metrics against hand-computed values; groups, gaps, CIs and the Beta posterior."""
import numpy as np
import pytest
from ml_collections import ConfigDict

from synth_med.data.schema import AttributeSpec, DatasetSpec
from synth_med.evaluation import fairness
from synth_med.evaluation.evaluator import ClassificationEvaluator, flatten_for_writer
from synth_med.evaluation.metrics import (Predictions, auc, balanced_topk, high_risk_sensitivity,
                                          mean_auc, topk_accuracy)


def _softmax_preds():
  # 4 classes, 6 examples. True classes: 0, 0, 1, 2, 3, 3.
  label = np.eye(4)[[0, 0, 1, 2, 3, 3]].astype(np.float32)
  probs = np.array([
      [0.7, 0.1, 0.1, 0.1],   # top1 right
      [0.15, 0.5, 0.3, 0.05],  # true 0 ranked 3rd -> top3 yes, top1 no
      [0.1, 0.6, 0.2, 0.1],   # right
      [0.5, 0.3, 0.15, 0.05],  # true 2 ranked 3rd -> top3 yes
      [0.4, 0.3, 0.2, 0.1],   # true 3 ranked 4th -> no
      [0.1, 0.2, 0.3, 0.4],   # right
  ], np.float32)
  sex = np.array([0, 1, 0, 1, 0, 1])
  return Predictions(label=label, label_mask=np.ones_like(label), probs=probs, attrs={"sex": sex})


def test_topk_and_balanced_by_hand():
  p = _softmax_preds()
  rows = np.arange(6)
  assert topk_accuracy(p, 1)(rows) == pytest.approx(3 / 6)
  assert topk_accuracy(p, 3)(rows) == pytest.approx(5 / 6)
  # per-class top-3 recall: c0 2/2, c1 1/1, c2 1/1, c3 1/2 -> mean 0.875
  assert balanced_topk(p, 3)(rows) == pytest.approx(0.875)
  # per-class top-1 recall: c0 1/2, c1 1, c2 0, c3 1/2 -> 0.5
  assert balanced_topk(p, 1)(rows) == pytest.approx(0.5)


def test_high_risk_sensitivity_by_hand():
  p = _softmax_preds()
  rows = np.arange(6)
  # high-risk = {2, 3}: examples 3 (hit), 4 (miss), 5 (hit) -> 2/3
  assert high_risk_sensitivity(p, [2, 3])(rows) == pytest.approx(2 / 3)
  assert high_risk_sensitivity(p, [2, 3])(np.array([0, 1])) is None  # no high-risk case


def test_auc_masks_uncertain_and_is_undefined_for_one_class():
  label = np.array([[1, 0], [0, 0], [1, 1], [0, 1]], np.float32)
  mask = np.array([[1, 1], [1, 1], [1, 0], [1, 1]], np.float32)
  probs = np.array([[0.9, 0.2], [0.1, 0.3], [0.2, 0.9], [0.8, 0.6]], np.float32)
  p = Predictions(label, mask, probs, {})
  rows = np.arange(4)
  # finding 0: positives {0: .9, 2: .2}, negatives {1: .1, 3: .8}: pairs won 3 of 4
  assert auc(p, 0)(rows) == pytest.approx(0.75)
  # finding 1 with row 2 masked: only row 3 positive (0.6) vs 0.2, 0.3 -> 1.0
  assert auc(p, 1)(rows) == pytest.approx(1.0)
  assert mean_auc(p)(rows) == pytest.approx(0.875)
  assert auc(p, 0)(np.array([0, 2])) is None  # a single class: undefined, not 0


def _spec():
  return DatasetSpec(name="t", class_names=("a", "b", "c", "d"), label_kind="softmax",
                     attributes=(AttributeSpec("sex", ("female", "male")),), domains=("id",), channels=3,
                     high_risk=("c", "d"))


def _eval_cfg(min_group_size=1, bootstrap=50):
  return ConfigDict({"top_k": (1, 3), "min_group_size": min_group_size, "bootstrap": bootstrap,
                     "beta_samples": 20000, "seed": 0})


def test_groups_gaps_and_flags():
  p = _softmax_preds()
  ev = ClassificationEvaluator("id", None, _spec(), _eval_cfg(), 8)
  res = ev.score(p)
  female, male = res["groups"]["sex"]["female"], res["groups"]["sex"]["male"]
  # female rows 0, 2, 4: top3 hits 1, 1, 0; male rows 1, 3, 5: all hits.
  assert female["top3"]["value"] == pytest.approx(2 / 3) and male["top3"]["value"] == pytest.approx(1.0)
  gap = res["gaps"]["sex"]["top3"]
  assert gap["gap"] == pytest.approx(1 / 3) and gap["best"] == "male" and gap["worst"] == "female"
  assert gap["diff"]["of"] == "male-female" and gap["diff"]["value"] == pytest.approx(1 / 3)
  lo, hi = female["top3"]["ci"]
  assert 0.0 <= lo <= 2 / 3 <= hi <= 1.0
  flat = flatten_for_writer("id", res)
  assert flat["id/top3/sex=male"] == pytest.approx(1.0) and "id/gap/top3/sex" in flat
  flagged = ClassificationEvaluator("id", None, _spec(), _eval_cfg(min_group_size=4), 8).score(p)
  assert flagged["groups"]["sex"]["female"]["small"] is True
  assert flagged["gaps"]["sex"]["top3"]["gap"] is None  # small groups are left out of gaps


def test_group_auc_undefined_is_none_not_zero():
  label = np.array([[1], [0], [1], [1]], np.float32)
  probs = np.array([[0.9], [0.2], [0.7], [0.4]], np.float32)
  attr = np.array([0, 0, 1, 1])  # group 1 has positives only
  p = Predictions(label, np.ones_like(label), probs, {"sex": attr})
  groups = fairness.per_group({"auc": auc(p, 0)}, attr, ("female", "male"), 1, 10, 0)
  assert groups["female"]["auc"]["value"] == pytest.approx(1.0)
  assert groups["male"]["auc"]["value"] is None and groups["male"]["auc"]["ci"] is None


def test_unknown_attribute_values_are_left_out():
  p = _softmax_preds()
  attr = np.array([0, 1, -1, -1, 0, 1])
  groups = fairness.per_group({"top1": topk_accuracy(p, 1)}, attr, ("f", "m"), 1, 0, 0)
  assert groups["f"]["n"] == 2 and groups["m"]["n"] == 2 and "unknown" not in groups


def test_beta_posterior_matches_the_analytic_mean():
  hits = np.array([1] * 30 + [0] * 10 + [1] * 10 + [0] * 10)
  attr = np.array([0] * 40 + [1] * 20)
  post = fairness.beta_posterior(hits, attr, ("a", "b"), samples=100_000, seed=0)
  # Beta(31, 11) mean 31/42 minus Beta(11, 11) mean 0.5
  assert post["a"]["mean"] == pytest.approx(31 / 42 - 0.5, abs=0.005)
  assert post["b"]["mean"] == pytest.approx(-(31 / 42 - 0.5), abs=0.005)
  assert post["a"]["ci"][0] < post["a"]["mean"] < post["a"]["ci"][1]


def test_group_bootstrap_ci_matches_the_binomial_interval():
  """fairlearn's bootstrap CI of a group's hit rate: p = 0.7 over ~400 rows gives about
  ±1.96 sqrt(p (1 - p) / n) = ±0.045 around the value, and 0.9 over ~400 rows about ±0.029."""
  rng = np.random.default_rng(0)
  attr = np.repeat([0, 1], 400)
  hits = np.concatenate([rng.permutation(np.r_[np.ones(280), np.zeros(120)]),
                         rng.permutation(np.r_[np.ones(360), np.zeros(40)])])
  groups = fairness.per_group({"hit": lambda rows: float(hits[rows].mean())}, attr, ("a", "b"), 1, 1000, 0)
  for name, p in (("a", 0.7), ("b", 0.9)):
    lo, hi = groups[name]["hit"]["ci"]
    assert groups[name]["hit"]["value"] == pytest.approx(p)
    assert lo < p < hi
    assert (hi - lo) / 2 == pytest.approx(1.96 * np.sqrt(p * (1 - p) / 400), rel=0.2)
  no_boot = fairness.per_group({"hit": lambda rows: float(hits[rows].mean())}, attr, ("a", "b"), 1, 0, 0)
  assert no_boot["a"]["hit"]["ci"] is None
