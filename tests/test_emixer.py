"""Paper 003's EMIXER networks and task (models/emixer.py, objectives/emixer.py): spectral normalisation,
the task on the loop (finite losses, D:G updates 2:1, resume)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from synth_med.data import reports
from synth_med.data.pipeline import ArraySource, TrainStream
from synth_med.models import emixer
from synth_med.objectives.emixer import EmixerTask
from synth_med.train.loop import train
from tests.conftest import assert_trees_equal, killed_and_resumed, loop_config

TEXTS = ["findings: the upper half is bright.", "findings: the lower half is bright."]
VOCAB = reports.Vocabulary.build(TEXTS)


def test_spectral_normalisation_gives_unit_largest_singular_value():
  w = jax.random.normal(jax.random.key(0), (3, 3, 8, 16))
  sigma = np.linalg.svd(np.asarray(emixer.spectral_normalise(w, iterations=50)).reshape(-1, 16), compute_uv=False)
  assert sigma[0] == pytest.approx(1.0, rel=1e-3)


def _arrays(n, seed):
  """Two classes: a bright upper or lower half, each with its report."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, n)
  x = rng.normal(60, 20, (n, 16, 16, 1))
  rows = np.arange(16)[None, :, None, None]
  x = np.clip(x + 140 * np.where(y[:, None, None, None] == 0, rows < 8, rows >= 8), 0, 255).astype(np.uint8)
  return {"image": x, "report": VOCAB.encode([TEXTS[k] for k in y], 12), "label": np.eye(2, dtype=np.float32)[y],
          "label_mask": np.ones((n, 2), np.float32), "labelled": rng.random(n) < 0.5}  # half unlabelled


def _task_and_config(steps):
  model = emixer.Model(16, 1, 2, len(VOCAB), z_dim=16, width=8, sentences=2, words=8, hidden=16, word_layers=1)
  task = EmixerTask(model, VOCAB.index["."], VOCAB.index[reports.EOS])
  cfg = loop_config(steps=steps, batch=16)
  adam = ConfigDict({"name": "adam", "lr": 1e-3, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                     "grad_clip": 0.0, "b1": 0.0, "b2": 0.999})
  cfg.train.optimizer = ConfigDict({**adam.to_dict(), "every_k_steps": 2})  # 003's D:G = 2:1
  cfg.train.critic_optimizer = adam
  cfg.train.checkpoint_every = 2
  return task, cfg


def test_every_k_steps_updates_once_per_k_steps_with_the_mean_gradient():
  """003's D:G = 2:1: the generator's optimizer (`every_k_steps: 2`) leaves its parameters alone on the
  first step and applies the mean of both steps' gradients on the second."""
  from synth_med.train.optimizers import make_optimizer
  cfg = ConfigDict({"name": "sgd", "lr": 0.1, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                    "grad_clip": 0.0, "every_k_steps": 2})
  tx, _ = make_optimizer(cfg, 10)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  u1, state = tx.update({"w": jnp.full(3, 2.0)}, state, params)
  u2, state = tx.update({"w": jnp.full(3, 4.0)}, state, params)
  np.testing.assert_allclose(u1["w"], 0.0)
  np.testing.assert_allclose(u2["w"], -0.1 * 3.0)


def test_emixer_trains_on_the_loop_with_finite_networks(tmp_path):
  """Half the images unlabelled (003's semi-supervised setting): 4 steps run and every network stays finite."""
  task, cfg = _task_and_config(4)
  result = train(task, cfg, TrainStream(ArraySource(_arrays(64, 0)), 16, seed=0, num_threads=0), str(tmp_path))
  assert set(result.state.params) == {"generator", "decoder", "d_image", "d_report", "d_joint"}
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result.state.params))


def test_a_killed_emixer_run_resumes_to_the_same_networks(tmp_path):
  task, cfg = _task_and_config(6)
  stream = lambda: TrainStream(ArraySource(_arrays(64, 0)), 16, seed=0, num_threads=0)  # noqa: E731
  full = train(task, cfg, stream(), str(tmp_path / "full"))
  resumed = killed_and_resumed(task, cfg, stream, str(tmp_path / "killed"), kill_at=3)
  assert resumed.start_step == 2
  assert_trees_equal(full.state.params, resumed.state.params)
  images, blocks = task.generate(full.state.params, jax.random.normal(jax.random.key(1), (3, 16)),
                                 jnp.eye(2)[jnp.array([0, 1, 0])])
  assert images.shape == (3, 16, 16, 1) and blocks.shape == (3, 2, 8) and np.isfinite(np.asarray(images)).all()


@pytest.mark.slow
def test_the_joint_discriminator_scores_matching_pairs_above_mismatched_ones(tmp_path):
  """After 200 EMIXER steps on the 2-class toy (half the labels), D_joint scores a held-out image with its
  own report above the same image with the other class's report (all pairs; chance 1/2)."""
  model = emixer.Model(16, 1, 2, len(VOCAB), z_dim=16, width=16, sentences=2, words=8, hidden=32, word_layers=1)
  task = EmixerTask(model, VOCAB.index["."], VOCAB.index[reports.EOS])
  cfg = loop_config(steps=200, batch=32)
  adam = ConfigDict({"name": "adam", "lr": 1e-3, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                     "grad_clip": 0.0, "b1": 0.0, "b2": 0.999})
  cfg.train.optimizer = ConfigDict({**adam.to_dict(), "every_k_steps": 2})
  cfg.train.critic_optimizer = adam
  cfg.train.checkpoint_every = 1000
  result = train(task, cfg, TrainStream(ArraySource(_arrays(256, 0)), 32, seed=0, num_threads=0), str(tmp_path))
  test = _arrays(128, 5)
  x, _, _, _, words = task._inputs({k: jnp.asarray(v) for k, v in test.items()})
  y = test["label"].argmax(1)
  other = np.where(y[:, None] == y[None, :], -1, np.arange(128)[None, :]).max(1)  # an image of the other class
  d = lambda w: np.asarray(model.d_joint.apply({"params": result.state.params["d_joint"]}, x, w))  # noqa: E731
  assert np.mean(d(words) > d(words[other])) > 0.9
