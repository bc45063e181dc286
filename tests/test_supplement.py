"""Paper 000's pieces: label-matched replica conditions, the first-k-copies view of a replica store, and
its statistics (per-finding bootstrap AUROC, paired t-tests with Bonferroni, co-occurrence correlation)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from synth_med.diffusion.fair_sampler import REPLICA_COPY, REPLICA_SOURCE, first_copies, replica_conditions
from synth_med.errors import SynthMedError
from synth_med.evaluation import supplement_stats as st
from synth_med.evaluation.metrics import Predictions


def _training(n=30, k=5, seed=0):
  rng = np.random.default_rng(seed)
  label = (rng.random((n, k)) < 0.3).astype(np.float32)
  mask = (rng.random((n, k)) < 0.9).astype(np.float32)
  return {"label": label, "label_mask": mask, "attrs/sex": rng.integers(0, 2, n).astype(np.int32),
          "attrs/age_bucket": rng.integers(-1, 7, n).astype(np.int32)}


def test_replicas_copy_every_examples_label_mask_and_attributes():
  train = _training()
  rep = replica_conditions(train, 3, ("sex", "age_bucket", "race"))
  assert len(rep["label"]) == 90 and rep["labelled"].all()
  for c in range(3):
    rows = slice(30 * c, 30 * (c + 1))  # copy-major
    assert (rep[REPLICA_COPY][rows] == c).all() and (rep[REPLICA_SOURCE][rows] == np.arange(30)).all()
  src = rep[REPLICA_SOURCE]
  for key in ("label", "label_mask", "attrs/sex", "attrs/age_bucket"):
    np.testing.assert_array_equal(rep[key], train[key][src])
  assert (rep["attrs/race"] == -1).all()  # an attribute the data lack stays unknown
  corr = st.cooccurrence_correlation(st.cooccurrence(rep["label"], rep["label_mask"]),
                                     st.cooccurrence(train["label"], train["label_mask"]))
  assert corr == pytest.approx(1.0)
  two = first_copies(rep, 2)
  assert len(two["label"]) == 60 and (two[REPLICA_COPY] < 2).all()
  with pytest.raises(SynthMedError, match="holds 3 copies"):
    first_copies(rep, 4)
  with pytest.raises(SynthMedError, match="no replicas"):
    first_copies({"label": train["label"]}, 1)
  assert len(first_copies({"label": train["label"]}, 0)["label"]) == 30
  with pytest.raises(SynthMedError, match=">= 1"):
    replica_conditions(train, 0)


def test_cooccurrence_by_hand():
  y = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1], [0, 0, 0]], np.float32)
  m = st.cooccurrence(y)
  np.testing.assert_allclose(m, [[1.0, 0.5, 0.0], [0.5, 1.0, 0.5], [0.0, 1.0, 1.0]])
  mask = np.ones_like(y)
  mask[0, 1] = 0  # an unknown label counts as absent
  np.testing.assert_allclose(st.cooccurrence(y, mask)[0], [1.0, 0.0, 0.0])
  assert np.isnan(st.cooccurrence(np.zeros((3, 2)))).all()


def test_bonferroni_and_the_paired_test_match_scipy():
  assert st.bonferroni([0.01, None, 0.2, 0.6]) == pytest.approx([0.03, None, 0.6, 1.0])
  rng = np.random.default_rng(0)
  n, k = 400, 3
  label = (rng.random((n, k)) < 0.3).astype(np.float32)
  ref = Predictions(label, np.ones_like(label), (0.6 * label + 0.7 * rng.random((n, k))).astype(np.float32), {})
  better = Predictions(label, np.ones_like(label), (0.9 * label + 0.7 * rng.random((n, k))).astype(np.float32), {})
  res = st.paired_finding_tests(better, ref, ("a", "b", "c"), n_boot=200, seed=3)
  # the same resamples by hand
  counts = st.resample_counts(n, 200, np.random.default_rng(3))
  for c, name in enumerate("abc"):
    am = st.weighted_auc(better.probs[:, c], label[:, c] > 0.5, counts)
    ar = st.weighted_auc(ref.probs[:, c], label[:, c] > 0.5, counts)
    p = stats.ttest_rel(am, ar).pvalue
    assert res[name]["p"] == pytest.approx(p) and res[name]["p_bonferroni"] == pytest.approx(min(1.0, 3 * p))
    assert res[name]["diff"] > 0
  with pytest.raises(ValueError, match="same test images"):
    st.paired_finding_tests(better, Predictions(label[:-1], label[:-1], label[:-1], {}), "abc")


def test_finding_aucs_match_sklearn_and_cover_them_with_the_ci():
  rng = np.random.default_rng(1)
  n = 500
  label = (rng.random((n, 2)) < [0.3, 0.04]).astype(np.float32)
  probs = (0.5 * label + rng.random((n, 2))).astype(np.float32)
  mask = np.ones_like(label)
  mask[:50, 0] = 0
  res = st.finding_aucs(Predictions(label, mask, probs, {}), ("common", "rare"), n_boot=300)
  assert res["common"]["auc"] == pytest.approx(roc_auc_score(label[50:, 0], probs[50:, 0]))
  assert res["rare"]["auc"] == pytest.approx(roc_auc_score(label[:, 1], probs[:, 1]))
  for name in ("common", "rare"):
    lo, hi = res[name]["ci"]
    assert lo <= res[name]["auc"] <= hi
  assert res["rare"]["prevalence"] < 0.05 < res["common"]["prevalence"]
  assert res["macro"]["auc"] == pytest.approx((res["common"]["auc"] + res["rare"]["auc"]) / 2)


def test_cfg_store_names_and_the_replica_hold_out():
  from synth_med.diffusion.fair_sampler import held_out
  from synth_med.experiments.synthetic_store import replica_guidance
  assert replica_guidance("replica_w7.5") == 7.5 and replica_guidance("replica_w0") == 0.0
  assert replica_guidance("replica") is None and replica_guidance("replica_w-1") is None
  assert replica_guidance("replica_wx") is None and replica_guidance("label") is None
  rep = replica_conditions(_training(n=25), 2)
  held = held_out(rep, 10)
  assert set(rep[REPLICA_SOURCE][held]) == {0, 10, 20}  # the same examples in every copy
  with pytest.raises(SynthMedError, match="replica store"):
    held_out({"label": np.zeros((3, 1))}, 10)
