"""Learnt synthetic-example weights on the loop (objectives/learnt_weights.py): paper 004's IDS and its
MW-Net baseline. The epoch statistics against hand computations, the weighted VIB's minimiser, mislabelled
synthetic images down-weighted, resume equality and the config checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict
from sklearn.metrics import roc_auc_score

from synth_med import configuration
from synth_med.data.mixing import MixedStream, classifier_arrays
from synth_med.errors import SynthMedError
from synth_med.models import bit_resnet
from synth_med.objectives import ids
from synth_med.objectives.classification import ClassifierTask
from synth_med.objectives.learnt_weights import LearntWeightsTask
from synth_med.train.loop import train
from tests.conftest import assert_trees_equal, killed_and_resumed, load_config, loop_config


def _batch(rng, n, d_img=4, classes=3):
  images = jnp.asarray(rng.random((n, d_img, d_img, 1)), jnp.float32)
  features = jnp.asarray(rng.normal(size=(n, 5)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, classes, (n, 1)))
  synthetic = jnp.asarray(np.arange(n) % 2 == 1)
  return images, features, targets, synthetic


def test_ids_statistics_refresh_centroids_and_q_once_an_epoch():
  """Two steps make one epoch: step 0's centroids are its own Eq. 2 sums, step 1's those of both batches;
  after step 1 the previous-epoch sums are both batches' and Q is 004's update over both batches' soft
  assignments (`ids.update_q`), computed here with `class_centroids` and `soft_assignment`."""
  rng = np.random.default_rng(0)
  c, tau = 3, 0.5
  obj = ids.IDSWeighting(1, c, epoch_steps=2, temperature=tau, input_size=2, weighted=False)
  stats = obj.init_statistics(4, 5)
  batches = [_batch(rng, 8) for _ in range(2)]
  gs = [jnp.asarray(rng.random((8, 1)), jnp.float32) for _ in range(2)]
  seen, phis = [], []
  for step, ((images, features, targets, synthetic), g) in enumerate(zip(batches, gs)):
    mask = jnp.ones((8, 1))
    _, _, stats = obj.loss(g, images, features, targets, mask, synthetic, stats, jnp.asarray(step), jnp.ones_like(g))
    x = ids.unit_vectors(ids.pooled_inputs(images, 2))
    z = ids.unit_vectors(features)
    seen.append((x, z, targets[:, 0], synthetic, g[:, 0]))
    xs, zs, ys, ss, ws = (jnp.concatenate(v) for v in zip(*seen))
    real, syn = ~ss, ss
    cz = ids.class_centroids(zs[real], ys[real], zs[syn], ys[syn], ws[syn], c)
    phis.append(ids.soft_assignment(z[synthetic] / np.sqrt(tau), cz / np.sqrt(tau)))
    if step == 0:  # mid-epoch: the running sums, nothing refreshed yet
      np.testing.assert_allclose(stats["mass"], 0.0)
      np.testing.assert_allclose(stats["q"], 1.0 / c)
  xs, zs, ys, ss, ws = (jnp.concatenate(v) for v in zip(*seen))
  cx = ids.class_centroids(xs[~ss], ys[~ss], xs[ss], ys[ss], ws[ss], c)
  mass = stats["mass"][0][:, None]
  np.testing.assert_allclose(stats["sum_input"][0] / mass, cx, rtol=1e-5, atol=1e-6)
  expected_q = ids.update_q(jnp.concatenate(phis), ys[ss], c)
  np.testing.assert_allclose(stats["q"][0], expected_q, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["cur_mass"], 0.0)  # the new epoch starts empty


def test_ids_centroids_take_their_value_from_the_last_epoch_and_their_gradient_from_the_batch():
  """With a previous epoch recorded, the VIB's value does not depend on the batch's weights (Eq. 2 over
  the last epoch), but its gradient with respect to them is not zero (the batch's own Eq. 2 terms)."""
  rng = np.random.default_rng(1)
  obj = ids.IDSWeighting(1, 3, epoch_steps=100, temperature=0.5, input_size=2, weighted=False)
  images, features, targets, synthetic = _batch(rng, 12)
  mask = jnp.ones((12, 1))
  stats = obj.init_statistics(4, 5)
  _, _, stats = obj.loss(jnp.full((12, 1), 0.5), images, features, targets, mask, synthetic, stats, jnp.asarray(99),
                         jnp.ones((12, 1)))
  assert float(stats["mass"].sum()) > 0

  def vib(g):
    return obj.loss(g, images, features, targets, mask, synthetic, stats, jnp.asarray(0), jnp.ones_like(g))[0]
  g1, g2 = jnp.full((12, 1), 0.2), jnp.full((12, 1), 0.9)
  assert float(vib(g1)) == pytest.approx(float(vib(g2)), rel=1e-6)
  assert float(jnp.abs(jax.grad(vib)(g1)).sum()) > 1e-6


def test_weighted_vib_weights_minimise_at_a_sigmoid_of_the_centred_vib():
  """Free weights descending `weighted_vib_loss` reach g = sigmoid(−(VIB − mean) / λ)."""
  vib = jnp.array([0.1, 0.5, 0.9, 1.7, 0.3])
  mask = jnp.ones(5)
  lam = 0.4
  logits = jnp.zeros(5)
  loss = lambda t: ids.weighted_vib_loss(jax.nn.sigmoid(t), vib, mask, lam)  # noqa: E731
  descend = jax.jit(lambda t: jax.lax.fori_loop(0, 3000, lambda _, u: u - 2.0 * jax.grad(loss)(u), t))
  logits = descend(logits)
  expected = jax.nn.sigmoid(-(vib - vib.mean()) / lam)
  np.testing.assert_allclose(jax.nn.sigmoid(logits), expected, atol=1e-3)


K, SIZE = 4, 16


def _quadrants(n, seed):
  """Four classes: a bright quadrant each, with noise."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, K, n)
  x = rng.normal(60, 25, (n, SIZE, SIZE, 1))
  for c in range(K):
    x[y == c, (c // 2) * 8:(c // 2) * 8 + 8, (c % 2) * 8:(c % 2) * 8 + 8, 0] += 120
  return np.clip(x, 0, 255).astype(np.uint8), y


def _arrays(images, y):
  n = len(y)
  return {"image": images, "label": np.eye(K, dtype=np.float32)[y], "label_mask": np.ones((n, K), np.float32),
          "labelled": np.ones(n, bool)}


def _weighting_config(steps, batch):
  cfg = loop_config(steps=steps, batch=batch, lr=0.1)
  cfg.train.checkpoint_every = 10_000
  cfg.train.log_every = 100
  cfg.train.weighting_optimizer = ConfigDict({"name": "adam", "lr": 1e-3, "schedule": "constant", "warmup_steps": 0,
                                              "weight_decay": 0.0, "grad_clip": 0.0})
  return cfg


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ids", "mwnet"])
def test_mislabelled_synthetic_images_get_lower_weights(method, tmp_path):
  """Half the synthetic images carry a wrong label (another class, at random). After 400 steps on real +
  synthetic (α = 0.5) the learnt weights tell the mislabelled half apart: AUC of weight vs correct label
  > 0.8 (IDS about 1.0, MW-Net 1.0 at this seed)."""
  real_x, real_y = _quadrants(300, 0)
  syn_x, syn_y = _quadrants(400, 1)
  rng = np.random.default_rng(2)
  wrong = rng.random(400) < 0.5
  given = np.where(wrong, (syn_y + rng.integers(1, K, 400)) % K, syn_y)
  stream = MixedStream(classifier_arrays(_arrays(real_x, real_y)), classifier_arrays(_arrays(syn_x, given)), 0.5, 32, 0, 0)
  model = bit_resnet.Model(num_outputs=K, depth=0, width=0.25, block_units=(1, 1), root_pool=False)
  task = LearntWeightsTask(ClassifierTask(model, "softmax"), K, method=method, epoch_steps=25)
  result = train(task, _weighting_config(400, 32), stream, str(tmp_path))
  batch = {k: jnp.asarray(v) for k, v in _arrays(syn_x, given).items()}
  w = np.asarray(task.weights(result.state.params, batch))[:, 0]
  assert roc_auc_score(~wrong, w) > 0.8, (w[~wrong].mean(), w[wrong].mean())


def test_a_killed_ids_run_resumes_to_the_same_classifier_weighting_net_and_statistics(tmp_path):
  """Multi-label data (3 findings, one weight per finding): killed at step 6, resumed from the step-4
  checkpoint, the run ends with the uninterrupted run's Θ, θ and IDS statistics."""
  n, findings = 64, 3

  def arrays(seed):
    r = np.random.default_rng(seed)
    label = (r.random((n, findings)) < 0.4).astype(np.float32)
    img = r.integers(0, 60, (n, 8, 8, 1))
    img[:, :findings] += (label[:, :, None, None] * 150).astype(np.int64)
    return {"image": img.astype(np.uint8), "label": label, "labelled": np.ones(n, bool),
            "label_mask": (r.random((n, findings)) < 0.9).astype(np.float32)}
  model = bit_resnet.Model(num_outputs=findings, depth=0, width=0.25, block_units=(1,), root_pool=False)
  task = LearntWeightsTask(ClassifierTask(model, "multilabel"), findings, method="ids", epoch_steps=3)
  cfg = _weighting_config(12, 16)
  cfg.train.checkpoint_every = 4
  stream = lambda: MixedStream(classifier_arrays(arrays(1)), classifier_arrays(arrays(2)), 0.5, 16, 0, 0)  # noqa: E731
  full = train(task, cfg, stream(), str(tmp_path / "full"))
  resumed = killed_and_resumed(task, cfg, stream, str(tmp_path / "killed"), kill_at=6)
  assert resumed.start_step == 4
  assert_trees_equal(full.state.params, resumed.state.params)
  assert_trees_equal(full.state.statistics, resumed.state.statistics)
  assert float(full.state.statistics["mass"].sum()) > 0  # four epochs of 3 steps were recorded
  batch = {k: jnp.asarray(v) for k, v in arrays(2).items()}
  assert task.weights(full.state.params, batch).shape == (n, findings)  # a weight per finding (004 §3)


def test_learnt_weights_need_a_synthetic_mix_and_a_known_method():
  c = load_config("derm_classifier", "smoke")
  with c.unlocked():
    c.reweight.method = "ids"
  with pytest.raises(SynthMedError, match="mix.alpha"):
    configuration.validate(c)
  with c.unlocked():
    c.mix.alpha, c.reweight.method = 0.5, "meta"
  with pytest.raises(SynthMedError, match="reweight.method"):
    configuration.validate(c)
  with c.unlocked():
    c.reweight.method = "mwnet"
  configuration.validate(c)


@pytest.mark.parametrize("reweight_real", [False, True])
def test_the_classifier_loss_weights_synthetic_examples_by_g_held_fixed(reweight_real):
  """The classifier's part of the loss is Σ CE_i w_i / (labelled examples), with w = g for synthetic examples
  and 1 for real ones (g too with `reweight_real`, 004's option), and g gets no gradient from it."""
  x, y = _quadrants(16, 3)
  batch = {k: jnp.asarray(v) for k, v in _arrays(x, y).items()}
  batch["synthetic"] = jnp.asarray(np.arange(16) % 2 == 0)
  batch["weight"] = jnp.ones(16)
  batch["step"] = jnp.asarray(0)
  model = bit_resnet.Model(num_outputs=K, depth=0, width=0.25, block_units=(1,), root_pool=False)
  task = LearntWeightsTask(ClassifierTask(model, "softmax"), K, method="ids", epoch_steps=5, reweight_real=reweight_real)
  params = task.init(jax.random.key(0), batch)
  batch["statistics"] = task.init_statistics(batch)
  _, metrics = task.loss(params, batch, jax.random.key(1))
  logits, _ = task.logits(params, batch["image"])
  ce = -jnp.sum(batch["label"] * jax.nn.log_softmax(logits), -1)
  g = task.weights(params, batch)[:, 0]
  w = g if reweight_real else jnp.where(batch["synthetic"], g, 1.0)
  assert float(metrics["classifier_loss"]) == pytest.approx(float(jnp.sum(ce * w) / 16), rel=1e-5)

  def classifier_part(weighting):
    return task.loss({**params, "weighting": weighting}, batch, jax.random.key(1))[1]["classifier_loss"]
  grads = jax.grad(classifier_part)(params["weighting"])
  assert all(float(jnp.abs(leaf).max()) == 0.0 for leaf in jax.tree.leaves(grads))
