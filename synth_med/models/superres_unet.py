"""The cascade's super-resolution UNet (002 App. E): the base UNet with the
low-resolution image concatenated to x_t.

`Model(x_t, t, cond, low_res)` takes `low_res` either at the output size (already
bilinearly upsampled and preprocessed, as in training) or smaller, in which case
it is bilinearly upsampled here. The conditioning vector is the base model's.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from synth_med.errors import SynthMedError
from synth_med.models import unet
from synth_med.models.unet import load  # noqa: F401 - same checkpoint format
from synth_med.ops import Ops


def upsample_bilinear(low_res: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear upsampling of a [B, h, w, C] batch to [B, *size, C]."""
  b, _, _, c = low_res.shape
  return jax.image.resize(low_res, (b, size[0], size[1], c), "linear", antialias=False)


class Model(nn.Module):
  """Super-resolution ε-prediction UNet; fields are the base UNet's (see unet.Model)."""
  out_channels: int = 3
  model_channels: int = 64
  channel_mult: tuple[int, ...] = (1, 2, 2)
  num_res_blocks: int = 2
  attention_resolutions: tuple[int, ...] = ()
  num_head_channels: int = 32
  dropout: float = 0.0
  use_scale_shift_norm: bool = True
  resblock_updown: bool = False
  dtype: object = None
  ops: Ops = unet.REFERENCE_OPS
  num_heads: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, cond: jax.Array | None = None,
               low_res: jax.Array | None = None, train: bool = False) -> jax.Array:
    if low_res is None:
      raise SynthMedError("the super-resolution UNet needs the low-resolution image (low_res).")
    if low_res.shape[1:3] != x.shape[1:3]:
      low_res = upsample_bilinear(low_res, x.shape[1:3])
    kw = {} if self.dtype is None else {"dtype": self.dtype}
    return unet.Model(self.out_channels, self.model_channels, tuple(self.channel_mult), self.num_res_blocks,
                      tuple(self.attention_resolutions), self.num_head_channels, self.dropout,
                      self.use_scale_shift_norm, self.resblock_updown, ops=self.ops, num_heads=self.num_heads,
                      name="unet", **kw)(
                          x, t, cond, low_res, train)
