"""The CPU ops: `kernels`' native C++ custom calls where they apply, XLA's maths where they do not.

Each op has a custom VJP whose directions pick separately (a convolution's forward may run
natively while its 3-channel input gradient runs on XLA): the native kernels need float32
operands and channel counts that are multiples of the compiled SIMD width, and are off
without a compiler or with `SYNTH_MED_NATIVE_KERNELS=0`. The results equal `xla`'s up to
float32 summation order (tested in `tests/test_native_ops.py`). CPU only: the custom calls
exist on no other platform.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from synth_med.ops import xla
from synth_med.ops.cpu_native import kernels


def _native_or_xla_conv(x: jax.Array, kernel: jax.Array, flip: bool = False) -> jax.Array:
  """conv(x, kernel), or with `flip` conv(x, kernel flipped with its channel axes swapped): the input gradient."""
  out = kernels.conv3x3(x, kernel, flip)
  if out is not None:
    return out
  return xla.input_grad3x3(x, kernel) if flip else xla.conv3x3(x, kernel)


def _conv_kernel_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """The 3x3 convolution's kernel gradient in float32: native where it applies, else one matmul."""
  dk = kernels.kernel_grad(x, g)
  return xla.kernel_grad_matmul(x, g) if dk is None else dk


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3x3 'SAME' convolution (NHWC, HWIO).

  The convolution and its input gradient are `kernels.conv3x3` (about 15 % over XLA's), and
  the kernel gradient `kernels.kernel_grad` (2-2.5x XLA's, which computes it as a
  convolution over the batch at a third to a half of the forward's FLOP rate). Where they do
  not apply, XLA's convolutions and the one matmul of `xla.kernel_grad_matmul`.
  """
  return _native_or_xla_conv(x, kernel)


def _conv3x3_bwd(res, g):
  x, kernel = res
  dx = _native_or_xla_conv(g, kernel, flip=True)
  return dx, _conv_kernel_grad(x, g).astype(kernel.dtype)


conv3x3.defvjp(lambda x, kernel: (_native_or_xla_conv(x, kernel), (x, kernel)), _conv3x3_bwd)


def _native_or_xla_dense(x: jax.Array, kernel: jax.Array, transpose_kernel: bool = False) -> jax.Array:
  out = kernels.dense(x, kernel, transpose_kernel)
  if out is not None:
    return out
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (1 if transpose_kernel else 0,)), ((), ())))


def _dense_kernel_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """A per-pixel dense layer's kernel gradient in float32: native where it applies, else XLA's dot."""
  dk = kernels.dense_kernel_grad(x, g)
  if dk is None:
    lead = tuple(range(x.ndim - 1))
    dk = jax.lax.dot_general(x, g, ((lead, lead), ((), ())), preferred_element_type=jnp.float32)
  return dk


@jax.custom_vjp
def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x (..., m) @ kernel (m, n): a dense layer at every pixel (a 1x1 convolution).

  The product and its input gradient are `kernels.dense` and the kernel gradient
  `kernels.dense_kernel_grad`, which reads both operands in place (XLA first copies one of
  them into a transposed [channels, pixels] layout). Where they do not apply, XLA's matmuls.
  """
  return _native_or_xla_dense(x, kernel)


def _dense_bwd(res, g):
  x, kernel = res
  dx = _native_or_xla_dense(g, kernel, transpose_kernel=True)
  return dx.astype(x.dtype), _dense_kernel_grad(x, g).astype(kernel.dtype)


dense.defvjp(lambda x, kernel: (_native_or_xla_dense(x, kernel), (x, kernel)), _dense_bwd)


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
    return out if out is not None else product(xla.round_bf16(x), xla.round_bf16(kernel), transposed)

  @jax.custom_vjp
  def layer(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return apply(x.astype(jnp.float32), kernel.astype(jnp.float32)).astype(x.dtype)

  def bwd(res, g):
    x, kernel = res
    x32, g = x.astype(jnp.float32), g.astype(jnp.float32)
    dx = apply(g, kernel.astype(jnp.float32), True)
    dk = kernel_grad_amx(x32, g)
    if dk is None:
      dk = kernel_grad(xla.round_bf16(x32), xla.round_bf16(g))
    return dx.astype(x.dtype), dk.astype(kernel.dtype)

  layer.defvjp(lambda x, kernel: (layer(x, kernel), (x, kernel)), bwd)
  return layer


# The 3x3 convolution with bfloat16 products: on a CPU with AMX tiles (Intel Sapphire Rapids or
# later) all three of its convolutions are AMX kernels, about 4x the float32 kernels.
conv3x3_bf16 = _with_bf16_products(_native_or_xla_conv, kernels.conv3x3_bf16, _conv_kernel_grad,
                                   kernels.kernel_grad_bf16)
# `dense` with bfloat16 products, on AMX where it applies.
dense_bf16 = _with_bf16_products(_native_or_xla_dense, kernels.dense_bf16, _dense_kernel_grad,
                                 kernels.dense_kernel_grad_bf16)


@jax.custom_vjp
def _down_conv3x3_rounded(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`xla.down_conv3x3` with bfloat16 products: XLA's float32 convolutions on rounded operands."""
  return xla.down_conv3x3(xla.round_bf16(x), xla.round_bf16(kernel)).astype(x.dtype)


def _down_conv3x3_rounded_bwd(res, g):
  x, kernel = res
  r = xla.round_bf16
  dx, dk = jax.vjp(xla.down_conv3x3, r(x), r(kernel))[1](r(g.astype(jnp.float32)))
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_down_conv3x3_rounded.defvjp(lambda x, k: (_down_conv3x3_rounded(x, k), (x, k)), _down_conv3x3_rounded_bwd)


def down_conv3x3_bf16(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The downsampling convolution with bfloat16 products.

  Where the AMX kernels take the shapes it is the stride-1 `conv3x3_bf16` at every other pixel
  (out[i, j] = conv[2i, 2j]): 4x the products, but on AMX tiles, which beats XLA's strided
  float32 convolution 2-3x in all three of its convolutions (the gradient of the subsampling is
  the zero-filled gradient the AMX kernels take as it is). Elsewhere XLA's strided convolution
  on rounded operands.
  """
  if kernels.conv3x3_bf16_fits(x, kernel):
    return conv3x3_bf16(x, kernel)[:, ::2, ::2]
  return _down_conv3x3_rounded(x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _native_group_norm_act(x, a, b, groups, silu):
  return kernels.group_norm_act_fwd(x, a, b, groups, silu)[0]


def _native_group_norm_act_fwd(x, a, b, groups, silu):
  y, mean, inv = kernels.group_norm_act_fwd(x, a, b, groups, silu)
  return y, (x, a, b, mean, inv)


def _native_group_norm_act_bwd(groups, silu, res, dy):
  x, a, b, mean, inv = res
  dx, da, db = kernels.group_norm_act_bwd(x, a, b, mean, inv, dy, groups, silu)
  return dx, da.astype(a.dtype), db.astype(b.dtype)


_native_group_norm_act.defvjp(_native_group_norm_act_fwd, _native_group_norm_act_bwd)


def group_norm_act(x: jax.Array, a: jax.Array, b: jax.Array, groups: int, silu: bool) -> jax.Array:
  """`xla.group_norm_act` as C++ kernels that work image by image in cache, where they apply
  (float32, channels a multiple of the SIMD width); else `xla.group_norm_act`."""
  if kernels.norm_fits(x, groups):
    return _native_group_norm_act(x, a, b, groups, silu)
  return xla.group_norm_act(x, a, b, groups, silu)


def _native_operand(a: jax.Array, products: int) -> jax.Array:
  """What the native attention kernel takes for `products`: operands rounded to bfloat16 when
  its float32 kernel computes bfloat16 products (mode ATTN_ROUNDED_BF16), else as they are."""
  return xla.round_bf16(a) if products == kernels.ATTN_ROUNDED_BF16 else a


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def native_attend_qkv(qkv: jax.Array, products: int = kernels.ATTN_FLOAT32) -> jax.Array:
  """Attention of packed qkv [batch, tokens, 3, heads, head_dim] as C++ kernels.

  The forward keeps each row's log-sum-exp; the backward recomputes the softmax from it and
  writes d(qkv) in the packed layout, so no slices or transposes of qkv are materialised.
  `products` (`kernels.attention_products`) is float32 or `xla.attend_bf16`'s bfloat16 maths.
  """
  return _native_attend_qkv_fwd(qkv, products)[0]


def _native_attend_qkv_fwd(qkv, products):
  out, lse = kernels.attention_fwd(_native_operand(qkv, products), products)
  return out, (qkv, lse)


def _native_attend_qkv_bwd(products, res, dout):
  qkv, lse = res
  dout = _native_operand(dout.astype(jnp.float32), products)
  return (kernels.attention_bwd(_native_operand(qkv, products), lse, dout, products).astype(qkv.dtype),)


native_attend_qkv.defvjp(_native_attend_qkv_fwd, _native_attend_qkv_bwd)


def attend_qkv(qkv: jax.Array, bf16_products: bool = False) -> jax.Array:
  """`xla.attend_qkv` on the native kernels where they apply (float32, tokens and head_dim
  multiples of the SIMD width), else XLA's."""
  if kernels.attention_fits(qkv):
    return native_attend_qkv(qkv, kernels.attention_products(qkv, bf16_products))
  return xla.attend_qkv(qkv, bf16_products)
