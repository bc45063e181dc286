"""The shared training loop: learning, resume equality, NaN guard, checkpoints, writers."""
import glob
import os

import jax
import numpy as np
import pytest

from synth_med.data.pipeline import ArraySource, TrainStream
from synth_med.errors import SynthMedError
from synth_med.train.loop import train
from tests.conftest import LinearTask, loop_config, toy_arrays


def _stream(batch=16, seed=0):
  return TrainStream(ArraySource(toy_arrays(96)), batch, seed=seed, num_threads=0)


def test_loss_goes_down_and_outputs_exist(tmp_path):
  cfg = loop_config(steps=40, lr=2.0)
  cfg.train.log_every = 5
  res = train(LinearTask(), cfg, _stream(), str(tmp_path))
  params = jax.device_get(res.state.params)
  arr = toy_arrays(96)
  x = arr["image"].reshape(96, -1).astype(np.float32) / 255.0
  acc = ((x @ params["w"] + params["b"]).argmax(1) == arr["label"].argmax(1)).mean()
  assert acc > 0.9  # well above chance (1/3)
  assert int(res.state.step) == 40
  assert os.path.isdir(tmp_path / "checkpoints" / "40")
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))


def test_loss_decreases(tmp_path):
  cfg = loop_config(steps=30, lr=1.0)
  task = LinearTask()
  stream = _stream()
  first = jax.device_get(task.loss(task.init(jax.random.key(0), stream.batch(0)), stream.batch(0),
                                   jax.random.key(0))[0])
  res = train(task, cfg, stream, str(tmp_path))
  last = jax.device_get(task.loss(res.state.params, stream.batch(0), jax.random.key(0))[0])
  assert last < 0.5 * first


class _Crash(Exception):
  pass


def test_killed_run_resumes_to_identical_params(tmp_path):
  cfg = loop_config(steps=10)
  cfg.train.checkpoint_every = 4
  full = train(LinearTask(), cfg, _stream(), str(tmp_path / "full"))

  def crash(step, state):
    if step == 6:  # after the checkpoint at step 4, before the one at 8
      raise _Crash()

  with pytest.raises(_Crash):
    train(LinearTask(), cfg, _stream(), str(tmp_path / "killed"), hooks=[crash])
  resumed = train(LinearTask(), cfg, _stream(), str(tmp_path / "killed"))
  assert resumed.start_step == 4
  for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_finished_run_is_not_retrained(tmp_path):
  cfg = loop_config(steps=4)
  train(LinearTask(), cfg, _stream(), str(tmp_path))
  again = train(LinearTask(), cfg, _stream(), str(tmp_path))
  assert again.start_step == 4 and int(again.state.step) == 4


class NaNTask(LinearTask):
  """The loss becomes NaN from step 6 on (the learning rate explodes it)."""

  def loss(self, params, batch, rng):
    loss, m = super().loss(params, batch, rng)
    bad = jax.numpy.sum(params["b"]) > 1e30
    return jax.numpy.where(bad, jax.numpy.nan, loss), m


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  cfg = loop_config(steps=20, lr=1e38)
  cfg.train.checkpoint_every = 1
  cfg.train.log_every = 100
  with pytest.raises(SynthMedError, match=r"loss became nan at step \d+.*last good checkpoint is step"):
    train(NaNTask(), cfg, _stream(), str(tmp_path))
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(str(tmp_path / "checkpoints" / "[0-9]*")))
  assert steps, "the last good checkpoint must be kept"


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  os.chmod(ro, 0o500)
  if os.access(ro, os.W_OK):  # running as root: use a path under a regular file instead
    target = tmp_path / "file"
    target.write_text("x")
    workdir = str(target / "sub")
  else:
    workdir = str(ro / "sub")
  with pytest.raises(SynthMedError, match="writable"):
    train(LinearTask(), loop_config(steps=2), _stream(), workdir)


def test_ema_decay_warms_up_to_its_value():
  from synth_med.train.step import ema_decay_at
  # (1 + s) / (10 + s): 0.1 at step 0, 0.5 at step 8, capped by the configured decay.
  assert float(ema_decay_at(0, 0.995)) == pytest.approx(0.1)
  assert float(ema_decay_at(8, 0.995)) == pytest.approx(0.5)
  assert float(ema_decay_at(8, 0.3)) == pytest.approx(0.3)
  assert float(ema_decay_at(10_000, 0.995)) == pytest.approx(0.995)
  assert float(ema_decay_at(5, 0.0)) == 0.0  # no EMA (classifiers): EMA params = params


def test_ema_follows_its_formula_step_by_step():
  """e_0 = p_0; e_{s+1} = d_s e_s + (1 - d_s) p_{s+1} with d_s = min(decay, (1 + s) / (10 + s))."""
  import optax
  from synth_med.train import state as state_lib
  from synth_med.train.step import make_train_step
  task, decay = LinearTask(), 0.9
  batches = [b for _, b in zip(range(30), _stream().iterate(0))]
  params = task.init(jax.random.key(0), batches[0])
  tx = optax.sgd(0.5)
  state = state_lib.create(params, tx, jax.random.key(1))
  step = jax.jit(make_train_step(task, tx, optax.constant_schedule(0.5), decay))
  expected = np.asarray(params["w"], np.float64)
  for s, batch in enumerate(batches):
    state, _ = step(state, batch)
    d = min(decay, (1 + s) / (10 + s))
    expected = d * expected + (1 - d) * np.asarray(state.params["w"], np.float64)
    np.testing.assert_allclose(state.ema_params["w"], expected, rtol=1e-4, atol=1e-6)
  # After 30 steps the EMA lags the raw weights, and decay 0 would make it equal them.
  assert not np.allclose(state.ema_params["w"], state.params["w"], atol=1e-4)
