"""The conditional GANs of paper 001 (cpD-GAN, prog-GAN) as one task on the shared training loop.

The task's parameters are {'generator': ..., 'discriminator': ...}; the loop gives each part its own
optimizer (`param_groups`: the generator's `train.optimizer`, the critic's `train.critic_optimizer`).
One step updates both players from the same parameters: the loss is

    L = L_D(D, stop_gradient(G(z, y))) + L_G(G, stop_gradient(D)),

so the critic's gradient comes from L_D alone and the generator's from L_G alone (one critic update per
generator update, 001's n_critic = 1, applied simultaneously).
  L_D = E[D(fake)] - E[D(real)] + λ E[(‖∇ D(x̂)‖ - 1)²] + ε_drift E[D(real)²]   (WGAN-GP, Gulrajani 2017)
  L_G = -E[D(fake)]
plus, for prog-GAN's auxiliary classifier, the label loss of real and fake images in L_D and of fake
images in L_G (001 S.2.1). Images are scaled to [-1, 1]; prog-GAN's real images are shown at the
resolution its generator has grown to (`gan_layers.blend_resolution`).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from synth_med.models import gan_layers
from synth_med.objectives.classification import sigmoid_loss, softmax_loss


def to_model_range(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float [-1, 1]."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def gradient_penalty(critic: Any, real: jax.Array, fake: jax.Array, rng: jax.Array) -> jax.Array:
  """WGAN-GP: E[(‖∇_x̂ critic(x̂)‖₂ - 1)²] at x̂ = ε real + (1 - ε) fake, ε ~ U(0, 1) per example."""
  eps = jax.random.uniform(rng, (real.shape[0],) + (1,) * (real.ndim - 1))
  mixed = eps * real + (1.0 - eps) * fake
  grads = jax.grad(lambda x: jnp.sum(critic(x)))(mixed)
  norms = jnp.sqrt(jnp.sum(jnp.square(grads.reshape(grads.shape[0], -1)), axis=-1) + 1e-12)
  return jnp.mean(jnp.square(norms - 1.0))


def condition_vector(batch: Mapping[str, jax.Array]) -> jax.Array:
  """y: the label vector (one-hot, multi-hot or a binary 0/1), unknown findings as 0."""
  return (batch["label"] * batch["label_mask"]).astype(jnp.float32)


class GANTask:
  """init/loss for the loop (synth_med.train.loop.Task) of a cpD-GAN or prog-GAN `model`."""
  param_groups = {"generator": "optimizer", "discriminator": "critic_optimizer"}

  def __init__(self, model: Any, label_kind: str, gp_weight: float = 10.0, drift: float = 1e-3,
               ac_weight: float = 1.0, phase_steps: int = 0):
    self.model, self.label_kind = model, label_kind
    self.gp_weight, self.drift, self.ac_weight = float(gp_weight), float(drift), float(ac_weight)
    self.phase_steps = int(phase_steps)
    self.needs_step = bool(model.growth_stages)  # the loop passes the step in the batch

  def alphas(self, step: jax.Array | int) -> jax.Array:
    """The growth stages' fade-in at `step` (all 1 once grown, and for a GAN that does not grow)."""
    if not self.model.growth_stages:
      return jnp.zeros((0,), jnp.float32)
    return gan_layers.growth_alphas(step, self.model.growth_stages, self.phase_steps)

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> Any:
    x, y = to_model_range(batch["image"]), condition_vector(batch)
    z = jnp.zeros((x.shape[0], self.model.z_dim), jnp.float32)
    alphas = jnp.ones((self.model.growth_stages,), jnp.float32)
    g_rng, d_rng = jax.random.split(rng)
    return {"generator": self.model.generator.init(g_rng, z, y, alphas)["params"],
            "discriminator": self.model.discriminator.init(d_rng, x, y, alphas)["params"]}

  def generate(self, generator_params: Any, z: jax.Array, y: jax.Array, alphas: jax.Array | None = None) -> jax.Array:
    """Images in [-1, 1] (the fully grown generator unless `alphas` says otherwise)."""
    if alphas is None:
      alphas = jnp.ones((self.model.growth_stages,), jnp.float32)
    return self.model.generator.apply({"params": generator_params}, z, y, alphas)

  def _label_loss(self, logits: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
    if self.label_kind == "softmax":
      return softmax_loss(logits, batch["label"])
    return sigmoid_loss(logits, batch["label"], batch["label_mask"])

  def loss(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array
           ) -> tuple[jax.Array, Mapping[str, jax.Array]]:
    z_rng, gp_rng = jax.random.split(rng)
    real, y = to_model_range(batch["image"]), condition_vector(batch)
    alphas = self.alphas(batch["step"]) if self.needs_step else jnp.ones((0,), jnp.float32)
    if self.model.growth_stages:
      real = gan_layers.blend_resolution(real, alphas, self.model.start_size)
    z = jax.random.normal(z_rng, (real.shape[0], self.model.z_dim))
    fake = self.model.generator.apply({"params": params["generator"]}, z, y, alphas)

    def critic(d_params: Any, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
      return self.model.critic_outputs(self.model.discriminator.apply({"params": d_params}, x, y, alphas))

    d_params = params["discriminator"]
    d_real, logits_real = critic(d_params, real)
    d_fake, logits_fake = critic(d_params, jax.lax.stop_gradient(fake))
    gp = gradient_penalty(lambda x: critic(d_params, x)[0], real, jax.lax.stop_gradient(fake), gp_rng)
    wasserstein = jnp.mean(d_real) - jnp.mean(d_fake)
    d_loss = -wasserstein + self.gp_weight * gp + self.drift * jnp.mean(jnp.square(d_real))
    g_score, g_logits = critic(jax.lax.stop_gradient(d_params), fake)
    g_loss = -jnp.mean(g_score)
    metrics = {"critic_loss": d_loss, "generator_loss": g_loss, "wasserstein": wasserstein, "gradient_penalty": gp}
    if logits_real is not None:  # prog-GAN's auxiliary classifier
      ac_real = jnp.mean(self._label_loss(logits_real, batch))
      ac_fake_d = jnp.mean(self._label_loss(logits_fake, batch))
      ac_fake_g = jnp.mean(self._label_loss(g_logits, batch))
      d_loss = d_loss + self.ac_weight * (ac_real + ac_fake_d)
      g_loss = g_loss + self.ac_weight * ac_fake_g
      metrics.update(ac_real=ac_real, ac_fake=ac_fake_g)
    if self.needs_step:
      metrics["growth"] = jnp.sum(alphas)
    return d_loss + g_loss, metrics
