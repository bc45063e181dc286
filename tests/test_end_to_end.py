"""End to end: the real launch/main.py on each world's :smoke config, and a model beating chance."""
import json
import os

import numpy as np
import pytest

from synth_med.experiments.classifier import run_classifier
from tests.conftest import load_config
from tests.test_cli import run_main


@pytest.mark.slow
@pytest.mark.parametrize("name", ["derm_classifier", "cxr_classifier", "histo_classifier"])
def test_main_smoke_run_writes_everything(name, tmp_path):
  workdir = tmp_path / name
  r = run_main(f"--config=configs/{name}.py:smoke", f"--workdir={workdir}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "train:" in r.stdout and "wrote" in r.stdout
  m = json.loads((workdir / "metrics.json").read_text())
  assert (workdir / "DONE").exists() and (workdir / "config.json").exists()
  assert (workdir / "train_examples.png").stat().st_size > 100
  assert os.listdir(workdir / "checkpoints")
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
  splits = m["splits"]
  if name == "derm_classifier":
    assert set(splits) == {"val", "id", "ood1", "ood2"}
    for s in ("id", "ood1", "ood2"):
      o = splits[s]["overall"]
      assert {"top1", "top3", "balanced_top3", "high_risk_sensitivity"} <= set(o)
      assert {"sex", "age_bucket"} <= set(splits[s]["groups"])
    assert "skin_tone" in splits["id"]["gaps"]
    assert "top3" in splits["id"]["gaps"]["sex"] and "female" in splits["id"]["beta_posterior"]["sex"]
  elif name == "cxr_classifier":
    assert set(splits) == {"val", "id", "ood1"}
    assert "auc/Cardiomegaly" in splits["id"]["overall"] and "mean_auc" in splits["ood1"]["gaps"]["sex"]
  else:
    assert set(splits) == {"val", "id", "h1", "h2"}
    assert "accuracy" in splits["id"]["gaps"]["hospital"]
  # A rerun skips the finished stage.
  r2 = run_main(f"--config=configs/{name}.py:smoke", f"--workdir={workdir}")
  assert r2.returncode == 0 and "skipping" in r2.stdout


@pytest.mark.slow
def test_trained_tissue_classifier_beats_chance(tmp_path):
  c = load_config("histo_classifier", "smoke")
  with c.unlocked():
    c.train.steps = 200
    c.train.batch_size = 32
    c.train.optimizer.lr = 3e-3
    c.data.skew.setting = "none"
    c.train.checkpoint_every = 200
    c.data.train_size = 1000
    c.eval.bootstrap = 0
  m = run_classifier(c, str(tmp_path))
  assert m["splits"]["id"]["overall"]["accuracy"] > 0.72  # chance is ~0.5
  assert m["splits"]["id"]["overall"]["auc"] > 0.8


@pytest.mark.slow
def test_skew_hurts_the_under_represented_hospitals(tmp_path):
  """The tissue world is built so that capping hospitals 3 and 4 costs accuracy on them
  (their stains differ from hospital 0's), more than it costs on hospital 0."""
  acc = {}
  for setting in ("none", "most"):
    c = load_config("histo_classifier", "smoke")
    with c.unlocked():
      c.data.image_size, c.data.train_size, c.data.test_size = 32, 1500, 600
      c.train.steps, c.train.batch_size, c.train.optimizer.lr = 300, 32, 3e-3
      c.train.checkpoint_every = 300
      c.data.skew.setting = setting
      c.eval.bootstrap = 0
    m = run_classifier(c, str(tmp_path / setting))
    groups = m["splits"]["id"]["groups"]["hospital"]
    acc[setting] = {h: groups[h]["accuracy"]["value"] for h in groups}
  minority = {s: np.mean([acc[s]["h3"], acc[s]["h4"]]) for s in acc}
  minority_drop = minority["none"] - minority["most"]
  majority_drop = acc["none"]["h0"] - acc["most"]["h0"]
  assert minority_drop > 0.02 and minority_drop > majority_drop, acc


class _Killed(Exception):
  pass


def _final_params(workdir, step):
  import jax
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "default"))
  return [np.asarray(x) for x in jax.tree.leaves(restored)]


def test_killed_classifier_stage_resumes_to_the_same_result(tmp_path, monkeypatch):
  """The real classifier stage (grain pipeline, augmentation, BiT) killed mid-run and restarted."""
  import synth_med.experiments.classifier as clf
  c = load_config("derm_classifier", "smoke")
  with c.unlocked():
    c.train.steps, c.train.checkpoint_every = 8, 4
    c.eval.bootstrap = 0
  full = run_classifier(c, str(tmp_path / "full"))
  real_train = clf.train

  def killed_train(task, config, stream, workdir, hooks=(), mesh=None):
    def kill(step, state):
      if step == 6:
        raise _Killed()
    return real_train(task, config, stream, workdir, hooks=list(hooks) + [kill], mesh=mesh)

  monkeypatch.setattr(clf, "train", killed_train)
  with pytest.raises(_Killed):
    run_classifier(c, str(tmp_path / "killed"))
  assert not (tmp_path / "killed" / "DONE").exists()
  monkeypatch.setattr(clf, "train", real_train)
  resumed = run_classifier(c, str(tmp_path / "killed"))
  for a, b in zip(_final_params(str(tmp_path / "full"), 8), _final_params(str(tmp_path / "killed"), 8)):
    np.testing.assert_array_equal(a, b)
  assert resumed["splits"]["id"]["overall"] == full["splits"]["id"]["overall"]


@pytest.mark.slow
def test_classifier_starts_from_a_local_bit_checkpoint(tmp_path):
  """model.pretrained_npz: backbone weights come from the file, the head is new."""
  import jax
  import jax.numpy as jnp

  from synth_med.data.sources import make_world
  from synth_med.experiments.classifier import build_model
  from tests.test_bit_resnet import _write_bit_npz
  c = load_config("derm_classifier", "smoke")
  spec = make_world(c.data).spec
  model = build_model(c, spec)
  params = model.init(jax.random.key(5), jnp.zeros((1, 16, 16, 3)))["params"]
  npz = str(tmp_path / "BiT-smoke.npz")
  written = _write_bit_npz(npz, params)
  with c.unlocked():
    c.model.pretrained_npz = npz
    c.train.steps, c.train.checkpoint_every = 1, 1
    c.train.optimizer.lr, c.train.optimizer.warmup_steps = 1e-12, 0
    c.eval.bootstrap = 0
  run_classifier(c, str(tmp_path / "run"))
  import orbax.checkpoint as ocp
  state = ocp.StandardCheckpointer().restore(str(tmp_path / "run" / "checkpoints" / "1" / "default"))
  got = np.asarray(state["params"]["block1"]["unit01"]["b"]["standardized_conv2d"]["kernel"])
  np.testing.assert_allclose(got, written["resnet/block1/unit01/b/standardized_conv2d/kernel"], atol=1e-6)
  assert np.abs(np.asarray(state["params"]["head"]["kernel"])).max() < 1e-6  # zero-initialised head


@pytest.mark.slow
def test_equal_classifier_runs_share_one_jitted_step_and_match_a_fresh_run(tmp_path, monkeypatch):
  """train.jit_cache: a second equal run traces nothing new, and trains exactly as an unshared run."""
  from synth_med.train import jit_cache
  c = load_config("derm_classifier", "smoke")
  with c.unlocked():
    c.train.steps, c.train.checkpoint_every = 4, 4
    c.eval.bootstrap = 0
  jit_cache.clear()
  built = []
  real_shared = jit_cache.shared
  monkeypatch.setattr(jit_cache, "shared", lambda key, build: real_shared(key, lambda: built.append(key) or build()))
  run_classifier(c, str(tmp_path / "first"))
  first_builds = len(built)
  assert {k[0] for k in built} >= {"abstract", "init", "step", "predict"}
  shared = run_classifier(c, str(tmp_path / "shared"))
  assert len(built) == first_builds  # nothing new was traced
  with c.unlocked():
    c.loss.name = "focal"
  run_classifier(c, str(tmp_path / "focal"))
  assert len(built) > first_builds  # another loss is another step
  with c.unlocked():
    c.loss.name = "ce"
  jit_cache.clear()
  fresh = run_classifier(c, str(tmp_path / "fresh"))
  for a, b in zip(_final_params(str(tmp_path / "shared"), 4), _final_params(str(tmp_path / "fresh"), 4)):
    np.testing.assert_array_equal(a, b)
  assert shared["splits"]["id"]["overall"] == fresh["splits"]["id"]["overall"]
