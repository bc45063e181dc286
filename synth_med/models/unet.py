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
from synth_med.models import native_ops


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


def _group_mean(per_channel: jax.Array, groups: int, n: int) -> jax.Array:
  """[B, C] per-channel sums → each channel's group total / n, still [B, C]."""
  b, c = per_channel.shape
  return jnp.repeat(per_channel.reshape(b, groups, -1).sum(-1) / n, c // groups, axis=1)


def _group_stats(xf: jax.Array, groups: int) -> tuple[jax.Array, jax.Array]:
  """Per (image, channel) copies of each group's mean and 1/std over (H, W, channels of the group).

  Written as per-channel sums (one pass for Σx and Σx²), which XLA's CPU backend runs
  ~2-5x faster than the generic reshape-and-reduce form (measured with `bench/unet.py`).
  """
  _, h, w, c = xf.shape
  n = h * w * (c // groups)
  mean = _group_mean(jnp.sum(xf, axis=(1, 2)), groups, n)
  mean_sq = _group_mean(jnp.sum(jnp.square(xf), axis=(1, 2)), groups, n)
  return mean, jax.lax.rsqrt(jnp.maximum(mean_sq - jnp.square(mean), 0.0) + 1e-5)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm_act(x: jax.Array, a: jax.Array, b: jax.Array, groups: int, silu: bool) -> jax.Array:
  """act(GroupNorm(x) * a + b) in float32, with `a` and `b` per (image, channel): [B, C].

  One op for the UNet's norm → affine (and scale-shift) → SiLU chain, so its gradient
  is two passes over x and dy (one for the four per-channel sums, one for dx), with
  the normalised input and the SiLU recomputed instead of stored. Autodiff of the
  same chain stores and re-reads more, and is 20-30 % slower on CPU (measured with `bench/unet.py`).
  On CPUs both directions are `native_ops`' C++ kernels where they apply (float32,
  channels a multiple of the SIMD width), which work image by image in cache.
  """
  return _group_norm_act_fwd(x, a, b, groups, silu)[0]


def _px(v: jax.Array) -> jax.Array:
  """[B, C] → [B, 1, 1, C], to broadcast a per-(image, channel) value over the pixels."""
  return v[:, None, None, :]


def _group_norm_act_fwd(x, a, b, groups, silu):
  if native_ops.norm_fits(x, groups):
    y, mean, inv = native_ops.group_norm_act_fwd(x, a, b, groups, silu)
    return y, (x, a, b, mean, inv)
  xf = x.astype(jnp.float32)
  mean, inv = _group_stats(xf, groups)
  scale = inv * a
  z = xf * _px(scale) + _px(b - mean * scale)
  y = z * jax.nn.sigmoid(z) if silu else z
  return y.astype(x.dtype), (x, a, b, mean, inv)


def _group_norm_act_bwd(groups, silu, res, dy):
  x, a, b, mean, inv = res
  if native_ops.norm_fits(x, groups):
    dx, da, db = native_ops.group_norm_act_bwd(x, a, b, mean, inv, dy, groups, silu)
    return dx, da.astype(a.dtype), db.astype(b.dtype)
  _, h, w, c = x.shape
  xhat = (x.astype(jnp.float32) - _px(mean)) * _px(inv)
  dz = dy.astype(jnp.float32)
  if silu:
    z = xhat * _px(a) + _px(b)
    sig = jax.nn.sigmoid(z)
    dz = dz * sig * (1.0 + z * (1.0 - sig))
  db = jnp.sum(dz, axis=(1, 2))
  da = jnp.sum(dz * xhat, axis=(1, 2))
  n = h * w * (c // groups)
  m1, m2 = _group_mean(a * db, groups, n), _group_mean(a * da, groups, n)
  dx = _px(inv) * (dz * _px(a) - _px(m1) - xhat * _px(m2))
  return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


group_norm_act.defvjp(_group_norm_act_fwd, _group_norm_act_bwd)


class Norm(nn.Module):
  """GroupNorm(32) in float32 (guided-diffusion's normalization()); Flax GroupNorm's parameters.

  `scale`/`shift` ([B, C]) apply guided-diffusion's scale-shift norm, norm(x) * (1 + scale)
  + shift, and `silu` the activation after it, all inside `group_norm_act`.
  """

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
    return group_norm_act(x, a, b, _groups(c), silu)


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3x3 'SAME' convolution (NHWC, HWIO) on native CPU kernels where they apply.

  On a CPU with the native kernels (`native_ops`: C++ custom calls built on first use) the
  convolution and its input gradient are `native_ops.conv3x3` (about 15 % over XLA's), and
  the kernel gradient is `native_ops.kernel_grad` (2-2.5x XLA's, which computes it as a
  convolution over the batch at a third to a half of the forward's FLOP rate). Where they do
  not apply (no compiler, output channels not a SIMD multiple, not float32), the convolutions
  are XLA's and the kernel gradient the one matmul of `_kernel_grad`.
  """
  return _native_or_xla_conv(x, kernel)


def _xla_conv(x: jax.Array, kernel: jax.Array, strides, padding, **kw) -> jax.Array:
  """XLA's NHWC x HWIO convolution (the one place its layout is spelled out)."""
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw)


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return _xla_conv(x, kernel, (1, 1), "SAME")


def _native_or_xla_conv(x: jax.Array, kernel: jax.Array, flip: bool = False) -> jax.Array:
  """conv(x, kernel), or with `flip` conv(x, kernel flipped with its channel axes swapped): the input gradient."""
  out = native_ops.conv3x3(x, kernel, flip)
  if out is not None:
    return out
  return _conv(x, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2) if flip else kernel)


def _conv3x3_fwd(x, kernel):
  return _native_or_xla_conv(x, kernel), (x, kernel)


def _kernel_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """d(sum(conv3x3(x, k) * g))/dk, shape (3, 3, c, o), as one matmul over N = b (h+2) w rows.

  Row n = (image, padded row r, column x). The left operand holds the zero-padded
  input's three column shifts, xw[n, (j, c)] = xp[r, x + j, c]; the right one the
  output gradient's three row shifts, g3[n, (i, o)] = g[r - i, x, o] (zero outside the
  image). Their product sums xp[y + i, x + j, c] g[y, x, o] over (image, y, x): tap (i, j).
  """
  b, h, w, c = x.shape
  o = g.shape[-1]
  n = b * (h + 2) * w
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  xw = jnp.concatenate([xp[:, :, j:j + w] for j in range(3)], -1).reshape(n, 3 * c)
  g3 = jnp.concatenate([jnp.pad(g, ((0, 0), (i, 2 - i), (0, 0), (0, 0))) for i in range(3)], -1).reshape(n, 3 * o)
  # Materialise both operands: a dot with fused slicing producers falls off XLA's fast matmul.
  xw, g3 = jax.lax.optimization_barrier((xw, g3))
  dk = jax.lax.dot_general(xw, g3, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return dk.reshape(3, c, 3, o).transpose(2, 0, 1, 3)


def _conv_kernel_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """The 3x3 convolution's kernel gradient in float32: native where it applies, else `_kernel_grad`."""
  dk = native_ops.kernel_grad(x, g)
  return _kernel_grad(x, g) if dk is None else dk


def _conv3x3_bwd(res, g):
  x, kernel = res
  dx = _native_or_xla_conv(g, kernel, flip=True)
  return dx, _conv_kernel_grad(x, g).astype(kernel.dtype)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def _round_bf16(a: jax.Array) -> jax.Array:
  return a.astype(jnp.bfloat16).astype(jnp.float32)


def _with_bf16_products(product, product_amx, kernel_grad, kernel_grad_amx):
  """A linear layer's product(x, kernel) with bfloat16 products and float32 sums, and its VJP.

  x, the kernel and (backward) the output gradient are rounded to bfloat16; every product of
  two bfloat16 values is exact in float32 and the sums are float32 (jax's 'bfloat16' matmul
  precision, the TPU's default for float32 matmuls); the result and gradients are float32.
  `product_amx(x, k, transposed)` and `kernel_grad_amx(x, g)` are the AMX kernels (None where
  they do not apply); `product(x, k, transposed)` and `kernel_grad(x, g)` the float32 ones,
  which then run on the rounded operands: the same maths.
  """
  def apply(x, kernel, transposed=False):
    out = product_amx(x, kernel, transposed)
    return out if out is not None else product(_round_bf16(x), _round_bf16(kernel), transposed)

  @jax.custom_vjp
  def layer(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return apply(x.astype(jnp.float32), kernel.astype(jnp.float32)).astype(x.dtype)

  def fwd(x, kernel):
    return layer(x, kernel), (x, kernel)

  def bwd(res, g):
    x, kernel = res
    x32, g = x.astype(jnp.float32), g.astype(jnp.float32)
    dx = apply(g, kernel.astype(jnp.float32), True)
    dk = kernel_grad_amx(x32, g)
    if dk is None:
      dk = kernel_grad(_round_bf16(x32), _round_bf16(g))
    return dx.astype(x.dtype), dk.astype(kernel.dtype)

  layer.defvjp(fwd, bwd)
  return layer


# The 3x3 convolution with bfloat16 products (see `_with_bf16_products`): on a CPU with AMX tiles
# (Intel Sapphire Rapids or later) all three of its convolutions are `native_ops`' AMX kernels,
# about 4x the float32 kernels.
conv3x3_bf16 = _with_bf16_products(_native_or_xla_conv, native_ops.conv3x3_bf16, _conv_kernel_grad,
                                   native_ops.kernel_grad_bf16)


PRECISIONS = ("float32", "bfloat16")


def _check_precision(precision: str) -> None:
  if precision not in PRECISIONS:
    raise SynthMedError(f"model.matmul_precision={precision!r}; choose one of {list(PRECISIONS)}.")


def backend_conv3x3(x: jax.Array, kernel: jax.Array, precision: str = "float32") -> jax.Array:
  """`conv3x3` (or with precision 'bfloat16' `conv3x3_bf16`) on CPUs. Elsewhere XLA's own
  convolution (its kernel gradient there is cuDNN's), with 'bfloat16' on operands cast to
  bfloat16 and a float32 result."""
  _check_precision(precision)
  if jax.default_backend() == "cpu":
    return conv3x3_bf16(x, kernel) if precision == "bfloat16" else conv3x3(x, kernel)
  if precision == "bfloat16":
    return _conv_of_bf16_operands(x, kernel, (1, 1), "SAME")
  return _conv(x, kernel)


def _conv_of_bf16_operands(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
  """XLA's convolution of x and kernel cast to bfloat16, summed in float32, in x's dtype (the
  'bfloat16' precision on accelerators)."""
  out = _xla_conv(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), strides, padding,
                  preferred_element_type=jnp.float32)
  return out.astype(x.dtype)


def _strided_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The 3x3 stride-2 convolution with one pixel of zero padding all round (guided-diffusion's
  Downsample): out[i, j] = sum over taps of x[2i + di - 1, 2j + dj - 1] kernel[di, dj]."""
  return _xla_conv(x, kernel, (2, 2), ((1, 1), (1, 1)))


@jax.custom_vjp
def _strided_conv_bf16(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`_strided_conv` with bfloat16 products (see `_with_bf16_products`): XLA's float32
  convolutions on rounded operands, forward and backward."""
  return _strided_conv(_round_bf16(x), _round_bf16(kernel)).astype(x.dtype)


def _strided_conv_bf16_fwd(x, kernel):
  return _strided_conv_bf16(x, kernel), (x, kernel)


def _strided_conv_bf16_bwd(res, g):
  x, kernel = res
  dx, dk = jax.vjp(_strided_conv, _round_bf16(x), _round_bf16(kernel))[1](_round_bf16(g.astype(jnp.float32)))
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_strided_conv_bf16.defvjp(_strided_conv_bf16_fwd, _strided_conv_bf16_bwd)


def backend_down_conv3x3(x: jax.Array, kernel: jax.Array, precision: str = "float32") -> jax.Array:
  """`_strided_conv` (the downsampling convolution) at `precision`.

  With 'bfloat16' on a CPU whose AMX kernels take the shapes, it is the stride-1 `conv3x3_bf16`
  at every other pixel (out[i, j] = conv[2i, 2j]): 4x the products, but on AMX tiles, which
  beats XLA's strided float32 convolution 2-3x in all three of its convolutions (the gradient
  of the subsampling is the zero-filled gradient the AMX kernels take as it is). Elsewhere
  XLA's strided convolution: on rounded operands on CPUs, on bfloat16 operands with a float32
  result on accelerators, in float32 at 'float32'.
  """
  _check_precision(precision)
  if precision == "float32":
    return _strided_conv(x, kernel)
  if jax.default_backend() != "cpu":
    return _conv_of_bf16_operands(x, kernel, (2, 2), ((1, 1), (1, 1)))
  if native_ops.conv3x3_bf16_fits(x, kernel):
    return conv3x3_bf16(x, kernel)[:, ::2, ::2]
  return _strided_conv_bf16(x, kernel)


def _add_f32(x: jax.Array, y: jax.Array) -> jax.Array:
  """x + y (broadcast) computed in float32 and stored in x's dtype; y's gradient (x's summed
  over the broadcast axes) is then summed in float32 whatever x's dtype. The identity for float32 x."""
  return (x.astype(jnp.float32) + y.astype(jnp.float32)).astype(x.dtype)


class _KernelAndBias(nn.Module):
  """The fields of a layer with a float32 `kernel` and a zero-initialised `bias`, named as
  Flax's layers name them (checkpoints are interchangeable), computed in `dtype`."""
  features: int
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  def _apply(self, x: jax.Array, kernel_shape: tuple[int, ...], product) -> jax.Array:
    """product(x, kernel) + bias; call from a subclass's compact `__call__`.

    The bias is added in float32, so that its gradient (the output gradient summed over the
    batch and the pixels) is summed in float32 in a 16-bit model too: a bfloat16 sum of
    ~1-sized terms stops growing at 256.
    """
    kernel = self.param("kernel", self.kernel_init, kernel_shape, jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return _add_f32(product(x.astype(self.dtype), kernel.astype(self.dtype)), bias)


class Conv3x3(_KernelAndBias):
  """nn.Conv(features, (3, 3), padding='SAME') with the same parameters, on `conv3x3` (or
  `conv3x3_bf16` with precision 'bfloat16')."""
  precision: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return self._apply(x, (3, 3, x.shape[-1], self.features),
                       functools.partial(backend_conv3x3, precision=self.precision))


class DownConv3x3(_KernelAndBias):
  """nn.Conv(features, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))) with the same
  parameters (name it as Flax names that layer, Conv_<k>), on `backend_down_conv3x3`."""
  precision: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return self._apply(x, (3, 3, x.shape[-1], self.features),
                       functools.partial(backend_down_conv3x3, precision=self.precision))


@jax.custom_vjp
def pixel_dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x (..., m) @ kernel (m, n): a dense layer at every pixel (a 1x1 convolution).

  On a CPU with the native kernels the product and its input gradient are `native_ops.dense`
  and the kernel gradient `native_ops.dense_kernel_grad`, which reads both operands in place
  (XLA first copies one of them into a transposed [channels, pixels] layout). Where they do not
  apply (output channels not a SIMD multiple, not float32), XLA's matmuls.
  """
  return _native_or_xla_dense(x, kernel)


def _native_or_xla_dense(x: jax.Array, kernel: jax.Array, transpose_kernel: bool = False) -> jax.Array:
  out = native_ops.dense(x, kernel, transpose_kernel)
  if out is not None:
    return out
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (1 if transpose_kernel else 0,)), ((), ())))


def _pixel_dense_fwd(x, kernel):
  return _native_or_xla_dense(x, kernel), (x, kernel)


def _dense_kernel_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """A per-pixel dense layer's kernel gradient in float32: native where it applies, else XLA's dot."""
  dk = native_ops.dense_kernel_grad(x, g)
  if dk is None:
    lead = tuple(range(x.ndim - 1))
    dk = jax.lax.dot_general(x, g, ((lead, lead), ((), ())), preferred_element_type=jnp.float32)
  return dk


def _pixel_dense_bwd(res, g):
  x, kernel = res
  dx = _native_or_xla_dense(g, kernel, transpose_kernel=True)
  return dx.astype(x.dtype), _dense_kernel_grad(x, g).astype(kernel.dtype)


pixel_dense.defvjp(_pixel_dense_fwd, _pixel_dense_bwd)

# `pixel_dense` with bfloat16 products (see `_with_bf16_products`), on AMX where it applies.
pixel_dense_bf16 = _with_bf16_products(_native_or_xla_dense, native_ops.dense_bf16, _dense_kernel_grad,
                                       native_ops.dense_kernel_grad_bf16)


def _bf16_dot(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x @ kernel on bfloat16 operands with a float32 result (accelerators' 'bfloat16' precision)."""
  return jnp.dot(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), preferred_element_type=jnp.float32).astype(x.dtype)


class PixelDense(_KernelAndBias):
  """nn.Dense(features) with the same parameters, on `pixel_dense` (or `pixel_dense_bf16` with
  precision 'bfloat16') on CPUs, XLA's dot elsewhere."""
  precision: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _check_precision(self.precision)
    cpu, bf16 = jax.default_backend() == "cpu", self.precision == "bfloat16"
    product = (pixel_dense_bf16 if bf16 else pixel_dense) if cpu else (_bf16_dot if bf16 else jnp.dot)
    return self._apply(x, (x.shape[-1], self.features), product)


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
  dropout: float = 0.0
  use_scale_shift_norm: bool = True
  up: bool = False
  down: bool = False
  dtype: Any = jnp.float32
  matmul_precision: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
    conv = lambda c, init=nn.initializers.lecun_normal(), name=None: Conv3x3(  # noqa: E731
        c, self.dtype, init, self.matmul_precision, name=name)
    h = Norm(name="in_norm")(x, silu=True)
    if self.up or self.down:
      resample = _upsample if self.up else _avg_pool
      h, x = resample(h), resample(x)
    h = conv(self.out_channels, name="in_conv")(h)
    # float32, as emb is: a [batch, channels] product, whose gradient sums over the pixels
    emb_out = nn.Dense(2 * self.out_channels if self.use_scale_shift_norm else self.out_channels,
                       name="emb")(nn.silu(emb))
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = Norm(name="out_norm")(h, scale, shift, silu=True)
    else:
      h = Norm(name="out_norm")(_add_f32(h, _px(emb_out)), silu=True)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(self.out_channels, init=nn.initializers.zeros, name="out_conv")(h)
    if x.shape[-1] != self.out_channels:
      x = PixelDense(self.out_channels, self.dtype, precision=self.matmul_precision, name="skip")(x)
    return x + h


def attend(q: jax.Array, k: jax.Array, v: jax.Array, precision: str = "float32") -> jax.Array:
  """softmax(q k^T / sqrt(d)) v for [batch, tokens, heads, head_dim] inputs, softmax in float32.

  On GPU in 16-bit this is cuDNN's fused (flash) attention; elsewhere two
  heads-major matmuls, which XLA's CPU backend runs fastest (measured with `bench/unet.py`), or with
  precision 'bfloat16' `attend_bf16`.
  """
  if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  _check_precision(precision)
  if precision == "bfloat16":
    return attend_bf16(q, k, v)
  q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [b, heads, n, d]
  logits = jnp.matmul(q, k.transpose(0, 1, 3, 2)) / math.sqrt(q.shape[-1])
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.matmul(weights, v).transpose(0, 2, 1, 3)


def _bf16_einsum(spec: str, x: jax.Array, y: jax.Array) -> jax.Array:
  """einsum of x and y rounded to bfloat16, products exact and sums in float32."""
  return jnp.einsum(spec, x.astype(jnp.bfloat16), y.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


@jax.custom_vjp
def attend_bf16(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """`attend` with bfloat16 products and float32 sums ([batch, tokens, heads, head_dim]).

  Every operand of attention's six products is rounded to bfloat16: q, k for the scores; the
  probabilities P and v for the output; in the backward dout, v and P for dP and dv, and dS
  with k and q for dq and dk. The softmax, its log-sum-exp and dS = P (dP - rowsum(P dP)) /
  sqrt(d) stay float32. This is the maths of `native_ops`' attention kernels with bfloat16
  products (on AMX tiles where the CPU has them), and the reference they are tested against.
  """
  return _attend_bf16_fwd(q, k, v)[0]


def _attend_bf16_fwd(q, k, v):
  scale = 1.0 / math.sqrt(q.shape[-1])
  p = jax.nn.softmax(_bf16_einsum("bnhd,bmhd->bhnm", q, k) * scale, axis=-1)
  return _bf16_einsum("bhnm,bmhd->bnhd", p, v).astype(q.dtype), (q, k, v, p)


def _attend_bf16_bwd(res, dout):
  q, k, v, p = res
  dout = dout.astype(jnp.float32)
  dp = _bf16_einsum("bnhd,bmhd->bhnm", dout, v)
  ds = p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True)) / math.sqrt(q.shape[-1])
  dq = _bf16_einsum("bhnm,bmhd->bnhd", ds, k)
  dk = _bf16_einsum("bhnm,bnhd->bmhd", ds, q)
  dv = _bf16_einsum("bhnm,bnhd->bmhd", p, dout)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


attend_bf16.defvjp(_attend_bf16_fwd, _attend_bf16_bwd)


def _native_operand(a: jax.Array, products: int) -> jax.Array:
  """What the native attention kernel takes for `products`: operands rounded to bfloat16 when
  its float32 kernel computes bfloat16 products (mode ATTN_ROUNDED_BF16), else as they are."""
  return _round_bf16(a) if products == native_ops.ATTN_ROUNDED_BF16 else a


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def attend_qkv(qkv: jax.Array, products: int = native_ops.ATTN_FLOAT32) -> jax.Array:
  """`attend` of packed qkv [batch, tokens, 3, heads, head_dim] as `native_ops`' C++ kernels (CPUs).

  The forward keeps each row's log-sum-exp; the backward recomputes the softmax from it and
  writes d(qkv) in the packed layout, so no slices or transposes of qkv are materialised.
  `products` (`native_ops.attention_products`) is float32 or `attend_bf16`'s bfloat16 maths.
  """
  return _attend_qkv_fwd(qkv, products)[0]


def _attend_qkv_fwd(qkv, products):
  out, lse = native_ops.attention_fwd(_native_operand(qkv, products), products)
  return out, (qkv, lse)


def _attend_qkv_bwd(products, res, dout):
  qkv, lse = res
  dout = _native_operand(dout.astype(jnp.float32), products)
  return (native_ops.attention_bwd(_native_operand(qkv, products), lse, dout, products).astype(qkv.dtype),)


attend_qkv.defvjp(_attend_qkv_fwd, _attend_qkv_bwd)


class Attention(nn.Module):
  """Multi-head self-attention over the spatial positions (heads of `num_head_channels`)."""
  num_head_channels: int = 64
  dtype: Any = jnp.float32
  matmul_precision: str = "float32"  # of the qkv and output projections and attention's products

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    heads = max(c // self.num_head_channels, 1) if self.num_head_channels > 0 else 1
    if c % heads:
      raise SynthMedError(f"attention over {c} channels cannot be split into heads of "
                          f"{self.num_head_channels} channels; choose num_head_channels dividing "
                          "model_channels * channel_mult.")
    y = Norm(name="norm")(x).reshape(b, h * w, c)
    qkv = PixelDense(3 * c, self.dtype, precision=self.matmul_precision, name="qkv")(y).reshape(b, h * w, 3, heads, c // heads)
    bf16 = self.matmul_precision == "bfloat16"
    if native_ops.attention_fits(qkv):
      out = attend_qkv(qkv, native_ops.attention_products(qkv, bf16)).reshape(b, h * w, c)
    else:
      out = attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.matmul_precision).reshape(b, h * w, c)
    out = PixelDense(c, self.dtype, nn.initializers.zeros, self.matmul_precision, name="proj_out")(out)
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
  # 'bfloat16': the 3x3 convolutions' (the stride-2 downsampling ones too), per-pixel dense
  # layers' and attention's products round their operands to bfloat16 and sum in float32
  # (`conv3x3_bf16`, `backend_down_conv3x3`, `pixel_dense_bf16`, `attend_qkv`: AMX tiles on
  # recent Xeons); activations, norms, the softmax and parameters stay as they are.
  matmul_precision: str = "float32"

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
    _check_precision(self.matmul_precision)
    res_block = lambda c, **kw: ResBlock(c, self.dropout, self.use_scale_shift_norm,  # noqa: E731
                                         dtype=self.dtype, matmul_precision=self.matmul_precision, **kw)
    conv = functools.partial(Conv3x3, dtype=self.dtype, precision=self.matmul_precision)
    h = conv(ch, name="input_conv")(x.astype(self.dtype))
    skips, ds = [h], 1
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        h = res_block(mult * ch)(h, emb, train)
        if ds in self.attention_resolutions:
          h = Attention(self.num_head_channels, self.dtype, self.matmul_precision)(h)
        skips.append(h)
      if level != len(self.channel_mult) - 1:
        if self.resblock_updown:
          h = res_block(mult * ch, down=True)(h, emb, train)
        else:
          # named as the nn.Conv it replaces was: checkpoints from before load as they are
          h = DownConv3x3(h.shape[-1], dtype=self.dtype, precision=self.matmul_precision,
                          name=f"Conv_{level}")(h)
        ds *= 2
        skips.append(h)
    h = res_block(h.shape[-1])(h, emb, train)
    h = Attention(self.num_head_channels, self.dtype, self.matmul_precision)(h)
    h = res_block(h.shape[-1])(h, emb, train)
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res_block(mult * ch)(h, emb, train)
        if ds in self.attention_resolutions:
          h = Attention(self.num_head_channels, self.dtype, self.matmul_precision)(h)
        if level and i == self.num_res_blocks:
          if self.resblock_updown:
            h = res_block(mult * ch, up=True)(h, emb, train)
          else:
            h = conv(mult * ch)(_upsample(h))
          ds //= 2
    h = Norm(name="out_norm")(h, silu=True)
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
