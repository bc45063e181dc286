"""Fair sampling, w1/w2 weights, oversampling, α mixing and the E.2 augmentations (002 §3.1, Eq. 3, 8, 9)."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from synth_med.data.augment import make_augment
from synth_med.data.mixing import MixedStream, classifier_arrays
from synth_med.diffusion.fair_sampler import fair_conditions
from synth_med.errors import SynthMedError
from synth_med.objectives.reweighting import (dominant_classes, equality_weights, filter_weights, label_keys,
                                              oversample_rows)


def _training(n=600, k=5, seed=0):
  rng = np.random.default_rng(seed)
  y = rng.choice(k, n, p=[0.5, 0.2, 0.15, 0.1, 0.05])
  sex = np.where(rng.random(n) < np.where(y == 0, 0.9, 0.6), 0, 1).astype(np.int32)
  sex[:7] = -1
  labels = np.eye(k, dtype=np.float32)[y]
  return {"label": labels, "label_mask": np.ones_like(labels), "attrs/sex": sex,
          "attrs/age": rng.integers(0, 7, n).astype(np.int32)}, y


def test_fair_sampler_keeps_prevalence_and_is_uniform_within_each_label():
  train, y = _training()
  n = 1000
  cond = fair_conditions(train, "softmax", n, seed=3, mode="label_property", attribute="sex",
                         attribute_names=("sex", "age"))
  ys = cond["label"].argmax(-1)
  # Prevalence: each class within rounding of n * p_train(y) (every row used floor/ceil(n/N) times).
  expected = np.bincount(y, minlength=5) * n / len(y)
  assert np.all(np.abs(np.bincount(ys, minlength=5) - expected) <= np.bincount(y, minlength=5) + 1e-9)
  assert np.all(np.abs(np.bincount(ys, minlength=5) / n - np.bincount(y, minlength=5) / len(y)) < 0.03)
  # Uniform over the known values, exactly (+-1) inside every label group.
  assert set(np.unique(cond["attrs/sex"])) == {0, 1}
  for c in range(5):
    counts = np.bincount(cond["attrs/sex"][ys == c], minlength=2)
    assert abs(counts[0] - counts[1]) <= 1, (c, counts)
  assert np.all(cond["attrs/age"] == -1) and cond["labelled"].all()
  # Label-only: every property null.
  lab = fair_conditions(train, "softmax", 200, seed=0, mode="label", attribute_names=("sex", "age"))
  assert np.all(lab["attrs/sex"] == -1) and np.all(lab["attrs/age"] == -1)
  # Deterministic per seed.
  again = fair_conditions(train, "softmax", n, seed=3, mode="label_property", attribute="sex",
                          attribute_names=("sex", "age"))
  assert all(np.array_equal(cond[k], again[k]) for k in cond)


def test_fair_sampler_multilabel_keeps_finding_cooccurrence_and_rejects_bad_input():
  rng = np.random.default_rng(0)
  labels = (rng.random((300, 3)) < [0.3, 0.1, 0.5]).astype(np.float32)
  labels[:, 1] = labels[:, 0]  # findings 0 and 1 always co-occur
  train = {"label": labels, "label_mask": np.ones_like(labels), "attrs/sex": rng.integers(0, 2, 300)}
  cond = fair_conditions(train, "multilabel", 900, 1, "label_property", "sex", ("sex",))
  assert np.array_equal(cond["label"][:, 0], cond["label"][:, 1])
  np.testing.assert_allclose(cond["label"].mean(0), labels.mean(0), atol=1e-6)  # 900 = 3 x 300 exactly
  with pytest.raises(SynthMedError, match="mode"):
    fair_conditions(train, "multilabel", 10, 0, "uniform")
  with pytest.raises(SynthMedError, match="no property 'tone'"):
    fair_conditions(train, "multilabel", 10, 0, "label_property", "tone", ("sex",))


def test_w1_matches_hand_computed_weights():
  keys = np.array([0, 0, 0, 0, 1, 1, 1])
  attrs = np.array([0, 0, 0, 1, 0, 1, -1])
  # p_train(a|y=0) = (3/4, 1/4), p_train(a|y=1) = (1/2, 1/2) over the known values; p_f = 1/2.
  np.testing.assert_allclose(equality_weights(keys, attrs, 1.0),
                             [2 / 3, 2 / 3, 2 / 3, 2.0, 1.0, 1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(equality_weights(keys, attrs, 0.5),
                             [np.sqrt(2 / 3)] * 3 + [np.sqrt(2.0), 1.0, 1.0, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(equality_weights(keys, attrs, 0.0), np.ones(7))
  with pytest.raises(SynthMedError, match="equality level"):
    equality_weights(keys, attrs, -1.0)


def test_w2_filters_the_dominant_classes_derived_from_data():
  train, y = _training()
  dom = dominant_classes(train["label"], 2)
  assert dom == (0, 1)  # the two most frequent by construction
  synth = np.eye(5, dtype=np.float32)[[0, 1, 2, 3, 4, 0]]
  np.testing.assert_array_equal(filter_weights(label_keys(synth, "softmax"), dom), [0, 0, 1, 1, 1, 0])
  assert dominant_classes(train["label"], 0) == ()
  # Soft labels use their argmax; multi-label keys are the set of positives.
  assert label_keys(np.array([[0.2, 0.5, 0.3]]), "softmax")[0] == 1
  np.testing.assert_array_equal(label_keys(np.array([[1, 0, 1], [0, 0, 0]]), "multilabel"), [5, 0])


def test_oversampling_evens_out_the_attribute():
  attrs = np.array([0] * 90 + [1] * 10 + [-1] * 5)
  rows = oversample_rows(attrs, seed=0)
  counts = np.bincount(attrs[rows][attrs[rows] >= 0])
  assert counts.tolist() == [90, 90]
  assert np.sum(attrs[rows] == -1) == 5
  assert set(np.flatnonzero(attrs == 1)) <= set(rows)  # every minority example at least once


def _sources(n_real=50, n_synth=30):
  def arr(n, fill):
    lab = np.eye(3, dtype=np.float32)[np.arange(n) % 3]
    return {"image": np.full((n, 4, 4, 3), fill, np.uint8), "label": lab, "label_mask": np.ones_like(lab),
            "labelled": np.ones(n, bool)}
  return classifier_arrays(arr(n_real, 0)), classifier_arrays(arr(n_synth, 255), np.full(n_synth, 0.5))


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.75, 1.0])
def test_alpha_is_the_real_proportion_of_batch_slots(alpha):
  real, synth = _sources()
  stream = MixedStream(real if alpha > 0 else None, synth if alpha < 1 else None, alpha, 64, seed=1,
                       num_threads=0)
  flags = np.concatenate([stream.batch(s)["synthetic"] for s in range(200)])
  frac_real = 1.0 - flags.mean()
  assert abs(frac_real - alpha) <= 4 * np.sqrt(alpha * (1 - alpha) / len(flags)) + 1e-9
  b = stream.batch(7)
  # The flag tells the truth: synthetic images are all 255 here and carry weight 0.5.
  assert np.array_equal(b["synthetic"], b["image"][:, 0, 0, 0] == 255)
  assert np.allclose(b["weight"], np.where(b["synthetic"], 0.5, 1.0))
  # Resume: iterating from step 7 gives exactly batch(7), also with threads.
  threaded = MixedStream(real if alpha > 0 else None, synth if alpha < 1 else None, alpha, 64, seed=1,
                         num_threads=2)
  first = next(threaded.iterate(7))
  assert all(np.array_equal(first[k], b[k]) for k in b)


def test_alpha_outside_unit_interval_and_missing_sources_fail_clearly():
  real, synth = _sources()
  with pytest.raises(SynthMedError, match=r"mix.alpha=1.5 must lie in \[0, 1\]"):
    MixedStream(real, synth, 1.5, 8, 0)
  with pytest.raises(SynthMedError, match="no synthetic examples"):
    MixedStream(real, None, 0.5, 8, 0)
  with pytest.raises(SynthMedError, match="no real training examples"):
    MixedStream(None, synth, 0.5, 8, 0)


@pytest.mark.parametrize("kind", ["randaugment", "imagenet", "randaugment_imagenet"])
def test_baseline_augmentations_change_images_in_range(kind):
  x = jax.random.uniform(jax.random.key(0), (16, 16, 16, 3))
  f = jax.jit(make_augment("skin", kind))
  y1, y2 = np.asarray(f(x, jax.random.key(1))), np.asarray(f(x, jax.random.key(1)))
  assert y1.shape == x.shape and y1.min() >= 0.0 and y1.max() <= 1.0
  np.testing.assert_array_equal(y1, y2)  # a pure function of the key
  changed = np.mean(np.abs(y1 - np.asarray(x)).reshape(16, -1).mean(-1) > 1e-3)
  assert changed >= 0.5  # most images are altered (RandAugment may draw identity twice)
  assert not np.allclose(y1, np.asarray(f(x, jax.random.key(2))))


def test_tuning_grid_parsing_and_overrides():
  from ml_collections import ConfigDict

  from synth_med.experiments import tuning
  points = tuning.grid_points("train.optimizer.lr=0.01|0.1; train.steps=100|200")
  assert points == [{"train.optimizer.lr": 0.01, "train.steps": 100}, {"train.optimizer.lr": 0.01, "train.steps": 200},
                    {"train.optimizer.lr": 0.1, "train.steps": 100}, {"train.optimizer.lr": 0.1, "train.steps": 200}]
  assert tuning.grid_points("") == [] and tuning.grid_points("loss.name=ce|focal") == [
      {"loss.name": "ce"}, {"loss.name": "focal"}]
  c = ConfigDict({"train": {"steps": 10, "optimizer": {"lr": 0.03}}, "loss": {"name": "ce"}})
  tuning.apply_overrides(c, {"train.optimizer.lr": 1, "train.steps": 300})
  assert c.train.optimizer.lr == 1.0 and isinstance(c.train.optimizer.lr, float) and c.train.steps == 300
  with pytest.raises(SynthMedError, match=r"'train.optimizer.lrr' is not in the classifier config; "
                                          r"train.optimizer has \['lr'\]"):
    tuning.apply_overrides(c, {"train.optimizer.lrr": 0.1})
  with pytest.raises(SynthMedError, match=r"has no 'trian'"):
    tuning.apply_overrides(c, {"trian.steps": 1})
  with pytest.raises(SynthMedError, match=r"does not fit the current value 300"):
    tuning.apply_overrides(c, {"train.steps": "many"})
  with pytest.raises(SynthMedError, match=r"has no '='"):
    tuning.parse_grid("train.steps")
  with pytest.raises(SynthMedError, match=r"tune.metric='auc' on split 'val' is not in"):
    tuning.score({"splits": {"val": {"overall": {"top3": 0.5}}}}, "val", "auc")


def test_study_rejects_a_bad_tuning_grid_before_any_work():
  from tests.conftest import load_config
  c = load_config("derm_cascade", "smoke")
  from synth_med.experiments.study import validate
  with c.unlocked():
    c.tune.grid = "train.optimizer.learning_rate=0.1"
  with pytest.raises(SynthMedError, match="learning_rate"):
    validate(c)
  with c.unlocked():
    c.tune.grid = ""
    c.tune.method = "nope"
  with pytest.raises(SynthMedError, match="tune.method='nope'"):
    validate(c)


def test_condition_fidelity_probe_tells_a_faithful_generator_from_one_that_ignores_the_property():
  from synth_med.evaluation.condition_fidelity import fidelity, fit_probes
  rng = np.random.default_rng(0)

  def images(attr, label):  # the property sets the brightness, the label a bright square's position
    x = rng.normal(60 + 120 * attr[:, None, None, None], 20, (len(attr), 16, 16, 3))
    for i, y in enumerate(label):
      x[i, 4 * y:4 * y + 4, 4:8] += 60
    return np.clip(x, 0, 255).astype(np.uint8)

  n = 400
  attr, label = rng.integers(0, 2, n), rng.integers(0, 3, n)
  real = {"image": images(attr, label), "label": np.eye(3)[label], "attrs/sex": attr.astype(np.int32)}
  probes = fit_probes(real, "sex")
  assert probes["sex"]["real_heldout"] > 0.95 and probes["label"]["real_heldout"] > 0.8
  asked, asked_label = rng.integers(0, 2, 200), rng.integers(0, 3, 200)
  faithful = {"image": images(asked, asked_label), "label": np.eye(3)[asked_label], "attrs/sex": asked.astype(np.int32)}
  ignoring = dict(faithful, image=images(np.zeros(200, int), asked_label))  # always renders value 0
  good, bad = fidelity(probes, faithful, "sex"), fidelity(probes, ignoring, "sex")
  assert good["sex"]["synthetic_as_requested"] > 0.95 and good["label"]["synthetic_as_requested"] > 0.8
  assert 0.3 < bad["sex"]["synthetic_as_requested"] < 0.7
  assert bad["sex"]["synthetic_per_value"][0] > 0.95 and bad["sex"]["synthetic_per_value"][1] < 0.05
  label_only = dict(faithful, **{"attrs/sex": np.full(200, -1, np.int32)})
  assert fidelity(probes, label_only, "sex")["sex"]["synthetic_as_requested"] is None


def test_condition_fidelity_scores_a_binary_label():
  """A single binary column (the tissue world's tumour label) is probed as label >= 0.5, not argmax
  (always 0), and a binary 0 still counts as labelled."""
  from synth_med.evaluation.condition_fidelity import fidelity, fit_probes
  rng = np.random.default_rng(1)

  def images(tumour):  # tumour tissue is darker
    return np.clip(rng.normal(180 - 100 * tumour[:, None, None, None], 20, (len(tumour), 8, 8, 3)), 0, 255
                   ).astype(np.uint8)

  y = rng.integers(0, 2, 300)
  real = {"image": images(y), "label": y[:, None].astype(np.float32), "labelled": np.ones(300, bool),
          "attrs/hospital": rng.integers(0, 3, 300).astype(np.int32)}
  probes = fit_probes(real, "hospital")
  assert probes["label"]["real_heldout"] > 0.95
  asked = rng.integers(0, 2, 100)
  faithful = {"image": images(asked), "label": asked[:, None].astype(np.float32), "labelled": np.ones(100, bool),
              "attrs/hospital": np.full(100, -1, np.int32)}
  flipped = dict(faithful, image=images(1 - asked))
  assert fidelity(probes, faithful, "hospital")["label"]["synthetic_as_requested"] > 0.95
  assert fidelity(probes, flipped, "hospital")["label"]["synthetic_as_requested"] < 0.05
  assert fidelity(probes, faithful, "hospital")["label"]["n_synthetic_scored"] == 100


def test_label_classes_binary_multi_hot_and_unlabelled_rows():
  from synth_med.evaluation.condition_fidelity import label_classes
  classes, ok = label_classes({"label": np.array([[0.0], [1.0], [1.0]]), "labelled": np.array([True, True, False])})
  assert classes.tolist() == [0, 1, 1] and ok.tolist() == [True, True, False]  # a binary 0 is a class
  multi = np.array([[0, 1, 1], [0, 0, 0], [1, 0, 0]], np.float32)  # the middle row has no finding
  classes, ok = label_classes({"label": multi, "labelled": np.ones(3, bool)})
  assert classes.tolist()[::2] == [1, 0] and ok.tolist() == [True, False, True]


def test_tuning_picks_the_best_mean_over_seeds_not_the_best_single_run(tmp_path, monkeypatch):
  """tune.seeds = 3 (the cascade CPU defaults): lr 0.1 has the single best run, lr 0.01 the best mean."""
  from ml_collections import ConfigDict

  from synth_med.experiments import tuning
  from synth_med.infra import artifacts
  val_top3 = {(0.01, 7): 0.50, (0.01, 8): 0.52, (0.01, 9): 0.54,   # mean 0.52
              (0.1, 7): 0.60, (0.1, 8): 0.40, (0.1, 9): 0.41}      # mean 0.47, best single run
  seen = []

  def fake_run(c, folder):
    seen.append((float(c.train.optimizer.lr), int(c.seed)))
    return {"splits": {"val": {"overall": {"top3": val_top3[seen[-1]]}}}}

  monkeypatch.setattr(tuning, "run_classifier", fake_run)
  config = ConfigDict({"seed": 7, "tune": {"grid": "train.optimizer.lr=0.01|0.1", "method": "real",
                                           "split": "val", "metric": "top3", "seeds": 3}})
  make = lambda method, seed: ConfigDict({"seed": seed, "train": {"optimizer": {"lr": 0.03}}})  # noqa: E731
  assert tuning.run_tuning(config, str(tmp_path), make) is False
  assert sorted(seen) == sorted(val_top3)  # every lr on seeds 7, 8, 9
  best = tuning.read_best(str(tmp_path))
  assert best == {"train.optimizer.lr": 0.01}
  summary = artifacts.read_json(tuning.best_path(str(tmp_path)))
  assert [round(p["mean"], 6) for p in summary["points"]] == [0.52, 0.47]


def test_fair_sampler_draws_a_value_seen_only_in_unlabelled_data_and_refuses_an_unseen_one():
  from configs import common
  from synth_med.data.sources import make_world
  from synth_med.diffusion.fair_sampler import known_values
  from synth_med.experiments.synthetic_store import labelled_training_data, property_pool
  data = common.data_config("skin", 16)
  data.train_size, data.unlabelled_size = 300, 200
  data.skew.cap = 0  # no labelled male example at all; the unlabelled pool keeps its men
  world = make_world(data)
  labelled = labelled_training_data(world)
  assert set(np.unique(labelled["attrs/sex"])) == {0}
  pool = property_pool(world, "sex")
  assert pool == [0, 1]
  cond = fair_conditions(labelled, "softmax", 400, 0, "label_property", "sex", ("sex", "age_bucket", "skin_tone"),
                         draw_values=pool)
  assert abs(int((cond["attrs/sex"] == 1).sum()) - 200) <= 27  # uniform within each of the 27 labels (+-1)
  # Without the unlabelled pool the labelled data alone would never ask for a man.
  only_labelled = fair_conditions(labelled, "softmax", 400, 0, "label_property", "sex",
                                  ("sex", "age_bucket", "skin_tone"))
  assert set(np.unique(only_labelled["attrs/sex"])) == {0}
  # A requested value must have been seen; one that never was stops with the choices.
  assert property_pool(world, "sex", (1,)) == [1]
  with pytest.raises(SynthMedError, match=r"\['other'\].*never learnt them; choose from \['female', 'male'\]"):
    known_values(np.array([0, 0]), np.array([1, -1]), requested=(2,), value_names=("female", "male", "other"))


def test_tuning_widens_an_edge_winner_and_doubles_steps_until_the_score_stops_gaining(tmp_path, monkeypatch):
  """A stand-in classifier whose validation top-3 peaks at lr = 0.3 and saturates with steps: the grid
  0.01|0.03|0.09 widens to 0.27 (edge winner), then to 0.81 (still the edge), and stops with 0.27 inside;
  then steps double from 100 while the score gains >= tune.plateau: 200 gains, 400 gains, 800 does not,
  so the classifiers train 400 steps."""
  import math

  from synth_med.experiments import tuning
  from tests.conftest import load_config
  config = load_config("derm_cascade", "smoke")
  with config.unlocked():
    config.tune.grid = "train.optimizer.lr=0.01|0.03|0.09"
    config.tune.converge, config.tune.plateau, config.tune.widen, config.tune.seeds = True, 0.01, 3, 2
    config.classifier.train.steps = 100
  runs = []

  def fake_run(c, folder):
    lr, steps = c.train.optimizer.lr, c.train.steps
    runs.append((lr, steps, c.seed))
    top3 = (0.8 - 0.1 * abs(math.log10(lr / 0.3))) * (1 - math.exp(-steps / 60))
    return {"splits": {"val": {"overall": {"top3": top3}}}}

  monkeypatch.setattr(tuning, "run_classifier", fake_run)
  from synth_med.experiments.study import classifier_config
  tuning.run_tuning(config, str(tmp_path), lambda m, s: classifier_config(config, str(tmp_path), m, s))
  best = tuning.artifacts.read_json(tuning.best_path(str(tmp_path)))
  lrs = [r["overrides"]["train.optimizer.lr"] for r in best["points"]]
  assert lrs == [0.01, 0.03, 0.09, 0.27, 0.81, 0.27, 0.27, 0.27]
  assert [r["overrides"].get("train.steps") for r in best["points"]][5:] == [200, 400, 800]
  assert best["widenings"] == 2 and not best["on_grid_edge"]
  # Gains of the winner (0.795 x (1 - e^(-steps/60))): 100 -> 200 0.12, 200 -> 400 0.027, 400 -> 800 0.001.
  assert best["overrides"] == {"train.optimizer.lr": 0.27, "train.steps": 400}
  assert best["steps"] == 400 and best["doublings"] == 3 and not best["steps_on_grid_edge"]
  assert len(runs) == 2 * len(best["points"])  # 2 seeds per point


def test_guidance_is_chosen_on_the_validation_probe_and_kept(tmp_path):
  """A stand-in generator that renders the requested label and sex at w = 2 (a real training image of
  that label and sex) and a grey square at w = 0: the probe-based choice is w = 2, written once."""
  import json
  from types import SimpleNamespace

  from configs import common
  from synth_med.data.pipeline import WorldSource, materialise
  from synth_med.data.sources import make_world
  from synth_med.experiments.synthetic_store import choose_guidance, labelled_training_data, property_pool
  data = common.data_config("skin", 16)
  data.train_size, data.val_size, data.unlabelled_size = 1500, 400, 100
  world = make_world(data)
  train = materialise(WorldSource(world, world.split("train")), "train").arrays
  keys = np.argmax(train["label"], -1)
  calls = []

  def generate(cond, seed=0, guidance=0.0):
    calls.append(guidance)
    if guidance == 0.0:
      return np.full((len(cond["label"]), 16, 16, 3), 128, np.uint8)
    out = []
    for y, a in zip(np.argmax(cond["label"], -1), cond["attrs/sex"]):
      rows = np.flatnonzero((keys == y) & (train["attrs/sex"] == a))
      rows = rows if len(rows) else np.flatnonzero(keys == y)
      out.append(train["image"][rows[0]])
    return np.stack(out)

  gen = SimpleNamespace(cond_spec=SimpleNamespace(attributes=(("sex", 2),)), generate=generate)
  path = str(tmp_path / "guidance.json")
  args = (gen, world, labelled_training_data(world), property_pool(world, "sex"), "sex", (0.0, 2.0), 120, 0, path)
  assert choose_guidance(*args) == 2.0 and calls == [0.0, 2.0]
  table = json.loads(open(path).read())
  assert table["chosen"] == 2.0 and table["probe"] == "val split"
  assert table["points"][1]["label"] > table["points"][0]["label"]
  assert choose_guidance(*args) == 2.0 and calls == [0.0, 2.0]  # read back, nothing regenerated
