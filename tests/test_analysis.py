"""The analyses (synth_med/analysis) against closed forms, hand computations and known distributions, the
quality filter, and paper 002's App. D toys."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.special import rel_entr
from sklearn.decomposition import PCA

from synth_med.analysis import distributions, group_metrics, memorisation, toys
from synth_med.evaluation.metrics import Predictions
from synth_med.infra import artifacts


# --- App. D ---------------------------------------------------------------------------------------

def test_d1_optimal_alpha_matches_its_closed_form_and_the_papers_example():
  rng = np.random.default_rng(0)
  for _ in range(50):
    p0, t0, phat0 = rng.uniform(0.05, 0.95, 3)
    if abs(t0 - phat0) < 0.02:
      continue
    closed, numeric = toys.optimal_alpha_closed_form(p0, t0, phat0), toys.optimal_alpha_numeric(p0, t0, phat0)
    assert closed == pytest.approx(numeric, abs=1e-4)
    # the minimum is a minimum: nudging alpha inside [0, 1] never lowers the KL
    kl = lambda a: toys.kl(toys.bernoulli(p0), toys.bernoulli(t0 * (1 - a) + phat0 * a))  # noqa: E731
    for a in (closed - 0.05, closed + 0.05):
      if 0 <= a <= 1:
        assert kl(a) >= kl(closed) - 1e-12
  assert toys.optimal_alpha_closed_form(0.2, 1 / 6, 0.5) == pytest.approx(0.1)  # Fig. D1(a): N = 6, one y=0 draw
  assert toys.kl([0.2, 0.8], [0.5, 0.5]) == pytest.approx(float(rel_entr([0.2, 0.8], [0.5, 0.5]).sum()))


def test_d1_trends_the_paper_states():
  rng = np.random.default_rng(1)
  few, many = (toys.alpha_over_resamples(n, 0.2, 0.5, 1000, rng)["mean"] for n in (3, 100))
  assert many < few and many < 0.1  # alpha -> 0 as N grows
  near, far = (toys.alpha_over_resamples(6, 0.2, phat, 1000, rng)["mean"] for phat in (0.25, 0.9))
  assert near > far  # more weight on generated data as p-hat nears p
  assert few > 0  # generated data helps (alpha > 0) on average


def test_d2_generated_data_never_hurts_and_fills_missing_cells():
  rng = np.random.default_rng(0)
  for n in (5, 20, 200):
    for _ in range(5):
      t = rng.multinomial(n, toys.P_TRUE.ravel()).reshape(2, 2) / n
      with_gen, w = toys.best_label_mix(toys.P_TRUE, t, toys.P_GENERATED)
      without, _ = toys.best_label_mix(toys.P_TRUE, t, None)
      assert with_gen <= without + 1e-6 and np.isfinite(with_gen)
      assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
  t = np.array([[0.5, 0.5], [0.0, 0.0]])  # no y = 1 drawn: only generated data covers it
  assert toys.best_label_mix(toys.P_TRUE, t, None)[0] == np.inf
  assert np.isfinite(toys.best_label_mix(toys.P_TRUE, t, toys.P_GENERATED)[0])
  # t = p exactly: real data alone reach KL 0, and the mix finds it
  assert toys.best_label_mix(toys.P_TRUE, toys.P_TRUE, toys.P_GENERATED)[0] == pytest.approx(0.0, abs=1e-4)
  rows = toys.d2_curves(ns=(5, 1000), repeats=4)
  assert rows[0]["without_generated"]["infinite"] >= rows[1]["without_generated"]["infinite"]


def test_d3_generated_points_help_when_labelled_points_are_few():
  rng = np.random.default_rng(0)
  mixture = toys.TrueMixture.random(3, 2, rng)
  few = [toys.gmm_accuracy(mixture, 6, 0, rng, unlabelled=3000, validation=1000) for _ in range(4)]
  helped = [toys.gmm_accuracy(mixture, 6, 2000, rng, unlabelled=3000, validation=1000) for _ in range(4)]
  assert np.mean(helped) > np.mean(few) + 0.05, (few, helped)


def test_the_toys_page_is_written(tmp_path):
  path = toys.write_page(str(tmp_path / "toys.html"), resamples=20, d2_repeats=2, d3_repeats=1,
                         d3_settings=((2, 2),), d3_labelled=(10, 50), d3_generated=(0, 500))
  page = open(path).read()
  assert page.count("data:image/png;base64,") == 3 and "weight of the <b>generated</b> data" in page


# --- distributions --------------------------------------------------------------------------------

def test_mmd2_is_equation_7_by_hand():
  rng = np.random.default_rng(0)
  u, z = rng.normal(size=(5, 3)), rng.normal(size=(4, 3)) + 0.5
  k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
  n, m = len(u), len(z)
  hand = (sum(k(u[i], u[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
          + sum(k(z[i], z[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
          - 2 * sum(k(a, b) for a in u for b in z) / (n * m))
  assert distributions.mmd2(u, z) == pytest.approx(hand)


def test_mmd_test_is_calibrated_on_one_distribution_and_detects_a_shift():
  rng = np.random.default_rng(0)
  same = []
  for rep in range(20):
    a, b, c = (rng.normal(size=(600, 8)) for _ in range(3))
    same.append(distributions.mmd_test(a, b, c, subsets=30, size=150, seed=rep)["p_mann_whitney"])
  assert sum(p > 0.05 for p in same) >= 15, same
  a, b = rng.normal(size=(600, 8)), rng.normal(size=(600, 8))
  shifted = rng.normal(size=(600, 8)) + 0.3
  res = distributions.mmd_test(a, b, shifted, subsets=30, size=150)
  assert res["p_mann_whitney"] < 0.01 and res["ratio"] > 1


def test_components_for_variance_on_known_spectra():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3000, 3)) * np.sqrt([10.0, 5.0, 1.0])
  x = np.concatenate([x, 1e-3 * rng.normal(size=(3000, 5))], 1)
  got = distributions.components_for_variance(x, max_rows=3000)
  # variance shares 10/16, 5/16, 1/16: 1 component for 0.6, 2 for 0.7-0.9, 3 for 0.95
  assert got == {"0.6": 1, "0.7": 2, "0.8": 2, "0.9": 2, "0.95": 3}
  ratios = np.cumsum(PCA().fit(x).explained_variance_ratio_)
  assert got["0.9"] == int(np.argmax(ratios >= 0.9)) + 1


def test_frechet_distance_and_precision_recall():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(4000, 4)), rng.normal(size=(4000, 4))
  assert distributions.frechet_distance(a, b) < 0.02
  assert distributions.frechet_distance(a, b + [2.0, 0, 0, 0]) == pytest.approx(4.0, rel=0.05)  # |Δμ|² = 4
  same = distributions.precision_recall(a, b, max_rows=1000)
  far = distributions.precision_recall(a, b + 10.0, max_rows=1000)
  assert same["precision"] > 0.9 and same["recall"] > 0.9
  assert far["precision"] == 0.0 and far["recall"] == 0.0
  narrow = distributions.precision_recall(a, 0.3 * b, max_rows=1000)  # a mode-collapsed generator
  assert narrow["precision"] > 0.9 and narrow["recall"] < 0.6


# --- memorisation ---------------------------------------------------------------------------------

def test_copies_of_training_images_are_all_flagged_and_fresh_images_are_not():
  rng = np.random.default_rng(0)
  train = rng.integers(0, 256, (300, 8, 8, 3), dtype=np.uint8)
  test = rng.integers(0, 256, (100, 8, 8, 3), dtype=np.uint8)
  copies = train[rng.choice(300, 50, replace=False)]
  res = memorisation.copy_check(copies, train, test)
  assert res["flagged_fraction"] == 1.0 and res["synthetic_quantiles"]["0.5"] == 0.0
  fresh = rng.integers(0, 256, (200, 8, 8, 3), dtype=np.uint8)
  assert memorisation.copy_check(fresh, train, test)["flagged_fraction"] < 0.01
  s, t, d = res["closest_pairs"][0]
  assert np.array_equal(copies[s], train[t]) and d == 0.0
  feats = rng.normal(size=(300, 16))
  cos = memorisation.copy_check(2.0 * feats[:20], feats, rng.normal(size=(50, 16)), "cosine")
  assert cos["flagged_fraction"] == 1.0  # cosine ignores the scale
  dist, idx = memorisation.nearest(feats[:5] + 1e-4, feats, "l2")
  assert list(idx) == [0, 1, 2, 3, 4]


# --- group metrics --------------------------------------------------------------------------------

def _binary(y, p, sex):
  y = np.asarray(y, np.float32)[:, None]
  return Predictions(label=y, label_mask=np.ones_like(y), probs=np.asarray(p, np.float32)[:, None],
                     attrs={"sex": np.asarray(sex)})


def test_calibration_error_by_hand():
  conf = np.array([0.1, 0.12, 0.9, 0.92])
  correct = np.array([0, 1, 1, 1.0])
  # bins of width 1/15: 0.1 and 0.12 share bin 1 (accuracy 0.5, confidence 0.11); 0.9 and 0.92 bin 13
  hand = 0.5 * abs(0.5 - 0.11) + 0.5 * abs(1.0 - 0.91)
  assert group_metrics.calibration_error(conf, correct) == pytest.approx(hand)
  p = _binary([0, 1, 1, 1], conf, [0, 0, 1, 1])
  by = group_metrics.ece_by_group(p, "binary", "sex", ("female", "male"), 1)
  assert by["overall"] == pytest.approx(hand)
  assert by["groups"]["female"]["value"] == pytest.approx(abs(0.5 - 0.11))
  assert by["gap"] == pytest.approx(abs(0.5 - 0.11) - abs(1.0 - 0.91))


def test_equalised_odds_at_the_validation_threshold_by_hand():
  val = _binary([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.9], [0, 1, 0, 1])
  assert group_metrics.youden_threshold(val.probs[:, 0], val.label[:, 0] > 0.5) == pytest.approx(0.6)
  # test: group 0 TPR 1/2, FPR 0; group 1 TPR 1, FPR 1/2 at threshold 0.6
  test = _binary([1, 1, 0, 0, 1, 1, 0, 0], [0.7, 0.5, 0.2, 0.1, 0.8, 0.9, 0.65, 0.3], [0, 0, 0, 0, 1, 1, 1, 1])
  eo = group_metrics.equalised_odds(val, test, "binary", "sex", 1)
  assert eo["equal_opportunity"] == pytest.approx(0.5) and eo["equalised_odds"] == pytest.approx(0.5)
  assert group_metrics.equalised_odds(val, test, "softmax", "sex", 1) is None  # multi-class: not defined here


def test_worst_group_beta_spread_and_intersections():
  groups = {"a": {"small": False, "top3": {"value": 0.7}}, "b": {"small": False, "top3": {"value": 0.5}},
            "c": {"small": True, "top3": {"value": 0.1}}}
  assert group_metrics.worst_group(groups, "top3") == {"value": 0.5, "group": "b"}
  post = {"female": {"mean": -0.04}, "male": {"mean": 0.06}, "x": {"mean": 0.01}}
  assert group_metrics.beta_spread(post) == pytest.approx(np.std([-0.04, 0.06, 0.01]))
  assert group_metrics.beta_spread({"only": {"mean": 0.1}}) is None
  codes, names = group_metrics.intersection(np.array([0, 1, -1, 1]), np.array([2, 0, 1, -1]), ("f", "m"), ("x", "y", "z"))
  assert list(codes) == [2, 3, -1, -1] and names[2] == "f×z" and names[3] == "m×x"


def test_underserved_counts_examples_every_seed_misses():
  label = np.eye(5, dtype=np.float32)[[0, 0, 1, 4, 4, 2]]
  sex = np.array([0, 1, 0, 1, 0, 1])

  def run(hit_rows):
    probs = np.full((6, 5), 0.01, np.float32)
    for i, y in enumerate(label.argmax(1)):
      if i in hit_rows:
        probs[i, y] = 0.96
      else:  # the true class last: outside the top 3
        probs[i, y] = 0.0
        probs[i, [(y + 1) % 5, (y + 2) % 5, (y + 3) % 5]] = [0.5, 0.3, 0.19]
    return Predictions(label=label, label_mask=np.ones_like(label), probs=probs, attrs={"sex": sex})

  runs = [run({0, 1, 2}), run({0, 2, 3})]  # rows 4 and 5 missed by both; 1 and 3 by one seed only
  res = group_metrics.underserved(runs, "softmax", [0, 4], "sex", ("female", "male"))  # high-risk classes 0 and 4
  assert res["at_risk"] == 4 and res["always_missed"] == 1  # rows 0, 1, 3, 4 at risk; only 4 always missed
  assert res["groups"] == {"female": {"at_risk": 2, "always_missed": 1}, "male": {"at_risk": 2, "always_missed": 0}}


# --- the quality filter ---------------------------------------------------------------------------

def test_quality_filter_keeps_what_the_classifier_and_probe_confirm(tmp_path):
  from synth_med.data.shards import read_shards, shard_path, write_shard
  from synth_med.experiments.synthetic_store import filter_store

  class Probe:  # answers what it is told to
    def __init__(self, truth):
      self.truth = truth

    def predict(self, feats):
      return self.truth[: len(feats)]

  rng = np.random.default_rng(0)
  n = 40
  label = np.eye(5, dtype=np.float32)[rng.integers(0, 5, n)]
  sex = rng.integers(0, 2, n).astype(np.int32)
  store = str(tmp_path / "store")
  write_shard(shard_path(store, 0), {"image": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), "label": label,
                                     "label_mask": np.ones_like(label), "attrs/sex": sex})
  probs = np.where(label > 0, 0.9, 0.025).astype(np.float32)
  for i in range(0, n, 4):  # every 4th row from 0: the requested class last, so not confirmed
    probs[i] = 0.2
    probs[i, label[i].argmax()] = 0.0
  preds = Predictions(label=label, label_mask=np.ones_like(label), probs=probs, attrs={"sex": sex})
  probe_says = sex.copy()
  probe_says[1::4] = 1 - sex[1::4]  # every 4th row from 1: the property not confirmed
  report = filter_store(store, str(tmp_path / "filtered"), preds, "softmax", {"sex": {"probe": Probe(probe_says)}},
                        "sex", ("female", "male"), tuple("abcde"))
  kept = read_shards(str(tmp_path / "filtered")).arrays
  assert report["kept"] == len(kept["image"]) == n // 2 and report["acceptance"] == 0.5
  assert set(report["per_value"]) <= {"female", "male"} and artifacts.is_done(str(tmp_path / "filtered"))
  assert filter_store(store, str(tmp_path / "filtered"), preds, "softmax", {}, "sex", (), ()) == report  # read back
