"""prog-GAN, paper 001's reference GAN (Karras et al.'s progressive GAN with an auxiliary classifier;
001 Supp. S.2.1).

Generator: [pixelnorm(z); y] -> 4x4 features; per resolution nearest upsampling and two 3x3 convolutions,
each followed by leaky ReLU and pixel norm; a 1x1 to-image convolution per resolution. Growth starts at
`start_size` (001: 8x8): each higher resolution fades in (alpha 0 -> 1, `gan_layers.growth_alphas`) as
the lower resolution's image upsampled plus alpha times the new block's correction. All shapes are
static (the full network always runs; a stage not yet grown contributes with weight 0), so one jitted
step serves every phase.
Discriminator: the mirror image, with a from-image 1x1 convolution per resolution faded in the same way,
the mini-batch standard deviation channel at 4x4, a critic score and an auxiliary classifier head
(AC-GAN, Odena et al. 2017) over the labels.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from synth_med.models import gan_layers as gl
from synth_med.models.cpd_gan import channels_at, check_resolution
from synth_med.models.unet import load, num_params  # noqa: F401  (the train-state checkpoint reader)
from synth_med.errors import SynthMedError


def growth_stages(image_size: int, start_size: int) -> int:
  """How many resolutions grow in after `start_size` (8 -> 32: two)."""
  if start_size < 4 or start_size > image_size or start_size & (start_size - 1):
    raise SynthMedError(f"model.start_size={start_size} must be a power of 2 from 4 to data.image_size={image_size}.")
  return (image_size // start_size).bit_length() - 1


class Generator(nn.Module):
  image_size: int = 32
  channels: int = 1
  base_channels: int = 32
  max_channels: int = 256
  start_size: int = 8

  @nn.compact
  def __call__(self, z: jax.Array, y: jax.Array, alphas: jax.Array | None = None) -> jax.Array:
    ch = lambda r: channels_at(r, self.image_size, self.base_channels, self.max_channels)  # noqa: E731
    stages = growth_stages(self.image_size, self.start_size)
    alphas = jnp.ones((stages,), jnp.float32) if alphas is None else alphas
    zy = jnp.concatenate([gl.pixel_norm(z), y.astype(z.dtype)], axis=-1)
    h = gl.pixel_norm(gl.lrelu(gl.EqualDense(16 * ch(4), gain=1.0, name="input")(zy).reshape(-1, 4, 4, ch(4))))
    h = gl.pixel_norm(gl.lrelu(gl.EqualConv(ch(4), name="conv4")(h)))
    res, image = 4, None
    while res < self.image_size:
      res *= 2
      h = gl.upsample(h)
      for k in range(2):
        h = gl.pixel_norm(gl.lrelu(gl.EqualConv(ch(res), name=f"conv{res}_{k}")(h)))
      if res == self.start_size:
        image = gl.EqualConv(self.channels, 1, gain=1.0, name=f"to_image{res}")(h)
      elif res > self.start_size:
        new = gl.EqualConv(self.channels, 1, gain=1.0, name=f"to_image{res}")(h)
        stage = (res // self.start_size).bit_length() - 2
        image = gl.upsample(image) + alphas[stage] * (new - gl.upsample(image))
    if image is None:  # start_size 4: the 4x4 image only
      image = gl.EqualConv(self.channels, 1, gain=1.0, name="to_image4")(h)
    return image


class Discriminator(nn.Module):
  image_size: int = 32
  num_classes: int = 2
  base_channels: int = 32
  max_channels: int = 256
  start_size: int = 8

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, alphas: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """(the critic's score, the auxiliary classifier's label logits); y is unused (AC conditioning)."""
    del y
    ch = lambda r: channels_at(r, self.image_size, self.base_channels, self.max_channels)  # noqa: E731
    stages = growth_stages(self.image_size, self.start_size)
    alphas = jnp.ones((stages,), jnp.float32) if alphas is None else alphas
    from_image = lambda img, r: gl.lrelu(gl.EqualConv(ch(r), 1, name=f"from_image{r}")(img))  # noqa: E731
    res, small, h = self.image_size, x, None
    while res > 4:
      if res >= self.start_size:
        direct = from_image(small, res)
        if h is None:
          h = direct
        else:  # the block from res * 2 fades in over the direct path at this resolution
          stage = (2 * res // self.start_size).bit_length() - 2
          h = direct + alphas[stage] * (h - direct)
      h = gl.lrelu(gl.EqualConv(ch(res), name=f"conv{res}_0")(h))
      h = gl.downsample(gl.lrelu(gl.EqualConv(ch(res // 2), name=f"conv{res}_1")(h)))
      small, res = gl.downsample(small), res // 2
    if h is None:
      h = from_image(small, 4)
    h = gl.minibatch_stddev(h)
    h = gl.lrelu(gl.EqualConv(ch(4), name="conv4")(h))
    h = gl.lrelu(gl.EqualDense(ch(4), name="features")(h.reshape(h.shape[0], -1)))
    out = gl.EqualDense(1 + self.num_classes, gain=1.0, name="head")(h)
    return out[:, 0], out[:, 1:]


class Model:
  """The prog-GAN's two networks, built from the config's `model` block."""
  progressive = True

  def __init__(self, image_size: int, channels: int, num_classes: int, z_dim: int = 512,
               base_channels: int = 32, max_channels: int = 256, start_size: int = 8, **_: Any):
    check_resolution(image_size)
    self.image_size, self.channels, self.num_classes, self.z_dim = image_size, channels, num_classes, z_dim
    self.start_size = int(start_size)
    self.growth_stages = growth_stages(image_size, self.start_size)
    self.generator = Generator(image_size, channels, base_channels, max_channels, self.start_size)
    self.discriminator = Discriminator(image_size, num_classes, base_channels, max_channels, self.start_size)

  def critic_outputs(self, d_out: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array | None]:
    return d_out[0], d_out[1]
