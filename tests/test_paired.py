"""Paired comparisons: weighted metrics equal the evaluator's, the CI equals a hand-computed bootstrap,
the U p-value equals scipy's, and verdicts follow the CI."""
import numpy as np
import pytest
from scipy import stats

from synth_med.evaluation import paired
from synth_med.evaluation.metrics import Predictions, metric_suite


def _softmax_run(rng, n=120, k=6, signal=1.0, label=None, attr=None):
  label = label if label is not None else np.eye(k, dtype=np.float32)[rng.integers(0, k, n)]
  logits = rng.normal(size=(n, k)) + signal * label
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  attr = attr if attr is not None else rng.integers(0, 2, n).astype(np.int32)
  return Predictions(label=label, label_mask=np.ones_like(label), probs=probs.astype(np.float32),
                     attrs={"sex": attr})


def _multilabel_run(rng, n=150, k=3, label=None):
  label = label if label is not None else (rng.random((n, k)) < 0.4).astype(np.float32)
  mask = np.ones_like(label)
  mask[rng.random((n, k)) < 0.1] = 0.0
  # Rounded scores, so ties occur and the half-credit rule is exercised.
  probs = np.round(np.clip(0.5 * label + rng.random((n, k)) * 0.7, 0, 1), 1).astype(np.float32)
  return Predictions(label=label, label_mask=mask, probs=probs, attrs={"sex": rng.integers(0, 2, n).astype(np.int32)})


def test_weighted_metrics_equal_the_evaluator_on_the_whole_split():
  rng = np.random.default_rng(0)
  p = _softmax_run(rng)
  overall, grouped = metric_suite(p, "softmax", [f"c{i}" for i in range(6)], ["c0", "c2"], (1, 3))
  rows = np.arange(len(p.label))
  w = np.ones((1, len(rows)))
  for name in ("top1", "top3", "balanced_top3"):
    fn = {**grouped, **overall}[name]
    assert paired.metric_values(name, p, w, "softmax")[0] == pytest.approx(fn(rows), abs=1e-12)
  assert paired.metric_values("high_risk_sensitivity", p, w, "softmax", [0, 2])[0] == pytest.approx(
      grouped["high_risk_sensitivity"](rows), abs=1e-12)
  # Duplicated rows (a bootstrap resample) through weights.
  idx = rng.integers(0, len(rows), len(rows))
  counts = np.bincount(idx, minlength=len(rows))[None].astype(float)
  assert paired.metric_values("top3", p, counts, "softmax")[0] == pytest.approx(grouped["top3"](idx), abs=1e-12)
  m = _multilabel_run(rng)
  _, grouped = metric_suite(m, "multilabel", ["a", "b", "c"])
  counts = np.bincount(rng.integers(0, len(m.label), len(m.label)), minlength=len(m.label))
  idx = np.repeat(np.arange(len(m.label)), counts)
  assert paired.metric_values("mean_auc", m, counts[None].astype(float), "multilabel")[0] == pytest.approx(
      grouped["mean_auc"](idx), abs=1e-12)


def test_paired_ci_matches_a_hand_computed_bootstrap():
  rng = np.random.default_rng(1)
  n, seeds, n_boot = 80, 3, 200
  label = np.eye(4, dtype=np.float32)[rng.integers(0, 4, n)]
  attr = rng.integers(0, 2, n).astype(np.int32)
  method = [_softmax_run(rng, n, 4, 1.5, label, attr) for _ in range(seeds)]
  ref = [_softmax_run(rng, n, 4, 0.7, label, attr) for _ in range(seeds)]
  res = paired.compare(method, ref, ["top1"], "top1", "sex", "softmax", min_group_size=5, n_boot=n_boot, seed=7)

  # By hand: the same draws (images first, then seeds), each replicate recomputed from scratch.
  draw = np.random.default_rng(7)
  img_idx = draw.integers(0, n, (n_boot, n))
  seed_idx = draw.integers(0, seeds, (n_boot, seeds))
  top1 = lambda p, rows: np.mean(np.argmax(p.probs[rows], 1) == np.argmax(p.label[rows], 1))  # noqa: E731

  def gap(p, rows):
    vals = [top1(p, rows[attr[rows] == g]) for g in (0, 1)]
    return max(vals) - min(vals)

  for name, fn in (("top1", top1), ("gap", gap)):
    diffs = [np.mean([fn(method[s], img_idx[b]) - fn(ref[s], img_idx[b]) for s in seed_idx[b]])
             for b in range(n_boot)]
    assert res[name]["ci"] == pytest.approx([np.quantile(diffs, 0.025), np.quantile(diffs, 0.975)], abs=1e-12)
    full = np.arange(n)
    assert res[name]["diff"] == pytest.approx(np.mean([fn(method[s], full) - fn(ref[s], full)
                                                       for s in range(seeds)]), abs=1e-12)
  assert res["top1"]["verdict"] == "better"  # a much stronger signal on the same images


def test_mann_whitney_p_value_matches_scipy():
  rng = np.random.default_rng(2)
  label = np.eye(5, dtype=np.float32)[rng.integers(0, 5, 100)]
  method = [_softmax_run(rng, 100, 5, 1.2, label) for _ in range(5)]
  ref = [_softmax_run(rng, 100, 5, 1.0, label) for _ in range(5)]
  res = paired.compare(method, ref, ["top3"], "top3", "sex", "softmax", min_group_size=5, n_boot=50)
  rows = np.arange(100)
  per = lambda runs: [metric_suite(p, "softmax", list("abcde"))[1]["top3"](rows) for p in runs]  # noqa: E731
  assert res["top3"]["p_mann_whitney"] == pytest.approx(
      stats.mannwhitneyu(per(method), per(ref), alternative="two-sided").pvalue)


def test_verdicts_and_the_gap_direction():
  assert paired.verdict([0.01, 0.05], lower_is_better=False) == "better"
  assert paired.verdict([0.01, 0.05], lower_is_better=True) == "worse"
  assert paired.verdict([-0.05, -0.01], lower_is_better=True) == "better"
  assert paired.verdict([-0.01, 0.02], lower_is_better=False) == "no detectable difference"
  # Identical runs: zero difference and no verdict either way.
  rng = np.random.default_rng(3)
  label = np.eye(6, dtype=np.float32)[rng.integers(0, 6, 120)]
  runs = [_softmax_run(rng, label=label) for _ in range(3)]
  res = paired.compare(runs, runs, ["top3"], "top3", "sex", "softmax", min_group_size=5, n_boot=100)
  assert res["top3"]["diff"] == 0.0 and res["top3"]["verdict"] == "no detectable difference"


def test_comparison_refuses_runs_on_different_images():
  rng = np.random.default_rng(4)
  with pytest.raises(ValueError, match="same test images"):
    paired.compare([_softmax_run(rng)], [_softmax_run(rng)], ["top1"], "top1", "sex", "softmax")


def test_predictions_round_trip(tmp_path):
  rng = np.random.default_rng(5)
  p = _softmax_run(rng)
  paired.save_predictions(str(tmp_path / "predictions.npz"), {"id": p})
  back = paired.load_predictions(str(tmp_path / "predictions.npz"))["id"]
  np.testing.assert_array_equal(back.probs, p.probs)
  np.testing.assert_array_equal(back.attrs["sex"], p.attrs["sex"])


def test_report_says_when_the_mix_does_no_better_than_its_controls():
  from synth_med.evaluation.report import control_verdicts
  cell = lambda d, lo, hi: {"diff": d, "ci": [lo, hi], "verdict": "x", "p_mann_whitney": 0.5}  # noqa: E731
  res = {"splits": ["ood1"], "comparisons": {
      "synth_label_property": {"ood1": {"top3": cell(0.05, 0.02, 0.08), "gap": cell(-0.05, -0.08, -0.02)}},
      "control_real_images": {"ood1": {"top3": cell(0.01, -0.02, 0.04), "gap": cell(-0.06, -0.09, -0.03)}},
      "control_label_prior": {"ood1": {"top3": cell(0.00, -0.03, 0.03), "gap": cell(0.00, -0.03, 0.03)}}}}
  lines = control_verdicts(res)
  # top-3: the mix's CI lies above both controls' estimates, so no sentence; the gap: the real-images
  # control narrows it as much (-0.06 inside the mix's CI [-0.08, -0.02]), so the report says so.
  assert lines == ["ood1 gap: synth_label_property does no better than control_real_images (its CI does not clear the "
                   "control's estimate), so this gain, if any, need not come from the synthetic images."]
