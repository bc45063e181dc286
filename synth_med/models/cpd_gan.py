"""cpD-GAN, paper 001's conditional GAN (DuMont Schütte et al., Supp. S.2.2).

Generator: [z; y] -> 4x4 features, then per resolution nearest upsampling and two 3x3 convolutions, each
followed by leaky ReLU and the *conditional* pixel norm of 001's Eq. 1 (the normalised feature scaled by
γ = W1 [z; y] + b1 and shifted by β = W2 [z; y] + b2), with output skips (a 1x1 to-image convolution per
resolution, summed upwards). No progressive growing.
Discriminator: residual blocks with average-pool downsampling, the mini-batch standard deviation channel
at 4x4, features φ(x), and a projection head (Miyato & Koyama 2018): D(x, y) = ψ(φ(x)) + ⟨embed(y), φ(x)⟩.
Equalised learning rate throughout (`gan_layers`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from synth_med.errors import SynthMedError
from synth_med.models import gan_layers as gl
from synth_med.models.unet import load, num_params  # noqa: F401  (the train-state checkpoint reader)


def channels_at(resolution: int, image_size: int, base_channels: int, max_channels: int) -> int:
  """Feature channels at `resolution`: base_channels at the image size, doubling per halving, capped."""
  return int(min(max_channels, base_channels * (image_size // resolution)))


def check_resolution(image_size: int) -> None:
  if image_size < 8 or image_size & (image_size - 1):
    raise SynthMedError(f"a GAN's data.image_size={image_size} must be a power of 2 >= 8 (e.g. 32, 64, 128).")


class ConditionalPixelNorm(nn.Module):
  """001's Eq. 1: pixel norm, then per-channel γ, β from [z; y] (γ starts at 1, β at 0)."""

  @nn.compact
  def __call__(self, a: jax.Array, zy: jax.Array) -> jax.Array:
    c = a.shape[-1]
    gamma = nn.Dense(c, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.ones, name="gamma")(zy)
    beta = nn.Dense(c, kernel_init=nn.initializers.zeros, name="beta")(zy)
    return gl.pixel_norm(a) * gamma[:, None, None, :] + beta[:, None, None, :]


class Generator(nn.Module):
  image_size: int = 32
  channels: int = 1
  base_channels: int = 32
  max_channels: int = 256

  @nn.compact
  def __call__(self, z: jax.Array, y: jax.Array, alphas: jax.Array | None = None) -> jax.Array:
    del alphas  # no progressive growing
    ch = lambda r: channels_at(r, self.image_size, self.base_channels, self.max_channels)  # noqa: E731
    zy = jnp.concatenate([z, y.astype(z.dtype)], axis=-1)
    h = gl.EqualDense(16 * ch(4), gain=1.0, name="input")(zy).reshape(-1, 4, 4, ch(4))
    h = ConditionalPixelNorm(name="norm4_0")(gl.lrelu(h), zy)
    h = ConditionalPixelNorm(name="norm4_1")(gl.lrelu(gl.EqualConv(ch(4), name="conv4")(h)), zy)
    rgb = gl.EqualConv(self.channels, 1, gain=1.0, name="to_image4")(h)
    res = 4
    while res < self.image_size:
      res *= 2
      h = gl.upsample(h)
      for k in range(2):
        h = ConditionalPixelNorm(name=f"norm{res}_{k}")(gl.lrelu(gl.EqualConv(ch(res), name=f"conv{res}_{k}")(h)), zy)
      rgb = gl.upsample(rgb) + gl.EqualConv(self.channels, 1, gain=1.0, name=f"to_image{res}")(h)
    return rgb


class Discriminator(nn.Module):
  image_size: int = 32
  base_channels: int = 32
  max_channels: int = 256

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, alphas: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(D(x, y), the unconditional head ψ(φ(x)), φ(x)); D = ψ(φ) + ⟨embed(y), φ⟩."""
    del alphas
    ch = lambda r: channels_at(r, self.image_size, self.base_channels, self.max_channels)  # noqa: E731
    h = gl.lrelu(gl.EqualConv(ch(self.image_size), 1, name="from_image")(x))
    res = self.image_size
    while res > 4:
      main = gl.lrelu(gl.EqualConv(ch(res), name=f"conv{res}_0")(h))
      main = gl.downsample(gl.lrelu(gl.EqualConv(ch(res // 2), name=f"conv{res}_1")(main)))
      skip = gl.EqualConv(ch(res // 2), 1, gain=1.0, name=f"skip{res}")(gl.downsample(h))
      h = (main + skip) * (1.0 / jnp.sqrt(2.0))
      res //= 2
    h = gl.minibatch_stddev(h)
    h = gl.lrelu(gl.EqualConv(ch(4), name="conv4")(h))
    phi = gl.lrelu(gl.EqualDense(ch(4), name="features")(h.reshape(h.shape[0], -1)))
    uncond = gl.EqualDense(1, gain=1.0, name="head")(phi)[:, 0]
    embed = gl.EqualDense(ch(4), gain=1.0, use_bias=False, name="label_embed")(y.astype(phi.dtype))
    return uncond + jnp.sum(embed * phi, axis=-1), uncond, phi


class Model:
  """The cpD-GAN's two networks, built from the config's `model` block."""
  progressive = False

  def __init__(self, image_size: int, channels: int, num_classes: int, z_dim: int = 128,
               base_channels: int = 32, max_channels: int = 256, **_: Any):
    check_resolution(image_size)
    self.image_size, self.channels, self.num_classes, self.z_dim = image_size, channels, num_classes, z_dim
    self.generator = Generator(image_size, channels, base_channels, max_channels)
    self.discriminator = Discriminator(image_size, base_channels, max_channels)
    self.growth_stages = 0

  def critic_outputs(self, d_out: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array | None]:
    """(the critic's score, the auxiliary classifier's logits or None)."""
    return d_out[0], None
