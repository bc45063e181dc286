"""The diffusion UNet (guided-diffusion layout and hyper-parameter names), in Flax.

`Model(x_t, t, cond)` predicts the noise ε of `x_t` at integer timesteps `t`.

- Sinusoidal timestep embedding -> MLP (4 x model_channels).
- The conditioning vector `cond` (see `synth_med.diffusion.conditioning`: the
  label part and one one-hot part per sensitive property, zeros where null) is
  projected by a bias-free Dense and added to the time embedding, so an all-null
  condition adds exactly zero.
- ResBlocks with optional scale-shift norm (`use_scale_shift_norm`), optional
  resblock up/down sampling (`resblock_updown`), multi-head self-attention at the
  downsample factors in `attention_resolutions` (2, 4, 8 = 32/16/8 px at 64 px),
  heads of `num_head_channels` channels.
- Output convs of every residual branch and of the model are zero-initialised.
- `low_res_channels > 0` makes it the cascade's super-resolution model: the
  low-resolution image (already upsampled to the output size) is concatenated
  with `x_t` on the channel axis (see `superres_unet.py`).

The convolutions, per-pixel dense layers, GroupNorm + SiLU and attention run on the `Ops`
value the model is built with (`synth_med.ops.select_ops`; `diffusion_unets.build_model`
picks it); the default is the plain-XLA reference. Parameters are named as Flax's nn.Conv,
nn.Dense and nn.GroupNorm name theirs, whatever the ops.

`load(checkpoint_dir)` returns (EMA parameters, step) of a checkpoint written by
the training loop.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from synth_med.errors import SynthMedError
from synth_med.infra.checkpoint import read_checkpoint
from synth_med.ops import Ops, xla_ops

REFERENCE_OPS = xla_ops("float32")


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """guided-diffusion's sinusoidal embedding: [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _groups(channels: int, wanted: int = 32, min_group_channels: int = 4) -> int:
  """guided-diffusion's 32 groups, but never fewer than 4 channels a group.

  With 1 channel a group (32 groups over 32 channels) GroupNorm becomes an
  instance norm that erases each channel's spatial mean, so the network cannot
  see or predict the image's global colour and samples get random colour casts.
  At Table E1 widths (>= 128 channels) this is exactly GroupNorm(32).
  """
  g = max(1, min(wanted, channels // min_group_channels))
  while channels % g:
    g -= 1
  return g


def _add_f32(x: jax.Array, y: jax.Array) -> jax.Array:
  """x + y (broadcast) computed in float32 and stored in x's dtype; y's gradient (x's summed
  over the broadcast axes) is then summed in float32 whatever x's dtype. The identity for float32 x."""
  return (x.astype(jnp.float32) + y.astype(jnp.float32)).astype(x.dtype)


class Norm(nn.Module):
  """GroupNorm(32) in float32 (guided-diffusion's normalization()); Flax GroupNorm's parameters.

  `scale`/`shift` ([B, C]) apply guided-diffusion's scale-shift norm, norm(x) * (1 + scale)
  + shift, and `silu` the activation after it, all in one `ops.norm_act`.
  """
  ops: Ops = REFERENCE_OPS

  @nn.compact
  def __call__(self, x: jax.Array, scale: jax.Array | None = None, shift: jax.Array | None = None,
               silu: bool = False) -> jax.Array:
    bsz, c = x.shape[0], x.shape[-1]
    gamma = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    beta = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    a, b = jnp.broadcast_to(gamma, (bsz, c)), jnp.broadcast_to(beta, (bsz, c))
    if scale is not None:
      gain = 1.0 + scale.astype(jnp.float32)
      a, b = a * gain, b * gain + shift.astype(jnp.float32)
    return self.ops.norm_act(x, a, b, _groups(c), silu)


class Conv3x3(nn.Module):
  """nn.Conv(features, (3, 3)) with the same parameters, on `ops.conv3x3` ('SAME'), or with
  `stride=2` on `ops.down_conv3x3` (guided-diffusion's Downsample, named as Flax names nn.Conv)."""
  features: int
  ops: Ops = REFERENCE_OPS
  stride: int = 1
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    conv = self.ops.conv3x3 if self.stride == 1 else self.ops.down_conv3x3
    # The bias is added in float32, so that its gradient (the output gradient summed over the batch
    # and the pixels) is a float32 sum in a 16-bit model too: in bfloat16 it stops growing at 256.
    return _add_f32(conv(x.astype(self.dtype), kernel.astype(self.dtype)), bias)


class PixelDense(nn.Module):
  """nn.Dense(features) with the same parameters, on `ops.dense` (the bias added in float32)."""
  features: int
  ops: Ops = REFERENCE_OPS
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return _add_f32(self.ops.dense(x.astype(self.dtype), kernel.astype(self.dtype)), bias)


def _upsample(x: jax.Array) -> jax.Array:
  """Nearest-neighbour 2x upsampling as a broadcast (jax.image.resize's gather has a scatter-add gradient)."""
  b, h, w, c = x.shape
  return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def _avg_pool(x: jax.Array) -> jax.Array:
  """2x2 average pooling with stride 2, as a reshape and a mean."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class ResBlock(nn.Module):
  out_channels: int
  ops: Ops = REFERENCE_OPS
  dropout: float = 0.0
  use_scale_shift_norm: bool = True
  up: bool = False
  down: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
    norm = functools.partial(Norm, self.ops)
    h = norm(name="in_norm")(x, silu=True)
    if self.up or self.down:
      resample = _upsample if self.up else _avg_pool
      h, x = resample(h), resample(x)
    h = Conv3x3(self.out_channels, self.ops, dtype=self.dtype, name="in_conv")(h)
    # float32, as emb is: a [batch, channels] product, whose gradient sums over the pixels
    emb_out = nn.Dense(2 * self.out_channels if self.use_scale_shift_norm else self.out_channels,
                       name="emb")(nn.silu(emb))
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = norm(name="out_norm")(h, scale, shift, silu=True)
    else:
      h = norm(name="out_norm")(_add_f32(h, emb_out[:, None, None, :]), silu=True)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = Conv3x3(self.out_channels, self.ops, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="out_conv")(h)
    if x.shape[-1] != self.out_channels:
      x = PixelDense(self.out_channels, self.ops, self.dtype, name="skip")(x)
    return x + h


class Attention(nn.Module):
  """Multi-head self-attention over the spatial positions: heads of `num_head_channels`, or (when that is
  <= 0) `num_heads` heads, as in guided-diffusion."""
  num_head_channels: int = 64
  ops: Ops = REFERENCE_OPS
  dtype: Any = jnp.float32
  num_heads: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    heads = max(c // self.num_head_channels, 1) if self.num_head_channels > 0 else max(int(self.num_heads), 1)
    if c % heads:
      what = (f"heads of {self.num_head_channels} channels; choose num_head_channels" if self.num_head_channels > 0
              else f"{heads} heads; choose num_heads")
      raise SynthMedError(f"attention over {c} channels cannot be split into {what} dividing "
                          "model_channels * channel_mult.")
    y = Norm(self.ops, name="norm")(x).reshape(b, h * w, c)
    qkv = PixelDense(3 * c, self.ops, self.dtype, name="qkv")(y).reshape(b, h * w, 3, heads, c // heads)
    out = self.ops.attention(qkv).reshape(b, h * w, c)
    out = PixelDense(c, self.ops, self.dtype, nn.initializers.zeros, name="proj_out")(out)
    return x + out.reshape(b, h, w, c)


class Model(nn.Module):
  """Conditional ε-prediction UNet; hyper-parameter names follow guided-diffusion."""
  out_channels: int = 3
  model_channels: int = 64
  channel_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (2, 4)  # downsample factors
  num_head_channels: int = 32
  dropout: float = 0.0
  use_scale_shift_norm: bool = True
  resblock_updown: bool = False
  dtype: Any = jnp.float32  # compute dtype (bfloat16 on accelerators); params stay float32
  ops: Ops = REFERENCE_OPS  # the convolutions, dense layers, norm and attention (`synth_med.ops`)
  num_heads: int = 1  # attention heads when num_head_channels <= 0 (paper 000: 4)

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, cond: jax.Array | None = None,
               low_res: jax.Array | None = None, train: bool = False) -> jax.Array:
    ch = self.model_channels
    emb = timestep_embedding(t, ch)
    emb = nn.Dense(4 * ch, name="time_embed_0")(emb)
    emb = nn.Dense(4 * ch, name="time_embed_1")(nn.silu(emb))
    if cond is not None and cond.shape[-1] > 0:
      # An embedding table as in guided-diffusion (N(0, 1) rows; a one-hot picks one row, a soft or
      # multi-hot label sums them), so the condition is as loud as the time embedding from step 0.
      emb = emb + nn.Dense(4 * ch, use_bias=False, kernel_init=nn.initializers.normal(1.0),
                           name="cond_embed")(cond.astype(jnp.float32))
    # emb stays float32 in a 16-bit model (it is only [batch, 4 ch]): its gradient sums all blocks' parts.
    if low_res is not None:
      x = jnp.concatenate([x, low_res.astype(x.dtype)], axis=-1)
    res_block = functools.partial(ResBlock, ops=self.ops, dropout=self.dropout,
                                  use_scale_shift_norm=self.use_scale_shift_norm, dtype=self.dtype)
    attention = functools.partial(Attention, self.num_head_channels, self.ops, self.dtype, self.num_heads)
    conv = functools.partial(Conv3x3, ops=self.ops, dtype=self.dtype)
    h = conv(ch, name="input_conv")(x.astype(self.dtype))
    skips, ds = [h], 1
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        h = res_block(mult * ch)(h, emb, train)
        if ds in self.attention_resolutions:
          h = attention()(h)
        skips.append(h)
      if level != len(self.channel_mult) - 1:
        if self.resblock_updown:
          h = res_block(mult * ch, down=True)(h, emb, train)
        else:
          h = conv(h.shape[-1], stride=2, name=f"Conv_{level}")(h)  # nn.Conv's name
        ds *= 2
        skips.append(h)
    h = res_block(h.shape[-1])(h, emb, train)
    h = attention()(h)
    h = res_block(h.shape[-1])(h, emb, train)
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res_block(mult * ch)(h, emb, train)
        if ds in self.attention_resolutions:
          h = attention()(h)
        if level and i == self.num_res_blocks:
          if self.resblock_updown:
            h = res_block(mult * ch, up=True)(h, emb, train)
          else:
            h = conv(mult * ch)(_upsample(h))
          ds //= 2
    h = Norm(self.ops, name="out_norm")(h, silu=True)
    out = conv(self.out_channels, kernel_init=nn.initializers.zeros, name="out_conv")(h)
    return out.astype(jnp.float32)


def check_image_size(image_size: int, channel_mult: Sequence[int]) -> None:
  """The UNet halves the resolution len(channel_mult)-1 times; the size must allow it."""
  factor = 2 ** (len(channel_mult) - 1)
  if image_size % factor:
    raise SynthMedError(f"image size {image_size} is not divisible by {factor}, the UNet's total "
                        f"downsampling for channel_mult={tuple(channel_mult)}; change data.image_size "
                        "or use fewer levels in model.channel_mult.")


def num_params(params: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def load(checkpoint_dir: str, step: int | None = None, ema: bool = True) -> Any:
  """(params, step): the EMA (default) or raw parameters of a checkpoint written by `train()`.

  `checkpoint_dir` is a stage's `checkpoints/` folder (or the stage folder).
  The parameters are host numpy arrays in the model's parameter tree.
  """
  tree, step = read_checkpoint(checkpoint_dir, step)
  key = "ema_params" if ema else "params"
  if key not in tree:
    raise SynthMedError(f"checkpoint {checkpoint_dir!r} step {step} has no {key!r}; is it a train-state "
                        "checkpoint?")
  return tree[key], step
