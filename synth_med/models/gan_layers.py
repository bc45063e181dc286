"""Layers the two GANs of paper 001 (DuMont Schütte et al., the GAN benchmark) share, after Karras et
al.'s progressive GAN: equalised learning rate (weights drawn N(0, 1) and scaled by He's constant at
every call), pixel-wise feature normalisation, the mini-batch standard deviation channel, and
nearest-neighbour / average-pool resampling."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LEAK = 0.2
GAN_MODELS = ("cpd_gan", "prog_gan")  # model.name of a GAN stage (models/cpd_gan.py, models/prog_gan.py)


def pixel_norm(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Each pixel's feature vector divided by its root mean square (prog-GAN; 001's Eq. 1 before γ, β)."""
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def lrelu(x: jax.Array) -> jax.Array:
  return nn.leaky_relu(x, LEAK)


def upsample(x: jax.Array) -> jax.Array:
  """Nearest-neighbour 2x."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def downsample(x: jax.Array) -> jax.Array:
  """2x2 average pooling."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def minibatch_stddev(x: jax.Array) -> jax.Array:
  """x with one more channel: the standard deviation over the batch, averaged over features and pixels."""
  std = jnp.sqrt(jnp.var(x.astype(jnp.float32), axis=0) + 1e-8).mean()
  return jnp.concatenate([x, jnp.broadcast_to(std.astype(x.dtype), x.shape[:-1] + (1,))], axis=-1)


class EqualConv(nn.Module):
  """A convolution with an equalised learning rate (prog-GAN's runtime He scaling)."""
  features: int
  kernel: int = 3
  gain: float = float(np.sqrt(2.0))

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = self.kernel * self.kernel * x.shape[-1]
    w = self.param("kernel", nn.initializers.normal(1.0), (self.kernel, self.kernel, x.shape[-1], self.features))
    b = self.param("bias", nn.initializers.zeros, (self.features,))
    y = jax.lax.conv_general_dilated(x, w * (self.gain / np.sqrt(fan_in)), (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + b


class EqualDense(nn.Module):
  """A dense layer with an equalised learning rate."""
  features: int
  gain: float = float(np.sqrt(2.0))
  use_bias: bool = True
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.param("kernel", nn.initializers.normal(1.0), (x.shape[-1], self.features))
    y = x @ (w * (self.gain / np.sqrt(x.shape[-1])))
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,))
    return y


def growth_alphas(step: jax.Array, stages: int, phase_steps: int) -> jax.Array:
  """float32[stages]: how far each growth stage of a progressive GAN has faded in at `step`.

  Phase 0 trains the lowest resolution for `phase_steps`; stage j then fades in over the next
  `phase_steps` (alpha 0 -> 1) and is trained alone for `phase_steps` more before stage j + 1 starts."""
  if stages == 0:
    return jnp.zeros((0,), jnp.float32)
  j = jnp.arange(1, stages + 1, dtype=jnp.float32)
  start = (2.0 * j - 1.0) * phase_steps
  return jnp.clip((jnp.asarray(step, jnp.float32) - start) / max(phase_steps, 1), 0.0, 1.0)


def blend_resolution(x: jax.Array, alphas: jax.Array, start_res: int) -> jax.Array:
  """x as a progressive GAN at `alphas` sees it: its `start_res` version, each higher resolution faded in
  by its stage's alpha (0: the lower resolution upsampled), back at x's size (real images are shown
  to the critic like this, so they match what the generator can draw)."""
  pyramid = [x]
  while pyramid[-1].shape[1] > start_res:
    pyramid.append(downsample(pyramid[-1]))
  pyramid = pyramid[::-1]  # start_res first
  out = pyramid[0]
  for k, level in enumerate(pyramid[1:]):
    out = upsample(out) + alphas[k] * (level - upsample(out))
  return out
