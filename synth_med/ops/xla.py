"""The UNet's ops in plain JAX/XLA: the reference maths every backend's ops are tested against.

NHWC activations, HWIO kernels. Each op takes its operands in the model's compute dtype:

- `conv3x3(x, kernel)`: 3x3 'SAME' stride-1 convolution; `down_conv3x3`: the stride-2 one with
  one pixel of zero padding (guided-diffusion's Downsample);
- `dense(x, kernel)`: a dense layer at every pixel (a 1x1 convolution);
- `group_norm_act(x, a, b, groups, silu)`: GroupNorm, a per-(image, channel) affine, SiLU,
  with a custom VJP that recomputes rather than stores;
- `attend(q, k, v)` / `attend_qkv(qkv)`: softmax(q k^T / sqrt(d)) v with the softmax in float32.

'bfloat16' matmul precision (`*_bf16_operands`, `attend_bf16`): operands cast (or rounded) to
bfloat16, products summed in float32, as TPUs and GPUs compute bfloat16 matmuls.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

BF16 = jnp.bfloat16


def round_bf16(a: jax.Array) -> jax.Array:
  """a rounded to bfloat16 and back to float32: a product of two such values is exact in float32."""
  return a.astype(BF16).astype(jnp.float32)


def conv(x: jax.Array, kernel: jax.Array, strides, padding, **kw) -> jax.Array:
  """XLA's NHWC x HWIO convolution (the one place its layout is spelled out)."""
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw)


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return conv(x, kernel, (1, 1), "SAME")


def down_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """out[i, j] = sum over taps of x[2i + di - 1, 2j + dj - 1] kernel[di, dj]."""
  return conv(x, kernel, (2, 2), ((1, 1), (1, 1)))


def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x (..., m) @ kernel (m, n)."""
  return jnp.dot(x, kernel)


def conv3x3_bf16_operands(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return conv(x.astype(BF16), kernel.astype(BF16), (1, 1), "SAME", preferred_element_type=jnp.float32).astype(x.dtype)


def down_conv3x3_bf16_operands(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return conv(x.astype(BF16), kernel.astype(BF16), (2, 2), ((1, 1), (1, 1)),
              preferred_element_type=jnp.float32).astype(x.dtype)


def dense_bf16_operands(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jnp.dot(x.astype(BF16), kernel.astype(BF16), preferred_element_type=jnp.float32).astype(x.dtype)


def kernel_grad_matmul(x: jax.Array, g: jax.Array) -> jax.Array:
  """d(sum(conv3x3(x, k) * g))/dk, shape (3, 3, c, o), as one matmul over N = b (h+2) w rows.

  Row n = (image, padded row r, column x). The left operand holds the zero-padded
  input's three column shifts, xw[n, (j, c)] = xp[r, x + j, c]; the right one the
  output gradient's three row shifts, g3[n, (i, o)] = g[r - i, x, o] (zero outside the
  image). Their product sums xp[y + i, x + j, c] g[y, x, o] over (image, y, x): tap (i, j).
  On CPUs this is 2-3x XLA's own kernel gradient, a convolution over the batch.
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


def input_grad3x3(g: jax.Array, kernel: jax.Array) -> jax.Array:
  """d(sum(conv3x3(x, kernel) * g))/dx: g convolved with the flipped kernel, channel axes swapped."""
  return conv3x3(g, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))


@jax.custom_vjp
def conv3x3_matmul_grad(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv3x3` whose kernel gradient is `kernel_grad_matmul` (the CPU ops' fallback)."""
  return conv3x3(x, kernel)


conv3x3_matmul_grad.defvjp(lambda x, k: (conv3x3(x, k), (x, k)),
                           lambda res, g: (input_grad3x3(g, res[1]),
                                           kernel_grad_matmul(res[0], g).astype(res[1].dtype)))


def _group_mean(per_channel: jax.Array, groups: int, n: int) -> jax.Array:
  """[B, C] per-channel sums → each channel's group total / n, still [B, C]."""
  b, c = per_channel.shape
  return jnp.repeat(per_channel.reshape(b, groups, -1).sum(-1) / n, c // groups, axis=1)


def group_stats(xf: jax.Array, groups: int) -> tuple[jax.Array, jax.Array]:
  """Per (image, channel) copies of each group's mean and 1/std over (H, W, channels of the group).

  Written as per-channel sums (one pass for Σx and Σx²), which XLA's CPU backend runs
  ~2-5x faster than the generic reshape-and-reduce form (measured with `bench/unet.py`).
  """
  _, h, w, c = xf.shape
  n = h * w * (c // groups)
  mean = _group_mean(jnp.sum(xf, axis=(1, 2)), groups, n)
  mean_sq = _group_mean(jnp.sum(jnp.square(xf), axis=(1, 2)), groups, n)
  return mean, jax.lax.rsqrt(jnp.maximum(mean_sq - jnp.square(mean), 0.0) + 1e-5)


def _px(v: jax.Array) -> jax.Array:
  """[B, C] → [B, 1, 1, C], to broadcast a per-(image, channel) value over the pixels."""
  return v[:, None, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm_act(x: jax.Array, a: jax.Array, b: jax.Array, groups: int, silu: bool) -> jax.Array:
  """act(GroupNorm(x) * a + b) in float32, with `a` and `b` per (image, channel): [B, C].

  One op for the UNet's norm → affine (and scale-shift) → SiLU chain, so its gradient
  is two passes over x and dy (one for the four per-channel sums, one for dx), with
  the normalised input and the SiLU recomputed instead of stored. Autodiff of the
  same chain stores and re-reads more, and is 20-30 % slower on CPU (measured with `bench/unet.py`).
  """
  return group_norm_act_fwd(x, a, b, groups, silu)[0]


def group_norm_act_fwd(x, a, b, groups, silu):
  """(y, residuals) of `group_norm_act`; the residuals are (x, a, b, mean, 1/std)."""
  xf = x.astype(jnp.float32)
  mean, inv = group_stats(xf, groups)
  scale = inv * a
  z = xf * _px(scale) + _px(b - mean * scale)
  y = z * jax.nn.sigmoid(z) if silu else z
  return y.astype(x.dtype), (x, a, b, mean, inv)


def group_norm_act_bwd(groups, silu, res, dy):
  """(dx, da, db) of `group_norm_act`, from `group_norm_act_fwd`'s residuals."""
  x, a, b, mean, inv = res
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


group_norm_act.defvjp(group_norm_act_fwd, group_norm_act_bwd)


def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v for [batch, tokens, heads, head_dim] inputs, softmax in float32,
  as two heads-major matmuls (which XLA's CPU backend runs fastest, measured with `bench/unet.py`)."""
  q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [b, heads, n, d]
  logits = jnp.matmul(q, k.transpose(0, 1, 3, 2)) / math.sqrt(q.shape[-1])
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.matmul(weights, v).transpose(0, 2, 1, 3)


def _bf16_einsum(spec: str, x: jax.Array, y: jax.Array) -> jax.Array:
  """einsum of x and y rounded to bfloat16, products exact and sums in float32."""
  return jnp.einsum(spec, x.astype(BF16), y.astype(BF16), preferred_element_type=jnp.float32)


@jax.custom_vjp
def attend_bf16(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """`attend` with bfloat16 products and float32 sums ([batch, tokens, heads, head_dim]).

  Every operand of attention's six products is rounded to bfloat16: q, k for the scores; the
  probabilities P and v for the output; in the backward dout, v and P for dP and dv, and dS
  with k and q for dq and dk. The softmax, its log-sum-exp and dS = P (dP - rowsum(P dP)) /
  sqrt(d) stay float32. This is the maths of the native attention kernels with bfloat16
  products (`cpu_native`, on AMX tiles where the CPU has them), and their test reference.
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


def attend_qkv(qkv: jax.Array, bf16_products: bool = False, fused: str | None = None) -> jax.Array:
  """Attention of packed qkv [batch, tokens, 3, heads, head_dim] → [batch, tokens, heads, head_dim].

  `fused` names a `jax.nn.dot_product_attention` implementation ('cudnn': the fused flash
  kernel on GPUs) used for 16-bit qkv; otherwise `attend`, or `attend_bf16` with `bf16_products`.
  """
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  if fused is not None and qkv.dtype in (jnp.bfloat16, jnp.float16):
    return jax.nn.dot_product_attention(q, k, v, implementation=fused)
  return attend_bf16(q, k, v) if bf16_products else attend(q, k, v)
