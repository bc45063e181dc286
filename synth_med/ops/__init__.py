"""The UNet's compute ops, chosen once when a model is built.

An `Ops` value holds the five ops the UNet computes with; `models/unet.py` takes one and
names no backend. `select_ops(backend, precision)` picks:

- 'cpu': `cpu_native` (C++ kernels where they apply, XLA's maths elsewhere);
- 'gpu': `xla` with cuDNN's fused attention for 16-bit activations;
- anything else (TPU): `xla`.

`precision` is the matmul precision: 'float32', or 'bfloat16' (operands rounded to bfloat16,
products summed in float32; activations, norms, the softmax and parameters stay as they are).
All choices compute the same maths as `xla_ops('float32')`, the reference, up to float32
summation order (and bfloat16 rounding at 'bfloat16').
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax

from synth_med.errors import SynthMedError
from synth_med.ops import xla
from synth_med.ops.cpu_native import layers as cpu_layers

PRECISIONS = ("float32", "bfloat16")
Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Ops:
  """The UNet's ops. Operands arrive in the model's compute dtype; results come back in it.

  conv3x3(x, kernel): 3x3 'SAME' stride-1 convolution, NHWC x HWIO.
  down_conv3x3(x, kernel): 3x3 stride-2 convolution with one pixel of zero padding.
  dense(x, kernel): x (..., m) @ kernel (m, n) at every pixel.
  norm_act(x, a, b, groups, silu): act(GroupNorm(x) * a + b), a and b per (image, channel) [B, C].
  attention(qkv): softmax(q k^T / sqrt(d)) v of packed qkv [B, N, 3, heads, d] → [B, N, heads, d].
  """
  name: str
  conv3x3: Callable[[Array, Array], Array]
  down_conv3x3: Callable[[Array, Array], Array]
  dense: Callable[[Array, Array], Array]
  norm_act: Callable[[Array, Array, Array, int, bool], Array]
  attention: Callable[[Array], Array]


def check_precision(precision: str) -> None:
  if precision not in PRECISIONS:
    raise SynthMedError(f"model.matmul_precision={precision!r}; choose one of {list(PRECISIONS)}.")


@functools.lru_cache(maxsize=None)
def xla_ops(precision: str = "float32", fused_attention: str | None = None) -> Ops:
  """Plain XLA ops; `fused_attention` names a `jax.nn.dot_product_attention` implementation
  for 16-bit activations ('cudnn' on GPUs)."""
  check_precision(precision)
  bf16 = precision == "bfloat16"
  attention = functools.partial(xla.attend_qkv, bf16_products=bf16, fused=fused_attention)
  if bf16:
    return Ops(f"xla-{precision}", xla.conv3x3_bf16_operands, xla.down_conv3x3_bf16_operands,
               xla.dense_bf16_operands, xla.group_norm_act, attention)
  return Ops(f"xla-{precision}", xla.conv3x3, xla.down_conv3x3, xla.dense, xla.group_norm_act, attention)


@functools.lru_cache(maxsize=None)
def cpu_ops(precision: str = "float32") -> Ops:
  """The CPU ops: `cpu_native`'s C++ kernels where they apply. 'bfloat16' products run on AMX
  tiles where the CPU has them, else as float32 products of rounded operands (the same maths)."""
  check_precision(precision)
  if precision == "bfloat16":
    return Ops("cpu-bfloat16", cpu_layers.conv3x3_bf16, cpu_layers.down_conv3x3_bf16, cpu_layers.dense_bf16,
               cpu_layers.group_norm_act, functools.partial(cpu_layers.attend_qkv, bf16_products=True))
  return Ops("cpu-float32", cpu_layers.conv3x3, xla.down_conv3x3, cpu_layers.dense, cpu_layers.group_norm_act,
             cpu_layers.attend_qkv)


def select_ops(backend: str, precision: str = "float32") -> Ops:
  """The ops for a JAX backend name ('cpu', 'gpu', 'tpu', ...; `jax.default_backend()`)."""
  if backend == "cpu":
    return cpu_ops(precision)
  return xla_ops(precision, "cudnn" if backend == "gpu" else None)
