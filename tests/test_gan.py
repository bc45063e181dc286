"""Paper 001's GANs (cpD-GAN, prog-GAN) on the shared loop: the projection head, the gradient penalty,
progressive growth, FID early stopping, learning a 2-class toy, and resume."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from synth_med.data.pipeline import ArraySource, TrainStream
from synth_med.errors import SynthMedError
from synth_med.models import cpd_gan, gan_layers, prog_gan
from synth_med.objectives.gan import GANTask, gradient_penalty, to_uint8
from synth_med.train.early_stopping import EarlyStopping
from synth_med.train.loop import StopTraining, train
from tests.conftest import assert_trees_equal, killed_and_resumed, loop_config


def test_projection_discriminator_adds_the_label_embedding_inner_product():
  """cpD-GAN's critic: D(x, y) = ψ(φ(x)) + ⟨embed(y), φ(x)⟩ (Miyato & Koyama), so it changes with y."""
  d = cpd_gan.Discriminator(image_size=16, base_channels=8, max_channels=16)
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 1))
  y0 = jnp.eye(3)[jnp.array([0, 1, 2, 0])]
  y1 = jnp.eye(3)[jnp.array([1, 2, 0, 2])]
  params = d.init(jax.random.key(1), x, y0)["params"]
  out0, uncond0, phi = d.apply({"params": params}, x, y0)
  out1, uncond1, _ = d.apply({"params": params}, x, y1)
  w = params["label_embed"]["kernel"] / np.sqrt(3)  # equalised learning rate, gain 1
  np.testing.assert_allclose(out0, uncond0 + jnp.sum((y0 @ w) * phi, -1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(uncond0, uncond1)  # the unconditional head ignores y
  assert np.abs(np.asarray(out0 - out1)).min() > 1e-4


def test_gradient_penalty_of_a_linear_critic():
  """∇ of x -> <w, x> is w everywhere, so the penalty is (‖w‖ - 1)²."""
  w = jax.random.normal(jax.random.key(0), (8, 8, 1))
  real = jax.random.normal(jax.random.key(1), (5, 8, 8, 1))
  fake = jax.random.normal(jax.random.key(2), (5, 8, 8, 1))
  gp = gradient_penalty(lambda x: jnp.sum(x * w, axis=(1, 2, 3)), real, fake, jax.random.key(3))
  np.testing.assert_allclose(gp, (np.linalg.norm(np.asarray(w)) - 1.0) ** 2, rtol=1e-5)


def test_cpd_generator_pixel_norm_follows_z_and_y():
  """001's Eq. 1: the normalised features are scaled and shifted from [z; y]; at initialisation γ = 1, β = 0."""
  norm = cpd_gan.ConditionalPixelNorm()
  a = jax.random.normal(jax.random.key(0), (2, 4, 4, 6))
  zy = jax.random.normal(jax.random.key(1), (2, 5))
  params = norm.init(jax.random.key(2), a, zy)["params"]
  np.testing.assert_allclose(norm.apply({"params": params}, a, zy), gan_layers.pixel_norm(a), rtol=1e-6)
  params = jax.tree.map(lambda p: p + 0.3, params)
  out = norm.apply({"params": params}, a, zy)
  gamma = zy @ params["gamma"]["kernel"] + params["gamma"]["bias"]
  beta = zy @ params["beta"]["kernel"] + params["beta"]["bias"]
  np.testing.assert_allclose(out, gan_layers.pixel_norm(a) * gamma[:, None, None] + beta[:, None, None], rtol=1e-5)


def test_progressive_growth_fades_resolutions_in():
  """prog-GAN from 8x8 to 32x32: at alpha 0 the output is the 8x8 image upsampled; the schedule fades
  each stage in over a phase after a phase at the lower resolution."""
  g = prog_gan.Generator(image_size=32, channels=1, base_channels=8, max_channels=16, start_size=8)
  z, y = jax.random.normal(jax.random.key(0), (2, 16)), jnp.eye(2)
  params = g.init(jax.random.key(1), z, y, jnp.ones(2))["params"]
  low = g.apply({"params": params}, z, y, jnp.zeros(2))
  blocks = np.asarray(low).reshape(2, 8, 4, 8, 4, 1)
  assert np.allclose(blocks, blocks[:, :, :1, :, :1])  # constant 4x4 blocks: an 8x8 image
  full = g.apply({"params": params}, z, y, jnp.ones(2))
  assert not np.allclose(low, full)
  alphas = [np.asarray(gan_layers.growth_alphas(s, 2, 10)) for s in (0, 9, 15, 20, 25, 35, 40, 99)]
  np.testing.assert_allclose(alphas, [[0, 0], [0, 0], [0.5, 0], [1, 0], [1, 0], [1, 0.5], [1, 1], [1, 1]])
  real = jax.random.normal(jax.random.key(2), (2, 32, 32, 1))
  np.testing.assert_allclose(gan_layers.blend_resolution(real, jnp.ones(2), 8), real, atol=1e-5)
  seen = gan_layers.blend_resolution(real, jnp.zeros(2), 8)
  np.testing.assert_allclose(gan_layers.downsample(gan_layers.downsample(seen)),
                             gan_layers.downsample(gan_layers.downsample(real)), rtol=1e-5, atol=1e-6)
  with pytest.raises(SynthMedError, match="start_size=12 must be a power of 2"):
    prog_gan.growth_stages(32, 12)
  with pytest.raises(SynthMedError, match="must be a power of 2 >= 8"):
    cpd_gan.Model(24, 1, 2)


def test_early_stopping_stops_at_the_planted_minimum():
  """A scripted FID sequence with its minimum at the 4th evaluation: stop two evaluations later, keep the 4th."""
  fids = [90.0, 60.0, 41.0, 33.0, 35.0, 34.0, 20.0]
  stopper = EarlyStopping(patience=2, min_steps=0)
  stopped_at = next(100 * (k + 1) for k, v in enumerate(fids) if stopper.update(100 * (k + 1), v))
  assert stopped_at == 600 and stopper.best_step == 400 and stopper.best_value == 33.0
  late = EarlyStopping(patience=2, min_steps=700)  # never before the minimum number of images
  assert [late.update(100 * (k + 1), v) for k, v in enumerate(fids)][:6] == [False] * 6
  replay = EarlyStopping.from_history(2, 0, stopper.history[:4])
  assert replay.best_step == 400 and not replay.update(500, 35.0) and replay.update(600, 34.0)


def _toy(n=256, size=16, seed=0):
  """Two classes: a bright left half (0) or a bright right half (1), with noise."""
  rng = np.random.default_rng(seed)
  label = rng.integers(0, 2, n)
  x = rng.normal(60, 20, (n, size, size, 1))
  cols = np.arange(size)[None, None, :, None]
  bright = np.where(label[:, None, None, None] == 0, cols < size // 2, cols >= size // 2)
  x = np.clip(x + 140 * bright, 0, 255).astype(np.uint8)
  return {"image": x, "label": np.eye(2, dtype=np.float32)[label], "label_mask": np.ones((n, 2), np.float32),
          "labelled": np.ones(n, bool), "domain": np.zeros(n, np.int32), "index": np.arange(n)}


def _gan_config(steps):
  cfg = loop_config(steps=steps, batch=32)
  adam = ConfigDict({"name": "adam", "lr": 2e-3, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                     "grad_clip": 0.0, "b1": 0.0, "b2": 0.99})
  cfg.train.optimizer = adam
  cfg.train.critic_optimizer = ConfigDict(adam.to_dict())
  cfg.train.ema_decay = 0.99
  cfg.train.checkpoint_every = 50
  return cfg


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cpd_gan", "prog_gan"])
def test_a_gan_learns_the_class_it_is_asked_for(kind, tmp_path):
  """Trained on the 2-class toy, the generator's samples are classified as the requested class by a
  classifier fitted on real images (logistic regression) above chance (cpD-GAN: all 200 after 300 steps;
  prog-GAN's auxiliary classifier learns the class more slowly, about 2 in 3)."""
  from scipy.stats import binomtest
  from sklearn.linear_model import LogisticRegression
  data = _toy()
  if kind == "cpd_gan":
    model = cpd_gan.Model(16, 1, 2, z_dim=16, base_channels=16, max_channels=32)
    task = GANTask(model, "softmax")
  else:
    model = prog_gan.Model(16, 1, 2, z_dim=16, base_channels=16, max_channels=32, start_size=8)
    task = GANTask(model, "softmax", phase_steps=40)
  stream = TrainStream(ArraySource(data), 32, seed=0, num_threads=0)
  result = train(task, _gan_config(300), stream, str(tmp_path))
  real_clf = LogisticRegression(max_iter=500).fit(data["image"].reshape(len(data["image"]), -1) / 255.0,
                                                  data["label"].argmax(1))
  y = jnp.eye(2)[jnp.arange(200) % 2]
  z = jax.random.normal(jax.random.key(7), (200, model.z_dim))
  images = np.asarray(to_uint8(task.generate(result.state.ema_params["generator"], z, y)))
  hits = int((real_clf.predict(images.reshape(200, -1) / 255.0) == np.arange(200) % 2).sum())
  assert binomtest(hits, 200, 0.5, alternative="greater").pvalue < 1e-3, hits  # above chance


def test_a_killed_gan_run_resumes_to_the_same_generator(tmp_path):
  model = prog_gan.Model(16, 1, 2, z_dim=8, base_channels=8, max_channels=16, start_size=8)
  task = GANTask(model, "softmax", phase_steps=3)
  cfg = _gan_config(12)
  cfg.train.checkpoint_every = 4
  stream = lambda: TrainStream(ArraySource(_toy(64)), 16, seed=0, num_threads=0)  # noqa: E731
  full = train(task, cfg, stream(), str(tmp_path / "full"))
  resumed = killed_and_resumed(task, cfg, stream, str(tmp_path / "killed"), kill_at=6)
  assert resumed.start_step == 4
  assert_trees_equal(full.state.params["generator"], resumed.state.params["generator"])


def test_a_hook_stops_training_early_and_the_step_is_checkpointed(tmp_path):
  model = cpd_gan.Model(8, 1, 2, z_dim=4, base_channels=4, max_channels=8)
  cfg = _gan_config(20)

  def stop(step, state):
    if step == 7:
      raise StopTraining("planted")

  res = train(GANTask(model, "softmax"), cfg, TrainStream(ArraySource(_toy(32, 8)), 16, seed=0, num_threads=0),
              str(tmp_path), hooks=[stop])
  assert int(res.state.step) == 7 and (tmp_path / "checkpoints" / "7").is_dir()


def test_a_task_with_parameter_groups_needs_each_optimizer(tmp_path):
  cfg = _gan_config(2)
  del cfg.train["critic_optimizer"]
  with pytest.raises(SynthMedError, match=r"lacks \['train.critic_optimizer'\]"):
    train(GANTask(cpd_gan.Model(8, 1, 2, z_dim=4, base_channels=4, max_channels=8), "softmax"), cfg,
          TrainStream(ArraySource(_toy(32, 8)), 16, seed=0, num_threads=0), str(tmp_path))


@pytest.mark.slow
def test_the_gan_config_runs_through_main_and_keeps_its_best_generator(tmp_path):
  """configs/cxr_gan.py:smoke (prog-GAN) through the real main: FID twice, the best generator under best/,
  samples; a bad size argument is a clear error."""
  import json
  from tests.conftest import load_config
  from tests.test_cli import run_main
  r = run_main("--config=configs/cxr_gan.py:smoke,prog_gan", f"--workdir={tmp_path}", timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert metrics["model"] == "prog_gan" and len(metrics["fid"]["history"]) == 2
  assert (tmp_path / "best").is_dir() and (tmp_path / "samples.png").exists()
  with pytest.raises(ValueError, match="the image size is one of"):
    load_config("cxr_gan", "size=24")
