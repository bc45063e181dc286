"""Mesh construction, regex sharding rules, and 8-device vs 1-device equality."""
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from synth_med.errors import SynthMedError
from synth_med.infra import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mesh_fills_minus_one_and_rejects_bad_shapes():
  mesh = sharding.make_mesh({"data": -1, "model": 1})
  assert mesh.shape["data"] == len(jax.devices())
  with pytest.raises(SynthMedError, match="needs 3 devices"):
    sharding.make_mesh({"data": 3, "model": 1}, devices=jax.devices()[:1])
  with pytest.raises(SynthMedError, match="'data' axis"):
    sharding.make_mesh({"model": -1})
  with pytest.raises(SynthMedError, match="at most one -1"):
    sharding.make_mesh({"data": -1, "model": -1})


def test_regex_rules_first_match_and_divisibility():
  mesh = sharding.make_mesh({"data": 1, "model": -1}, devices=jax.devices()[:1])
  tree = {"params": {"head": {"kernel": np.zeros((4, 6))}, "conv": {"kernel": np.zeros((3, 3))}},
          "count": np.zeros(())}
  sh = sharding.tree_shardings(tree, mesh, [("head/kernel", (None, "model")), ("kernel", ("data",))])
  assert tuple(sh["params"]["head"]["kernel"].spec) == (None, "model")
  assert tuple(sh["params"]["conv"]["kernel"].spec) == ("data",)
  assert tuple(sh["count"].spec) == ()
  with pytest.raises(SynthMedError, match="names mesh axis 'expert'"):
    sharding.tree_shardings(tree, mesh, [("head", (None, "expert"))])
  with pytest.raises(SynthMedError, match="invalid"):
    sharding.tree_shardings(tree, mesh, [("head[", (None,))])


_EIGHT = textwrap.dedent("""
  import os, sys, json, tempfile
  sys.path.insert(0, {root!r})
  import jax, numpy as np
  assert len(jax.devices()) == 8, jax.devices()
  from synth_med.data.pipeline import ArraySource, TrainStream
  from synth_med.train.loop import train
  from synth_med.infra import sharding
  from tests.conftest import LinearTask, loop_config, toy_arrays
  out = {{}}
  for name, devs, mesh_cfg, rules in [
      ("one", jax.devices()[:1], {{"data": 1, "model": 1}}, ()),
      ("eight", jax.devices(), {{"data": 8, "model": 1}}, ()),
      ("four_by_two", jax.devices(), {{"data": 4, "model": 2}}, (("w$", (None, "model")),))]:
    cfg = loop_config(steps=6, batch=16)
    cfg.sharding_rules = rules
    cfg.train.log_every = 1
    mesh = sharding.make_mesh(mesh_cfg, devices=devs)
    task = LinearTask(num_classes=4)
    stream = TrainStream(ArraySource(toy_arrays(96, k=4)), 16, seed=0, num_threads=0)
    res = train(task, cfg, stream, tempfile.mkdtemp(), mesh=mesh)
    b = sharding.to_global(stream.batch(6), mesh)
    loss = float(jax.jit(task.loss)(res.state.params, b, jax.random.key(0))[0])
    out[name] = {{"loss": loss, "w": np.asarray(res.state.params["w"]).tolist(),
                  "spec": str(res.state.params["w"].sharding.spec)}}
  from synth_med.errors import SynthMedError
  try:
    sharding.check_batch_size(12, sharding.make_mesh({{"data": 8, "model": 1}}))
    out["bad_batch_error"] = ""
  except SynthMedError as e:
    out["bad_batch_error"] = str(e)
  print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_eight_device_mesh_matches_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _EIGHT.format(root=ROOT)], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0]
  out = json.loads(line[len("RESULT"):])
  assert abs(out["one"]["loss"] - out["eight"]["loss"]) < 1e-5
  assert abs(out["one"]["loss"] - out["four_by_two"]["loss"]) < 1e-5
  np.testing.assert_allclose(out["one"]["w"], out["eight"]["w"], atol=1e-5)
  assert "model" in out["four_by_two"]["spec"]  # the regex rule really sharded the weights
  assert "must be divisible" in out["bad_batch_error"]


_EIGHT_GAN = textwrap.dedent("""
  import sys, json, tempfile
  sys.path.insert(0, {root!r})
  import jax, numpy as np
  from synth_med.data.pipeline import ArraySource, TrainStream
  from synth_med.infra import sharding
  from synth_med.models import prog_gan
  from synth_med.objectives.gan import GANTask
  from synth_med.train.loop import train
  from tests.test_gan import _gan_config, _toy
  out = {{}}
  for name, devs, data in [("one", jax.devices()[:1], 1), ("eight", jax.devices(), 8)]:
    task = GANTask(prog_gan.Model(16, 1, 2, z_dim=8, base_channels=8, max_channels=16, start_size=8), "softmax",
                   phase_steps=2)
    stream = TrainStream(ArraySource(_toy(64)), 16, seed=0, num_threads=0)
    res = train(task, _gan_config(5), stream, tempfile.mkdtemp(),
                mesh=sharding.make_mesh({{"data": data, "model": 1}}, devices=devs))
    out[name] = [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(res.state.params["generator"])]
  print("RESULT" + json.dumps(out))
""")


_EIGHT_IDS = textwrap.dedent("""
  import sys, json, tempfile
  sys.path.insert(0, {root!r})
  import jax, numpy as np
  from synth_med.data.mixing import MixedStream, classifier_arrays
  from synth_med.infra import sharding
  from synth_med.models import bit_resnet
  from synth_med.objectives.classification import ClassifierTask
  from synth_med.objectives.learnt_weights import LearntWeightsTask
  from synth_med.train.loop import train
  from tests.test_learnt_weights import K, _arrays, _quadrants, _weighting_config
  out = {{}}
  for name, devs, data in [("one", jax.devices()[:1], 1), ("eight", jax.devices(), 8)]:
    model = bit_resnet.Model(num_outputs=K, depth=0, width=0.25, block_units=(1,), root_pool=False)
    task = LearntWeightsTask(ClassifierTask(model, "softmax"), K, method="ids", epoch_steps=2)
    stream = MixedStream(classifier_arrays(_arrays(*_quadrants(64, 0))), classifier_arrays(_arrays(*_quadrants(64, 1))),
                         0.5, 16, 0, 0)
    res = train(task, _weighting_config(5, 16), stream, tempfile.mkdtemp(),
                mesh=sharding.make_mesh({{"data": data, "model": 1}}, devices=devs))
    out[name] = [np.asarray(x).ravel().tolist() for x in jax.tree.leaves((res.state.params, res.state.statistics))]
  print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
@pytest.mark.parametrize("script", [_EIGHT_GAN, _EIGHT_IDS], ids=["prog_gan", "ids"])
def test_two_optimizer_tasks_on_eight_devices_match_one_device(script):
  """The tasks with two parameter groups shard like the other models: prog-GAN (growth, mini-batch stddev
  over the global batch, gradient penalty) and paper 004's IDS (classifier, weighting network and the
  epoch statistics, reduced over the global batch) trained 5 steps on an 8-device data mesh give one
  device's parameters."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script.format(root=ROOT)], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json
  out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0][len("RESULT"):])
  for a, b in zip(out["one"], out["eight"]):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
