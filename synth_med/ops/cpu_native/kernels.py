"""Native C++ CPU kernels for the UNet's hottest ops, as XLA FFI custom calls built on first use.

The ops, sources in `src/` (one `.so`):

- `conv3x3(x, kernel, flip)`: the 3x3 'SAME' stride-1 convolution, and (`flip`) its input
  gradient, each image copied once into a zero-bordered scratch and accumulated in register
  tiles of outer products over the 9 taps (about 15 % over XLA's, 6x on the 3-channel input conv);
- `kernel_grad(x, g)`: the 3x3 convolution's kernel gradient (3, 3, c, o), reading both
  NHWC operands in place and accumulating register tiles of outer products (2-2.5x XLA's
  own path, 10x on the 32 -> 3 output conv);
- `dense(x, kernel, transpose_kernel)` and `dense_kernel_grad(x, g)`: a dense layer applied at
  every pixel (the UNet's 1x1 skip convolutions and attention projections), its input gradient
  and its kernel gradient, read in place (for the kernel gradient XLA first copies an operand
  into a transposed layout);
- `group_norm_act_fwd` / `_bwd`: GroupNorm -> per-(image, channel) affine -> SiLU, image by
  image in cache (`xla.group_norm_act`'s maths);
- `attention_fwd` / `_bwd`: softmax(q k^T / sqrt(d)) v on packed qkv [B, N, 3, heads, d],
  one N x N score matrix per (image, head) in cache, the backward recomputing the softmax
  from the saved log-sum-exp. `products` picks float32 products, or `xla.attend_bf16`'s
  bfloat16 products (on AMX tiles through `amx_gemm`, 2.5-3x the float32 kernel; without AMX
  the float32 kernel on rounded operands); `attention_products` picks it per CPU and shape.
- `conv3x3_bf16`, `kernel_grad_bf16`, `dense_bf16`, `dense_kernel_grad_bf16`: the
  convolution's and dense layer's products with bfloat16 products and float32 sums on the AMX
  tile units of Intel Xeons (Sapphire Rapids and later; `amx_available()`), for the UNet's
  `matmul_precision='bfloat16'`: about 4x the float32 kernels (`src/amx_products.cc`).

`cpu_native.layers` (the CPU `Ops`, see `synth_med.ops`) uses them and keeps XLA's paths
where they do not apply:

- `SYNTH_MED_NATIVE_KERNELS=0` in the environment turns them off;
- no C++ compiler (`$CXX`, else `c++`/`g++`/`clang++`), or the build fails: one warning says why;
- shapes that do not fit the compiled SIMD width (8 or 16 floats), or dtypes other than float32.

The shared library is compiled once with `-O3 -march=native` and cached under
`$SYNTH_MED_NATIVE_CACHE` (default `~/.cache/synth_med/native`), keyed by the sources, the
flags, the jax version and the CPU's model and feature flags; it is written to a temporary
name and renamed, so processes building at once never load a partial file. Each kernel is
single-threaded: the project runs one XLA device per core (`cpu_devices`).

Under a device mesh each op is partitioned over the batch (`custom_partitioning`): the
convolutions, dense layers, norm and attention run on each device's own images with the
whole (replicated) kernel; the kernel gradients sum each device's images and all-reduce, as
XLA does for its own matmul over the batch. `custom_partitioning` has no
batching rule, so a model using these ops cannot be `jax.vmap`ped (JAX raises "Batching rule
for 'custom_partitioning' not implemented"); set `SYNTH_MED_NATIVE_KERNELS=0` for that
(or build the model on `synth_med.ops.xla_ops()`). Nothing in synth_med vmaps a model. Speed
figures: `bench/unet.py` and `bench/README.md`.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

NATIVE_DIR = Path(__file__).with_name("src")
SOURCES = ("conv3x3.cc", "conv_kernel_grad.cc", "dense.cc", "group_norm_act.cc", "attention.cc", "amx_products.cc")
CONV = "synth_med_conv3x3"
CONV_BF16, KERNEL_GRAD_BF16 = "synth_med_conv3x3_bf16", "synth_med_conv3x3_kernel_grad_bf16"
DENSE_BF16, DENSE_GRAD_BF16 = "synth_med_dense_bf16", "synth_med_dense_kernel_grad_bf16"
KERNEL_GRAD = "synth_med_conv3x3_kernel_grad"
DENSE, DENSE_GRAD = "synth_med_dense", "synth_med_dense_kernel_grad"
NORM_FWD, NORM_BWD = "synth_med_group_norm_act_fwd", "synth_med_group_norm_act_bwd"
ATTN_FWD, ATTN_BWD = "synth_med_attention_fwd", "synth_med_attention_bwd"
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC")
_ENV_SWITCH = "SYNTH_MED_NATIVE_KERNELS"
_ENV_CACHE = "SYNTH_MED_NATIVE_CACHE"

_lock = threading.Lock()
_state: dict[str, object] = {}


class NativeBuildError(RuntimeError):
  """The native kernel could not be compiled or loaded (the message says why)."""


def enabled() -> bool:
  """False when `SYNTH_MED_NATIVE_KERNELS` is 0/false/off/no."""
  return os.environ.get(_ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def compiler() -> str | None:
  """The C++ compiler to use: `$CXX`, else the first of c++ / g++ / clang++ on PATH."""
  if os.environ.get("CXX"):
    return os.environ["CXX"]
  return next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)


def _cpu_fingerprint() -> str:
  """Model name and feature flags: a `-march=native` build is only valid on such a CPU."""
  try:
    info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    keep = [ln for ln in info.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(keep)
  except OSError:
    return platform.processor() + platform.machine()


def cache_dir() -> Path:
  return Path(os.environ.get(_ENV_CACHE) or Path.home() / ".cache" / "synth_med" / "native")


def library_path(cxx: str, extra_flags: tuple[str, ...] = ()) -> Path:
  """Where the build for this source, compiler, flags, jax and CPU lives."""
  texts = [p.read_text() for p in sorted(NATIVE_DIR.glob("*")) if p.suffix in (".cc", ".h")]
  key = hashlib.sha256("\0".join([*texts, cxx, *FLAGS, *extra_flags, jax.__version__,
                                  _cpu_fingerprint()]).encode())
  return cache_dir() / f"synth_med_native-{key.hexdigest()[:16]}.so"


def build(force: bool = False, extra_flags: tuple[str, ...] = ()) -> Path:
  """Compiles the kernel (unless cached) and returns the shared library's path.

  `extra_flags` go after the defaults (the tests build the AVX2 variant with `-mno-avx512f`).
  """
  cxx = compiler()
  if cxx is None:
    raise NativeBuildError("no C++ compiler found (set $CXX, or install g++)")
  out = library_path(cxx, extra_flags)
  if out.exists() and not force:
    return out
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  except OSError:  # an unwritable cache directory (a read-only home): build in the temp dir
    out = Path(tempfile.gettempdir()) / f"synth_med_native_{os.getuid()}" / out.name
    if out.exists() and not force:
      return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  os.close(fd)
  cmd = [cxx, *FLAGS, *extra_flags, f"-I{jax.ffi.include_dir()}", *(str(NATIVE_DIR / f) for f in SOURCES),
         "-o", tmp]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
      raise NativeBuildError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return out


def simd_width() -> int | None:
  """Floats per SIMD vector of the loaded kernel, or None if it is not available.

  The first call builds (or finds) the library and registers the custom call.
  """
  with _lock:
    if "width" in _state:
      return _state["width"]  # type: ignore[return-value]
    width = None
    if enabled():
      try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
        for name, fn in ((CONV, lib.SynthMedConv3x3), (KERNEL_GRAD, lib.SynthMedKernelGrad),
                         (DENSE, lib.SynthMedDense), (DENSE_GRAD, lib.SynthMedDenseGrad), (NORM_FWD, lib.SynthMedGroupNormActFwd),
                         (NORM_BWD, lib.SynthMedGroupNormActBwd), (ATTN_FWD, lib.SynthMedAttentionFwd),
                         (ATTN_BWD, lib.SynthMedAttentionBwd)):
          jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(fn), platform="cpu")
        width = int(lib.synth_med_simd_width())
        _state["amx"] = bool(lib.synth_med_amx_available())
        if _state["amx"]:
          for name, fn in ((CONV_BF16, lib.SynthMedConv3x3Bf16), (KERNEL_GRAD_BF16, lib.SynthMedKernelGradBf16),
                           (DENSE_BF16, lib.SynthMedDenseBf16), (DENSE_GRAD_BF16, lib.SynthMedDenseGradBf16)):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(fn), platform="cpu")
        _state["lib"] = lib
      except (NativeBuildError, OSError, AttributeError) as e:
        logging.warning("synth_med: the native CPU kernels are off, using XLA's paths (%s). "
                        "Set %s=0 to skip the attempt.", e, _ENV_SWITCH)
    _state["width"] = width
    return width


def amx_available() -> bool:
  """Whether the bfloat16-product convolutions run on AMX tiles here: the native kernels are
  built, the CPU has AMX (Intel Sapphire Rapids or later), and the OS grants the tile state."""
  return simd_width() is not None and bool(_state.get("amx"))


def _require() -> None:
  if simd_width() is None:
    raise NativeBuildError("the native kernels are not available (see the warning above); use the XLA path")


def _local(a: jax.Array, v: jax.Array, shift_a: bool, target: str = KERNEL_GRAD) -> jax.Array:
  out = jax.ShapeDtypeStruct((3, 3, a.shape[-1], v.shape[-1]), jnp.float32)
  return jax.ffi.ffi_call(target, out)(a, v, shift_a=shift_a)


def _batch_axes(sharding) -> object:
  spec = getattr(sharding, "spec", None)
  return spec[0] if spec else None


def _over_batch(fn, sharding_rule: str, reduce: bool = False):
  """`fn` as an op split over the batch (dimension 0 of the operands whose first factor is `b`) under a mesh.

  Operands whose first factor in `sharding_rule` is `b` are split on dimension 0 and
  replicated otherwise; the others (a convolution's kernel) are replicated. Without `reduce`
  each device's results are its own images' (split the same way); with it, `fn` sums over the
  batch, so each device's result is a partial sum, all-reduced into a replicated result.
  """
  op = custom_partitioning(fn)
  lhs = sharding_rule.split("->")[0]
  batched = [operand.split()[0] == "b" for operand in lhs.split(",")]

  def spec(mesh, axes, ndim):
    return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))

  def results(mesh, axes, result_shape):
    if reduce:
      return jax.tree.map(lambda r: NamedSharding(mesh, P()), result_shape)
    return jax.tree.map(lambda r: spec(mesh, axes, len(r.shape)), result_shape)

  def partition(mesh, arg_shapes, result_shape):
    axes = _batch_axes(arg_shapes[0].sharding)
    args = tuple(spec(mesh, axes if split else None, len(a.shape)) for a, split in zip(arg_shapes, batched))
    lower = fn
    if reduce and axes is not None:
      lower = lambda *a: jax.tree.map(lambda r: jax.lax.psum(r, axes), fn(*a))  # noqa: E731
    return mesh, lower, results(mesh, axes, result_shape), args

  def infer(mesh, arg_shapes, result_shape):
    return results(mesh, _batch_axes(arg_shapes[0].sharding), result_shape)

  factors = sharding_rule.replace(",", " ").replace("->", " ").split()
  others = [f for i, f in enumerate(factors) if f != "b" and f not in factors[:i]]  # in order of appearance
  op.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=sharding_rule,
                   reduction_factors=("b",) if reduce else (), need_replication_factors=tuple(others))
  return op


def _conv_call(flip: bool, target: str = CONV):
  def fn(x, kernel):
    n = kernel.shape[2] if flip else kernel.shape[3]
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(x.shape[:3] + (n,), jnp.float32))(x, kernel, flip=flip)
  return _over_batch(fn, "b h w m, i j n m -> b h w n" if flip else "b h w m, i j m n -> b h w n")


_CONV_CALLS = {False: _conv_call(False), True: _conv_call(True)}


def conv3x3(x: jax.Array, kernel: jax.Array, flip: bool = False) -> jax.Array | None:
  """The 3x3 SAME stride-1 convolution of x (b, h, w, m) with kernel (3, 3, m, n), in float32.

  With `flip` the kernel is (3, 3, n, m) and is used spatially flipped with its channel axes
  swapped: the input gradient of a convolution with that kernel, x being the output gradient.
  None when the native kernel is unavailable, the operands are not float32,
  or n does not fit its SIMD width.
  """
  n = kernel.shape[2] if flip else kernel.shape[3]
  if x.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.shape[3 if flip else 2] != x.shape[-1]:
    raise ValueError(f"conv3x3: x {x.shape} and kernel {kernel.shape} do not match (flip={flip})")
  width = simd_width()
  if width is None or n % width or x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
    return None
  return _CONV_CALLS[flip](x, kernel)


# Below this many input channels a 32-channel AMX step is mostly padding (the 3-channel input
# conv runs at half the float32 kernel's speed); the callers then use the float32 kernels on
# bfloat16-rounded operands, the same maths.
_AMX_MIN_CHANNELS = 16
_CONV_BF16_CALLS = {False: _conv_call(False, CONV_BF16), True: _conv_call(True, CONV_BF16)}
_KERNEL_GRAD_BF16_CALL = _over_batch(
    lambda x, g: jax.ffi.ffi_call(KERNEL_GRAD_BF16, jax.ShapeDtypeStruct((3, 3, x.shape[-1], g.shape[-1]),
                                                                         jnp.float32))(x, g),
    "b h w c, b h w o -> i j c o", reduce=True)


def conv3x3_bf16(x: jax.Array, kernel: jax.Array, flip: bool = False) -> jax.Array | None:
  """`conv3x3` with bfloat16 products: both operands rounded to bfloat16, sums in float32, on AMX.

  None where the AMX kernel does not apply: no AMX (`amx_available`), not float32, fewer than
  16 input channels, or (flip) output channels not a multiple of 16. A forward convolution's
  output channels are padded to a multiple of 16 with zero kernel columns (the UNet's
  3-channel output conv: 4-5x XLA's float32 convolution of the rounded operands).
  """
  n = kernel.shape[2] if flip else kernel.shape[3]
  if x.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.shape[3 if flip else 2] != x.shape[-1]:
    raise ValueError(f"conv3x3_bf16: x {x.shape} and kernel {kernel.shape} do not match (flip={flip})")
  pad = 0 if flip else -n % 16
  if not _amx_fits(x, kernel, n + pad):
    return None
  if pad:
    return _CONV_BF16_CALLS[False](x, jnp.pad(kernel, ((0, 0), (0, 0), (0, 0), (0, pad))))[..., :n]
  return _CONV_BF16_CALLS[flip](x, kernel)


def conv3x3_bf16_fits(x: jax.Array, kernel: jax.Array) -> bool:
  """Whether `conv3x3_bf16` runs on AMX for x and kernel (3, 3, m, n) in both directions: the
  convolution (n output channels) and its input gradient (m output channels)."""
  g = jax.ShapeDtypeStruct(x.shape[:3] + kernel.shape[3:], x.dtype)  # the input gradient's operand
  return _amx_fits(x, kernel, kernel.shape[3]) and _amx_fits(g, kernel, kernel.shape[2])


def kernel_grad_bf16(x: jax.Array, g: jax.Array) -> jax.Array | None:
  """`kernel_grad` with bfloat16 products (x and g rounded to bfloat16, sums in float32), on AMX.

  None where the AMX kernel does not apply: no AMX, not float32, g's channels not a multiple of
  16, or x with fewer than 16 channels.
  """
  if x.ndim != 4 or g.shape[:3] != x.shape[:3]:
    raise ValueError(f"kernel_grad_bf16: x {x.shape} and g {g.shape} must be NHWC of the same (b, h, w)")
  if not _amx_fits(x, g, g.shape[-1]):
    return None
  return _KERNEL_GRAD_BF16_CALL(x, g)


def _kernel_grad_call(shift_a: bool):
  return _over_batch(lambda a, v: _local(a, v, shift_a), "b h w c, b h w o -> i j c o", reduce=True)


_KERNEL_GRAD_CALLS = {True: _kernel_grad_call(True), False: _kernel_grad_call(False)}


def kernel_grad(x: jax.Array, g: jax.Array) -> jax.Array | None:
  """Kernel gradient (3, 3, c, o) in float32 of a 3x3 SAME conv of x (b, h, w, c) with output gradient g.

  None when the native kernel is unavailable or neither c nor o fits its SIMD width.
  """
  if x.ndim != 4 or g.shape[:3] != x.shape[:3]:
    raise ValueError(f"kernel_grad: x {x.shape} and g {g.shape} must be NHWC of the same (b, h, w)")
  return _outer_product_sum(x, g, _KERNEL_GRAD_CALLS[True], _KERNEL_GRAD_CALLS[False])


def _outer_product_sum(x: jax.Array, g: jax.Array, call, swapped_call=None) -> jax.Array | None:
  """A kernel gradient (a sum of x ⊗ g over positions) in float32: call(x, g), whose vectors run
  along g's channels, or where only x's channels fit the SIMD width, swapped_call(g, x) with its
  last two axes swapped back. None when neither fits or the native kernels are unavailable."""
  width = simd_width()
  if width is None:
    return None
  x, g = x.astype(jnp.float32), g.astype(jnp.float32)
  if g.shape[-1] % width == 0:
    return call(x, g)
  if x.shape[-1] % width == 0:
    return jnp.swapaxes((swapped_call or call)(g, x), -1, -2)
  return None


@functools.lru_cache(maxsize=None)
def _dense_call(rank: int, transpose_kernel: bool, target: str = DENSE):
  pixels = " ".join(f"p{i}" for i in range(rank - 2))

  def fn(x, kernel):
    n = kernel.shape[0] if transpose_kernel else kernel.shape[1]
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(x.shape[:-1] + (n,), jnp.float32))(
        x, kernel, transpose_kernel=transpose_kernel)
  kernel_factors = "n m" if transpose_kernel else "m n"
  return _over_batch(fn, f"b {pixels} m, {kernel_factors} -> b {pixels} n")


def dense(x: jax.Array, kernel: jax.Array, transpose_kernel: bool = False) -> jax.Array | None:
  """x (..., m) @ kernel (m, n) in float32, or with `transpose_kernel` x @ kernel.T for kernel (n, m).

  The transposed form is the input gradient of a dense layer with that kernel, x being the
  output gradient. None when the native kernel is unavailable, the operands
  are not float32, or n does not fit its SIMD width.
  """
  m, n = kernel.shape[::-1] if transpose_kernel else kernel.shape
  if x.ndim < 2 or kernel.ndim != 2 or x.shape[-1] != m:
    raise ValueError(f"dense: x {x.shape} and kernel {kernel.shape} do not match (transpose_kernel={transpose_kernel})")
  width = simd_width()
  if width is None or n % width or x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
    return None
  return _dense_call(x.ndim, transpose_kernel)(x, kernel)


@functools.lru_cache(maxsize=None)
def _dense_grad_call(rank: int, target: str = DENSE_GRAD):
  pixels = " ".join(f"p{i}" for i in range(rank - 2))

  def fn(x, g):
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[-1], g.shape[-1]), jnp.float32))(x, g)
  return _over_batch(fn, f"b {pixels} m, b {pixels} n -> m n", reduce=True)


def dense_kernel_grad(x: jax.Array, g: jax.Array) -> jax.Array | None:
  """Kernel gradient (m, n) in float32 of a dense layer x (..., m) @ kernel, given its output gradient g (..., n).

  The sum over every leading (batch, pixel) position, both operands read in place. None when
  the native kernel is unavailable or neither m nor n fits its SIMD width.
  """
  if x.ndim < 2 or g.shape[:-1] != x.shape[:-1]:
    raise ValueError(f"dense_kernel_grad: x {x.shape} and g {g.shape} must agree but in their last axis")
  return _outer_product_sum(x, g, _dense_grad_call(x.ndim))


def _amx_fits(x: jax.Array, other: jax.Array, n: int) -> bool:
  """Whether the AMX kernels take x (m channels) with `other` (a kernel or an output gradient)
  giving n output channels: on a CPU with AMX, float32, n a multiple of 16, m at least 16."""
  return (amx_available() and n % 16 == 0 and x.shape[-1] >= _AMX_MIN_CHANNELS
          and x.dtype == jnp.float32 and other.dtype == jnp.float32)


def dense_bf16(x: jax.Array, kernel: jax.Array, transpose_kernel: bool = False) -> jax.Array | None:
  """`dense` with bfloat16 products (operands rounded to bfloat16, sums in float32), on AMX.

  None where the AMX kernel does not apply (see `conv3x3_bf16`).
  """
  m, n = kernel.shape[::-1] if transpose_kernel else kernel.shape
  if x.ndim < 2 or kernel.ndim != 2 or x.shape[-1] != m:
    raise ValueError(f"dense_bf16: x {x.shape} and kernel {kernel.shape} do not match (transpose_kernel={transpose_kernel})")
  if not _amx_fits(x, kernel, n):
    return None
  return _dense_call(x.ndim, transpose_kernel, DENSE_BF16)(x, kernel)


def dense_kernel_grad_bf16(x: jax.Array, g: jax.Array) -> jax.Array | None:
  """`dense_kernel_grad` with bfloat16 products, on AMX; None where the AMX kernel does not apply."""
  if x.ndim < 2 or g.shape[:-1] != x.shape[:-1]:
    raise ValueError(f"dense_kernel_grad_bf16: x {x.shape} and g {g.shape} must agree but in their last axis")
  if not _amx_fits(x, g, g.shape[-1]):
    return None
  return _dense_grad_call(x.ndim, DENSE_GRAD_BF16)(x, g)


def _norm_fwd_call(groups: int, silu: bool):
  def fn(x, a, b):
    bc = jax.ShapeDtypeStruct(a.shape, jnp.float32)
    return tuple(jax.ffi.ffi_call(NORM_FWD, (jax.ShapeDtypeStruct(x.shape, jnp.float32), bc, bc))(
        x, a, b, groups=np.int64(groups), silu=silu))
  return _over_batch(fn, "b h w c, b c, b c -> b h w c, b c, b c")


def _norm_bwd_call(groups: int, silu: bool):
  def fn(x, a, b, mean, inv, dy):
    bc = jax.ShapeDtypeStruct(a.shape, jnp.float32)
    return tuple(jax.ffi.ffi_call(NORM_BWD, (jax.ShapeDtypeStruct(x.shape, jnp.float32), bc, bc))(
        x, a, b, mean, inv, dy, groups=np.int64(groups), silu=silu))
  return _over_batch(fn, "b h w c, b c, b c, b c, b c, b h w c -> b h w c, b c, b c")


@functools.lru_cache(maxsize=None)
def _norm_calls(groups: int, silu: bool):
  return _norm_fwd_call(groups, silu), _norm_bwd_call(groups, silu)


def norm_fits(x: jax.Array, groups: int) -> bool:
  """Whether the native GroupNorm kernels take x (on a CPU; float32 NHWC, channels a SIMD multiple)."""
  width = simd_width()
  return (width is not None and x.ndim == 4 and x.dtype == jnp.float32 and x.shape[-1] % width == 0
          and x.shape[-1] % groups == 0)


def group_norm_act_fwd(x: jax.Array, a: jax.Array, b: jax.Array, groups: int, silu: bool):
  """(y, mean, inv): act(GroupNorm(x) * a + b) and each channel's group mean and 1/std ([B, C])."""
  _require()
  return _norm_calls(groups, silu)[0](x, a.astype(jnp.float32), b.astype(jnp.float32))


def group_norm_act_bwd(x, a, b, mean, inv, dy, groups: int, silu: bool):
  """(dx, da, db) of `group_norm_act_fwd`'s y, given its output gradient dy."""
  _require()
  return _norm_calls(groups, silu)[1](x, a.astype(jnp.float32), b.astype(jnp.float32), mean, inv,
                                      dy.astype(jnp.float32))


def attention_fits(qkv: jax.Array) -> bool:
  """Whether the native attention kernels take qkv [B, N, 3, heads, d] (on a CPU; float32, N, d SIMD multiples)."""
  width = simd_width()
  return (width is not None and qkv.ndim == 5 and qkv.shape[2] == 3 and qkv.dtype == jnp.float32
          and qkv.shape[1] % width == 0 and qkv.shape[-1] % width == 0)


# attention's `products` attribute (attention.cc): float32; bfloat16 products on the float32
# kernel (operands rounded by the caller); bfloat16 products on AMX tiles.
ATTN_FLOAT32, ATTN_ROUNDED_BF16, ATTN_AMX_BF16 = 0, 1, 2


@functools.lru_cache(maxsize=None)
def _attn_calls(products: int):
  def fwd(qkv):
    b, n, _, h, d = qkv.shape
    return tuple(jax.ffi.ffi_call(ATTN_FWD, (jax.ShapeDtypeStruct((b, n, h, d), jnp.float32),
                                             jax.ShapeDtypeStruct((b, h, n), jnp.float32)))(
        qkv, products=np.int64(products)))

  def bwd(qkv, lse, dout):
    return jax.ffi.ffi_call(ATTN_BWD, jax.ShapeDtypeStruct(qkv.shape, jnp.float32))(
        qkv, lse, dout, products=np.int64(products))

  return (_over_batch(fwd, "b n t h d -> b n h d, b h n"),
          _over_batch(bwd, "b n t h d, b h n, b n h d -> b n t h d"))


def attention_products(qkv: jax.Array, bf16: bool) -> int:
  """The `products` mode for attention of qkv [B, N, 3, heads, d] here: float32, or bfloat16
  products on AMX where they run (N and d multiples of 16), else on the float32 kernel (whose
  caller then rounds q, k, v and dout to bfloat16)."""
  if not bf16:
    return ATTN_FLOAT32
  fits = amx_available() and qkv.shape[1] % 16 == 0 and qkv.shape[-1] % 16 == 0
  return ATTN_AMX_BF16 if fits else ATTN_ROUNDED_BF16


def attention_fwd(qkv: jax.Array, products: int = ATTN_FLOAT32) -> tuple[jax.Array, jax.Array]:
  """(out [B, N, heads, d], log-sum-exp [B, heads, N]) of softmax(q k^T / sqrt(d)) v."""
  _require()
  return _attn_calls(products)[0](qkv)


def attention_bwd(qkv: jax.Array, lse: jax.Array, dout: jax.Array, products: int = ATTN_FLOAT32) -> jax.Array:
  """d(qkv) [B, N, 3, heads, d] of `attention_fwd`'s out, given its gradient dout."""
  _require()
  return _attn_calls(products)[1](qkv, lse, dout)
