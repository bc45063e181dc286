"""The native (C++ FFI) CPU kernels: convolution, kernel gradient, GroupNorm and attention; values, sharding, build, fallback."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synth_med.errors import SynthMedError
from synth_med.models import unet
from synth_med.ops import cpu_ops, xla
from synth_med.ops.cpu_native import kernels, layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_compiler = pytest.mark.skipif(kernels.compiler() is None, reason="no C++ compiler on this machine")


def _autodiff_kernel_grad(x, g):
  """XLA's own gradient of its own convolution: an independent reference."""
  return jax.grad(lambda k: jnp.sum(xla.conv3x3(x, k) * g))(jnp.zeros((3, 3, x.shape[-1], g.shape[-1])))


@needs_compiler
def test_native_silu_is_float32_accurate_over_a_wide_range():
  """simd.h's exp (2^n by vscalefps on AVX-512) and sigmoid (a reciprocal estimate and one Newton
  step) stay at float32 accuracy: the native GroupNorm + SiLU forward equals the float64 formula
  from its own statistics to 2e-6 of max(|y|, 1), for z = xhat * a over about [-100, 100]."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 32))
  a = jnp.broadcast_to(jnp.linspace(1.0, 30.0, 32), (2, 32))
  y, mean, inv = kernels.group_norm_act_fwd(x, a, jnp.zeros((2, 32)), 8, True)
  px = lambda v: np.asarray(v, np.float64)[:, None, None, :]  # noqa: E731
  z = (np.asarray(x, np.float64) - px(mean)) * px(inv) * px(a)
  assert z.min() < -60 and z.max() > 60
  ref = z / (1.0 + np.exp(-z))
  err = np.abs(np.asarray(y, np.float64) - ref) / np.maximum(np.abs(ref), 1.0)
  assert err.max() < 2e-6, err.max()


@needs_compiler
@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 32),     # first conv: o fits the SIMD width
                                   (2, 8, 6, 32, 3),     # last conv: only c fits, the transposed call
                                   (3, 6, 9, 40, 48),    # partial register tiles, h != w
                                   (2, 1, 4, 16, 16),    # one-row images: only the middle taps see data
                                   (4, 16, 16, 64, 64)])
def test_native_kernel_grad_matches_autodiff(shape):
  assert kernels.simd_width() in (8, 16)
  b, h, w, c, o = shape
  kx, kg = jax.random.split(jax.random.PRNGKey(sum(shape)))
  x, g = jax.random.normal(kx, (b, h, w, c)), jax.random.normal(kg, (b, h, w, o))
  got = jax.jit(kernels.kernel_grad)(x, g)
  assert got is not None and got.shape == (3, 3, c, o)
  ref = _autodiff_kernel_grad(x, g)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))


def _xla_conv_input_grad(g, k):
  """XLA's own input gradient of its own convolution, for output gradient g: an independent reference."""
  x0 = jnp.zeros(g.shape[:3] + (k.shape[2],))
  return jax.vjp(lambda x: xla.conv3x3(x, k), x0)[1](g)[0]


@needs_compiler
@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 32),     # the input conv: 3 channels in
                                   (3, 6, 9, 48, 32),    # rows of 9 pixels: a full and a one-pixel tile
                                   (2, 1, 4, 16, 16),    # one-row images: only the middle taps see data
                                   (2, 12, 20, 32, 48),  # 48 outputs: two vectors, then one
                                   (2, 4, 4, 128, 64)])
def test_native_conv3x3_and_its_input_gradient_match_xla(shape):
  assert kernels.simd_width() in (8, 16)
  b, h, w, c, o = shape
  kx, kk, kg = jax.random.split(jax.random.PRNGKey(sum(shape)), 3)
  x, k, g = jax.random.normal(kx, (b, h, w, c)), jax.random.normal(kk, (3, 3, c, o)), jax.random.normal(kg, (b, h, w, o))
  close = lambda got, ref: np.testing.assert_allclose(  # noqa: E731
      np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-5 * float(jnp.abs(ref).max()))
  close(jax.jit(kernels.conv3x3)(x, k), xla.conv3x3(x, k))
  if c % kernels.simd_width() == 0:
    close(jax.jit(lambda g, k: kernels.conv3x3(g, k, flip=True))(g, k), _xla_conv_input_grad(g, k))


@needs_compiler
@pytest.mark.parametrize("shapes", [((2, 5, 7), 24, 32),   # skip 1x1 conv: n fits the SIMD width
                                    ((3, 20), 32, 12),     # only m fits: the transposed call
                                    ((2, 9), 16, 48)])     # attention's qkv: (batch, tokens)
def test_native_dense_kernel_grad_matches_a_matmul(shapes):
  lead, m, n = shapes
  x = jax.random.normal(jax.random.PRNGKey(m), lead + (m,))
  g = jax.random.normal(jax.random.PRNGKey(n), lead + (n,))
  got = jax.jit(kernels.dense_kernel_grad)(x, g)
  ref = np.asarray(x).reshape(-1, m).T @ np.asarray(g).reshape(-1, n)
  assert got is not None and got.shape == (m, n)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  kernel = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (m, n)))
  if n % kernels.simd_width() == 0:  # the product itself
    np.testing.assert_allclose(kernels.dense(x, kernel), np.asarray(x) @ kernel, rtol=1e-4, atol=1e-4)
  if m % kernels.simd_width() == 0:  # the input gradient, g @ kernel.T
    np.testing.assert_allclose(kernels.dense(g, kernel, transpose_kernel=True), np.asarray(g) @ kernel.T,
                               rtol=1e-4, atol=1e-4)


def test_pixel_dense_is_nn_dense_with_the_same_parameters_and_gradients():
  from flax import linen as nn
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 16))
  ours, theirs = unet.PixelDense(32, cpu_ops()), nn.Dense(32)
  params = theirs.init(jax.random.PRNGKey(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(1), x)) == jax.tree.map(jnp.shape, params)
  params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias too
  loss = lambda layer: lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x)))  # noqa: E731
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.grad(loss(ours), (0, 1))(params, x)),
                  jax.tree.leaves(jax.grad(loss(theirs), (0, 1))(params, x))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  hlo = jax.jit(jax.grad(loss(ours))).lower(params, x).as_text()
  native = kernels.simd_width() is not None
  assert (kernels.DENSE_GRAD in hlo) == native and (f"@{kernels.DENSE}(" in hlo) == native


@needs_compiler
def test_conv3x3_gradients_use_the_native_kernel_and_match():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 16))
  k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 16, 32)) * 0.1
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))  # noqa: E731
  hlo = jax.jit(jax.grad(loss(layers.conv3x3), (0, 1))).lower(x, k).as_text()
  assert kernels.KERNEL_GRAD in hlo and kernels.CONV in hlo and "conv_general_dilated" not in hlo
  got = jax.grad(loss(layers.conv3x3), (0, 1))(x, k)
  ref = jax.grad(loss(xla.conv3x3), (0, 1))(x, k)
  for a, r in zip(got, ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-4)


def test_channels_that_fit_no_simd_width_fall_back(monkeypatch):
  monkeypatch.setitem(kernels._state, "width", 16)
  assert kernels.kernel_grad(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 4, 5))) is None
  assert kernels.dense_kernel_grad(jnp.zeros((1, 4, 3)), jnp.zeros((1, 4, 5))) is None
  assert kernels.dense(jnp.zeros((1, 4, 16)), jnp.zeros((16, 5))) is None
  with pytest.raises(ValueError, match="do not match"):
    kernels.dense(jnp.zeros((1, 4, 16)), jnp.zeros((16, 32)), transpose_kernel=True)
  with pytest.raises(ValueError, match="agree"):
    kernels.dense_kernel_grad(jnp.zeros((1, 4, 3)), jnp.zeros((1, 5, 16)))
  assert kernels.conv3x3(jnp.zeros((1, 4, 4, 32)), jnp.zeros((3, 3, 32, 3))) is None  # the output conv
  assert kernels.conv3x3(jnp.zeros((1, 4, 4, 16), jnp.bfloat16), jnp.zeros((3, 3, 16, 16), jnp.bfloat16)) is None
  with pytest.raises(ValueError, match="do not match"):
    kernels.conv3x3(jnp.zeros((1, 4, 4, 8)), jnp.zeros((3, 3, 16, 16)))
  with pytest.raises(ValueError, match="same"):
    kernels.kernel_grad(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 5, 16)))


_SUBPROCESS = """
import json, sys, logging
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp
from synth_med.ops import xla
from synth_med.ops.cpu_native import kernels, layers
logging.basicConfig(level=logging.WARNING)
x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 16)); k = jnp.ones((3, 3, 16, 16)) * 0.1
dk = jax.grad(lambda k: jnp.sum(layers.conv3x3(x, k) ** 2))(k)
ref = jax.grad(lambda k: jnp.sum(xla.conv3x3(x, k) ** 2))(k)
print("RESULT" + json.dumps({{"width": kernels.simd_width(), "err": float(jnp.abs(dk - ref).max())}}))
"""


def _run(env_extra: dict, script: str = _SUBPROCESS) -> tuple[dict, str]:
  """Runs `script` in a fresh interpreter with `env_extra`; (its RESULT json, its stderr)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", **env_extra)
  proc = subprocess.run([sys.executable, "-c", script.format(root=ROOT)], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][0]
  return json.loads(line[len("RESULT"):]), proc.stderr


_EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def test_switched_off_or_unbuildable_it_falls_back_to_xla_with_a_warning(tmp_path):
  out, err = _run({"SYNTH_MED_NATIVE_KERNELS": "0"})
  assert out["width"] is None and out["err"] < 1e-4 and "native CPU kernels" not in err
  out, err = _run({"CXX": "/bin/false", "SYNTH_MED_NATIVE_CACHE": str(tmp_path)})
  assert out["width"] is None and out["err"] < 1e-4
  assert "native CPU kernels are off" in err and "/bin/false" in err
  assert not list(tmp_path.glob("*.so"))  # nothing half-written is left behind


@pytest.mark.slow
@needs_compiler
def test_build_is_cached_per_source_and_written_atomically(tmp_path, monkeypatch):
  monkeypatch.setenv("SYNTH_MED_NATIVE_CACHE", str(tmp_path))
  first = kernels.build()
  assert first.parent == tmp_path and first.stat().st_size > 0
  mtime = first.stat().st_mtime_ns
  assert kernels.build() == first and first.stat().st_mtime_ns == mtime  # cached, not rebuilt
  assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left
  monkeypatch.setattr(kernels, "_cpu_fingerprint", lambda: "another CPU")  # -march=native: per CPU
  assert kernels.library_path(kernels.compiler()) != first


_EIGHT = """
import json, sys
import numpy as np
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from synth_med.ops import xla
from synth_med.ops.cpu_native import kernels, layers
mesh = Mesh(np.array(jax.devices()), ("data",))
x = jax.random.normal(jax.random.PRNGKey(0), (16, 8, 8, 32)); g = jax.random.normal(jax.random.PRNGKey(1), (16, 8, 8, 3))
shard = NamedSharding(mesh, P("data"))
xs, gs = jax.device_put(x, shard), jax.device_put(g, shard)
out = {{}}
for name, op, target in (("conv", kernels.kernel_grad, kernels.KERNEL_GRAD),
                         ("dense", kernels.dense_kernel_grad, kernels.DENSE_GRAD)):
  f = jax.jit(op)
  hlo = f.lower(xs, gs).compile().as_text()
  local = [ln for ln in hlo.splitlines() if target in ln]
  one = op(x, g)
  out[name] = {{"err": float(jnp.abs(f(xs, gs) - one).max()), "scale": float(jnp.abs(one).max()),
               "all_gather": "all-gather" in hlo, "all_reduce": "all-reduce" in hlo, "local": local[0] if local else ""}}
print("RESULT" + json.dumps(out))
"""


@needs_compiler
def test_eight_device_mesh_splits_the_batch_and_all_reduces():
  for name, out in _run(_EIGHT_DEVICES, _EIGHT)[0].items():
    assert out["err"] < 1e-4 * out["scale"], name
    assert not out["all_gather"] and out["all_reduce"], name
    assert "f32[2,8,8," in out["local"], name  # each device runs the custom call on its 2 images


@pytest.mark.slow
@needs_compiler
@pytest.mark.skipif(kernels.simd_width() != 16, reason="the AVX2 variant is the default build on this CPU")
def test_avx2_build_gives_the_same_values(tmp_path, monkeypatch, request):
  """Machines without AVX-512 get the 8-float variant (other register tiles, 8-wide exp); check
  all three ops of it here too, against XLA's paths, with channel counts that only 8 divides;
  and, where the CPU has AMX, the bfloat16 kernels' scalar (non-AVX512-BF16) paths."""
  import ctypes
  monkeypatch.setenv("SYNTH_MED_NATIVE_CACHE", str(tmp_path))
  lib = ctypes.cdll.LoadLibrary(str(kernels.build(extra_flags=("-mno-avx512f",))))
  assert lib.synth_med_simd_width() == 8
  for name in ("Conv3x3", "KernelGrad", "Dense", "DenseGrad", "GroupNormActFwd", "GroupNormActBwd", "AttentionFwd", "AttentionBwd"):
    jax.ffi.register_ffi_target(f"avx2_{name}", jax.ffi.pycapsule(getattr(lib, f"SynthMed{name}")), platform="cpu")
  close = lambda got, ref: np.testing.assert_allclose(  # noqa: E731
      np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))
  ks = jax.random.split(jax.random.PRNGKey(3), 8)

  x, g = jax.random.normal(ks[0], (3, 6, 9, 13)), jax.random.normal(ks[1], (3, 6, 9, 24))
  close(kernels._local(x, g, True, target="avx2_KernelGrad"), _autodiff_kernel_grad(x, g))
  close(jax.ffi.ffi_call("avx2_DenseGrad", jax.ShapeDtypeStruct((13, 24), jnp.float32))(x, g),
        np.asarray(x).reshape(-1, 13).T @ np.asarray(g).reshape(-1, 24))
  w = jax.random.normal(ks[4], (24, 13))  # 24 outputs: a 6-row group and 3 vectors of 8
  close(jax.ffi.ffi_call("avx2_Dense", jax.ShapeDtypeStruct(g.shape, jnp.float32))(x, w, transpose_kernel=True),
        np.asarray(x) @ np.asarray(w).T)
  k = jax.random.normal(ks[2], (3, 3, 13, 24))
  close(jax.ffi.ffi_call("avx2_Conv3x3", jax.ShapeDtypeStruct(g.shape, jnp.float32))(x, k, flip=False),
        xla.conv3x3(x, k))
  k = jax.random.normal(ks[3], (3, 3, 24, 8))
  close(jax.ffi.ffi_call("avx2_Conv3x3", jax.ShapeDtypeStruct(g.shape, jnp.float32))(
      g[..., :8], k, flip=True), _xla_conv_input_grad(g[..., :8], k))

  x = 2.0 * jax.random.normal(ks[2], (2, 5, 7, 24)) + 1.0  # 24 channels: 3 vectors of 8, groups of 6
  a, b = 1 + 0.3 * jax.random.normal(ks[3], (2, 24)), 0.3 * jax.random.normal(ks[4], (2, 24))
  dy = jax.random.normal(ks[5], x.shape)
  monkeypatch.setattr(kernels, "norm_fits", lambda x, groups: False)  # the reference: XLA's path
  y_ref, res = xla.group_norm_act_fwd(x, a, b, 4, True)
  grads_ref = xla.group_norm_act_bwd(4, True, res, dy)
  bc = jax.ShapeDtypeStruct((2, 24), jnp.float32)
  y, mean, inv = jax.ffi.ffi_call("avx2_GroupNormActFwd", (jax.ShapeDtypeStruct(x.shape, jnp.float32), bc, bc))(
      x, a, b, groups=np.int64(4), silu=True)
  close(y, y_ref)
  grads = jax.ffi.ffi_call("avx2_GroupNormActBwd", (jax.ShapeDtypeStruct(x.shape, jnp.float32), bc, bc))(
      x, a, b, mean, inv, dy, groups=np.int64(4), silu=True)
  for got, ref in zip(grads, grads_ref):
    close(got, ref)

  qkv, w = jax.random.normal(ks[6], (2, 24, 3, 2, 8)), jax.random.normal(ks[7], (2, 24, 2, 8))
  ref_attend = lambda qkv: xla.attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # noqa: E731
  # layers.native_attend_qkv itself, its custom calls pointed at this build's targets
  monkeypatch.setattr(kernels, "ATTN_FWD", "avx2_AttentionFwd")
  monkeypatch.setattr(kernels, "ATTN_BWD", "avx2_AttentionBwd")
  kernels._attn_calls.cache_clear()
  request.addfinalizer(kernels._attn_calls.cache_clear)  # after monkeypatch restores the names
  attention = layers.native_attend_qkv
  lowered = jax.jit(jax.grad(lambda q: jnp.sum(attention(q, kernels.ATTN_FLOAT32)))).lower(qkv).as_text()
  assert "avx2_AttentionFwd" in lowered and "avx2_AttentionBwd" in lowered
  out, vjp = jax.vjp(lambda qkv: attention(qkv, kernels.ATTN_FLOAT32), qkv)
  close(out, ref_attend(qkv))
  close(vjp(w)[0], jax.grad(lambda q: jnp.sum(ref_attend(q) * w))(qkv))
  qkv, w = jax.random.normal(ks[6], (2, 32, 3, 1, 16)), jax.random.normal(ks[7], (2, 32, 1, 16))
  modes = [kernels.ATTN_ROUNDED_BF16] + ([kernels.ATTN_AMX_BF16] if lib.synth_med_amx_available() else [])
  for mode in modes:  # bfloat16 products on the 8-wide float32 kernel, and amx_gemm's scalar packing
    _attention_matches_bf16_reference(lambda qkv: attention(qkv, mode), qkv, w)

  if lib.synth_med_amx_available():  # the AMX kernels' scalar rounding, interleaving and transposes
    for name in ("Conv3x3Bf16", "KernelGradBf16", "DenseBf16", "DenseGradBf16"):
      jax.ffi.register_ffi_target(f"avx2_{name}", jax.ffi.pycapsule(getattr(lib, f"SynthMed{name}")), platform="cpu")
    x, g = jax.random.normal(ks[0], (3, 6, 17, 40)), jax.random.normal(ks[1], (3, 6, 17, 48))
    k = jax.random.normal(ks[2], (3, 3, 40, 48))
    _close_to(jax.ffi.ffi_call("avx2_Conv3x3Bf16", jax.ShapeDtypeStruct(g.shape, jnp.float32))(x, k, flip=False),
              xla.conv3x3(_bf16(x), _bf16(k)))
    _close_to(jax.ffi.ffi_call("avx2_KernelGradBf16", jax.ShapeDtypeStruct(k.shape, jnp.float32))(x, g),
              _autodiff_kernel_grad(_bf16(x), _bf16(g)))
    w = jax.random.normal(ks[4], (48, 40))
    _close_to(jax.ffi.ffi_call("avx2_DenseBf16", jax.ShapeDtypeStruct(g.shape, jnp.float32))(x, w, transpose_kernel=True),
              jnp.matmul(_bf16(x), _bf16(w).T, precision=jax.lax.Precision.HIGHEST))
    _close_to(jax.ffi.ffi_call("avx2_DenseGradBf16", jax.ShapeDtypeStruct((40, 48), jnp.float32))(x, g),
              jnp.einsum("bhwm,bhwn->mn", _bf16(x), _bf16(g), precision=jax.lax.Precision.HIGHEST))


@needs_compiler
@pytest.mark.parametrize("shape", [(2, 32, 2, 16), (3, 64, 1, 32), (2, 48, 3, 16)])
def test_native_attention_matches_xla_attend_values_and_gradients(shape):
  b, n, h, d = shape
  assert kernels.attention_fits(jnp.zeros((b, n, 3, h, d)))  # 16 | n, d: both SIMD widths fit
  qkv = 2.0 * jax.random.normal(jax.random.PRNGKey(n + d), (b, n, 3, h, d))
  w = jax.random.normal(jax.random.PRNGKey(1), (b, n, h, d))
  ref = lambda qkv: xla.attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # noqa: E731
  np.testing.assert_allclose(layers.native_attend_qkv(qkv), ref(qkv), rtol=1e-4, atol=1e-5)
  out, lse = kernels.attention_fwd(qkv)
  logits = jnp.einsum("bnhd,bmhd->bhnm", qkv[:, :, 0], qkv[:, :, 1]) / np.sqrt(d)
  np.testing.assert_allclose(lse, jax.nn.logsumexp(logits, -1), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda qkv: jnp.sum(jnp.sin(f(qkv)) * w)  # noqa: E731
  np.testing.assert_allclose(jax.grad(loss(layers.native_attend_qkv))(qkv), jax.grad(loss(ref))(qkv), rtol=1e-4, atol=1e-4)


def _rms_rel(got, ref) -> float:
  return float(jnp.sqrt(jnp.mean((jnp.asarray(got) - ref) ** 2) / jnp.mean(jnp.asarray(ref) ** 2)))


def _attention_matches_bf16_reference(attention, qkv, w):
  """attention(qkv) and its gradient against `xla.attend_bf16`: equal up to float32 sums and the
  odd probability that rounds the other way (relative RMS <= 3e-4), while float32 attention is
  >= 2e-3 away (measured: <= 1e-4 for the bfloat16 kernels, 4e-3 to 1.5e-2 for float32)."""
  ref = lambda qkv: xla.attend_bf16(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # noqa: E731
  f32 = lambda qkv: xla.attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # noqa: E731
  loss = lambda f: lambda qkv: jnp.sum(jnp.sin(f(qkv)) * w)  # noqa: E731
  out_ref, grad_ref = ref(qkv), jax.grad(loss(ref))(qkv)
  assert _rms_rel(attention(qkv), out_ref) <= 3e-4
  assert _rms_rel(jax.grad(loss(attention))(qkv), grad_ref) <= 3e-4
  assert _rms_rel(f32(qkv), out_ref) >= 2e-3 and _rms_rel(jax.grad(loss(f32))(qkv), grad_ref) >= 2e-3


def test_unet_attention_uses_the_native_kernels_only_where_they_fit():
  from flax import linen as nn  # noqa: F401
  width = kernels.simd_width()
  for c, hw, want in ((32, 4, width is not None and 16 % width == 0), (24, 3, False)):
    layer = unet.Attention(num_head_channels=c // 2 if c == 32 else 24, ops=cpu_ops())
    x = jnp.ones((1, hw, hw, c))
    params = layer.init(jax.random.PRNGKey(0), x)
    hlo = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x)))).lower(params).as_text()
    assert (kernels.ATTN_FWD in hlo and kernels.ATTN_BWD in hlo) == want, (c, hw)


_EIGHT_ATTN = """
import json, sys
import numpy as np
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from synth_med.ops import xla
from synth_med.ops.cpu_native import kernels, layers
mesh = Mesh(np.array(jax.devices()), ("data",))
shard = NamedSharding(mesh, P("data"))
x = jax.random.normal(jax.random.PRNGKey(0), (16, 4, 8, 32))
a, b = 1 + 0.1 * jax.random.normal(jax.random.PRNGKey(1), (16, 32)), jnp.zeros((16, 32))
qkv = jax.random.normal(jax.random.PRNGKey(2), (16, 32, 3, 2, 16))
k = 0.1 * jax.random.normal(jax.random.PRNGKey(3), (3, 3, 32, 16))
def f(x, a, b, qkv, k):
  return (jnp.sum(layers.group_norm_act(x, a, b, 8, True) ** 2) + jnp.sum(layers.native_attend_qkv(qkv) ** 2)
          + jnp.sum(jnp.sin(layers.conv3x3(x, k))))
g = jax.jit(jax.grad(f, range(5)))
args = (x, a, b, qkv, k)
sharded = [jax.device_put(v, shard) for v in args[:4]] + [jax.device_put(k, NamedSharding(mesh, P()))]
hlo = g.lower(*sharded).compile().as_text()
one, eight = g(*args), g(*sharded)
print("RESULT" + json.dumps({{"err": max(float(jnp.abs(u - v).max()) for u, v in zip(one, eight)),
      "all_gather": "all-gather" in hlo, "local_norm": "f32[2,4,8,32]" in hlo, "local_attn": "f32[2,32,3,2,16]" in hlo,
      "local_conv": [ln.split("=")[1].split("custom-call")[0].strip() for ln in hlo.splitlines()
                     if "custom_call_target=\\"" + kernels.CONV + "\\"" in ln],
      "shardings": [str(v.sharding.spec) for v in eight]}}))
"""


@needs_compiler
def test_eight_device_mesh_runs_norm_attention_and_conv_per_device():
  out, _ = _run(_EIGHT_DEVICES, _EIGHT_ATTN)
  assert out["err"] < 1e-4
  assert not out["all_gather"] and out["local_norm"] and out["local_attn"]
  # the convolution and its input gradient, each on the device's 2 images with the whole kernel
  assert sorted(out["local_conv"]) == ["f32[2,4,8,16]{3,2,1,0}", "f32[2,4,8,32]{3,2,1,0}"], out["local_conv"]
  assert all("data" in s for s in out["shardings"][:4])  # gradients stay split over the batch
  assert out["shardings"][4] in ("P()", "PartitionSpec()")  # the kernel gradient is summed over every device


@pytest.mark.slow
@needs_compiler
def test_an_unwritable_cache_directory_builds_in_the_temp_dir(tmp_path, monkeypatch):
  blocker = tmp_path / "not_a_dir"
  blocker.write_text("a file where the cache directory should be")
  monkeypatch.setenv("SYNTH_MED_NATIVE_CACHE", str(blocker / "native"))
  monkeypatch.setattr(kernels.tempfile, "tempdir", str(tmp_path / "tmp"))
  (tmp_path / "tmp").mkdir()
  out = kernels.build()
  assert out.exists() and out.parent.parent == tmp_path / "tmp"


# bfloat16 products (the UNet's matmul_precision='bfloat16'): AMX kernels where the CPU has them.

needs_amx = pytest.mark.skipif(kernels.compiler() is None or not kernels.amx_available(),
                               reason="no AMX tiles on this CPU (or no compiler): the bfloat16 layers "
                                      "use their float32 fallback, tested below")


def _bf16(a):
  return a.astype(jnp.bfloat16).astype(jnp.float32)


def _close_to(got, ref, rel=2e-6):
  """Equal up to the order of float32 sums: |got - ref| <= rel * max|ref| (bfloat16 products are exact)."""
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=rel * float(jnp.abs(ref).max()))


@needs_amx
@pytest.mark.parametrize("shape", [(2, 5, 7, 16, 16),     # narrow images: frames across rows and images
                                   (9, 4, 4, 128, 32),    # 9 tiny images stacked in one frame
                                   (2, 3, 17, 40, 48),    # 17 wide: a shifted last run; 40 channels padded to 64; 3 x 16 outputs
                                   (3, 16, 16, 64, 128),
                                   (5, 32, 32, 96, 16)])  # several frames, the last one smaller
def test_amx_convolutions_equal_float32_convolutions_of_rounded_operands(shape):
  b, h, w, c, o = shape
  ks = jax.random.split(jax.random.PRNGKey(sum(shape)), 4)
  x, k, g = jax.random.normal(ks[0], (b, h, w, c)), jax.random.normal(ks[1], (3, 3, c, o)), jax.random.normal(ks[2], (b, h, w, o))
  _close_to(jax.jit(kernels.conv3x3_bf16)(x, k), xla.conv3x3(_bf16(x), _bf16(k)))
  _close_to(kernels.kernel_grad_bf16(x, g), _autodiff_kernel_grad(_bf16(x), _bf16(g)))
  kt = jax.random.normal(ks[3], (3, 3, c, o))  # flip: the input gradient (c channels) of a conv from c to o
  if c % 16 == 0:
    _close_to(kernels.conv3x3_bf16(g, kt, flip=True), _xla_conv_input_grad(_bf16(g), _bf16(kt)))
  # and the rounding is real: float32 products differ
  assert float(jnp.abs(kernels.conv3x3_bf16(x, k) - xla.conv3x3(x, k)).max()) > 1e-4


@needs_amx
def test_amx_convolution_pads_few_output_channels():
  """The UNet's 3-channel output conv runs on AMX, its kernel padded with zero columns to 16."""
  ks = jax.random.split(jax.random.PRNGKey(3), 2)
  x, k = jax.random.normal(ks[0], (2, 9, 8, 32)), jax.random.normal(ks[1], (3, 3, 32, 3))
  f = jax.jit(kernels.conv3x3_bf16)
  y = f(x, k)
  assert y.shape == (2, 9, 8, 3)
  _close_to(y, xla.conv3x3(_bf16(x), _bf16(k)))
  assert kernels.CONV_BF16 in f.lower(x, k).as_text()
  assert kernels.conv3x3_bf16(y, k, flip=True) is None  # its input gradient reads 3 channels: not AMX


@needs_amx
@pytest.mark.parametrize("shape", [(2, 100, 64, 48), (3, 1030, 128, 384), (1, 7, 32, 16)])
def test_amx_dense_layers_equal_float32_products_of_rounded_operands(shape):
  b, p, m, n = shape  # 3 x 1030 positions: 12 runs of 256 and a rest of 18
  ks = jax.random.split(jax.random.PRNGKey(sum(shape)), 3)
  x, w, g = jax.random.normal(ks[0], (b, p, m)), jax.random.normal(ks[1], (m, n)), jax.random.normal(ks[2], (b, p, n))
  hi = jax.lax.Precision.HIGHEST
  _close_to(kernels.dense_bf16(x, w), jnp.matmul(_bf16(x), _bf16(w), precision=hi))
  _close_to(kernels.dense_bf16(g, w, transpose_kernel=True), jnp.matmul(_bf16(g), _bf16(w).T, precision=hi))
  _close_to(kernels.dense_kernel_grad_bf16(x, g), jnp.einsum("bpm,bpn->mn", _bf16(x), _bf16(g), precision=hi))


def _bf16_layer_cases():
  ks = jax.random.split(jax.random.PRNGKey(7), 4)
  x, k = jax.random.normal(ks[0], (2, 8, 8, 32)), 0.1 * jax.random.normal(ks[1], (3, 3, 32, 48))
  xd, wd = jax.random.normal(ks[2], (2, 40, 32)), 0.1 * jax.random.normal(ks[3], (32, 48))
  dense_ref = lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)  # noqa: E731
  xs, ks_ = jax.random.normal(ks[0], (2, 9, 8, 32)), 0.1 * jax.random.normal(ks[1], (3, 3, 32, 32))  # odd height
  down = lambda a, b: layers.down_conv3x3_bf16(a, b)  # noqa: E731
  return [("conv", layers.conv3x3_bf16, xla.conv3x3, x, k), ("dense", layers.dense_bf16, dense_ref, xd, wd),
          ("down", down, xla.down_conv3x3, xs, ks_)]


@pytest.mark.parametrize("amx", [True, False])
def test_bf16_layers_and_their_gradients_are_float32_maths_on_rounded_operands(amx, monkeypatch):
  """Value and VJP of conv3x3_bf16 / pixel_dense_bf16 against the hand-derived rule: the output
  is ref(r(x), r(k)); dx = the product's transpose applied to r(g) with r(k); dk the same with
  r(x) and r(g) (r = rounding to bfloat16). With amx=False the float32 fallback must agree."""
  if amx and not kernels.amx_available():
    pytest.skip("no AMX tiles on this CPU")
  if not amx:
    monkeypatch.setattr(kernels, "amx_available", lambda: False)
  for name, layer, ref, x, k in _bf16_layer_cases():
    y, vjp = jax.vjp(layer, x, k)
    _close_to(y, ref(_bf16(x), _bf16(k)))
    g = jnp.cos(y)
    dx, dk = vjp(g)
    # ref's float32 VJP at (r(x), r(k)) applied to r(g): the products the bfloat16 layer must make
    rdx, rdk = jax.vjp(ref, _bf16(x), _bf16(k))[1](_bf16(g))
    _close_to(dx, rdx)
    _close_to(dk, rdk)
    assert dx.dtype == dk.dtype == jnp.float32
    hlo = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(layer(x, k))), (0, 1))).lower(x, k).as_text()
    targets = ((kernels.DENSE_BF16, kernels.DENSE_GRAD_BF16) if name == "dense"
               else (kernels.CONV_BF16, kernels.KERNEL_GRAD_BF16))
    assert all(t in hlo for t in targets) == amx, name


@pytest.mark.slow
def test_bfloat16_ops_keep_the_parameters_and_changes_only_the_rounding():
  kw = dict(out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
            num_head_channels=32)
  f32, bf16 = unet.Model(**kw, ops=cpu_ops()), unet.Model(**kw, ops=cpu_ops("bfloat16"))
  x, t = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3)), jnp.array([10, 700])
  params = f32.init(jax.random.PRNGKey(1), x, t)
  assert jax.tree.structure(params) == jax.tree.structure(bf16.init(jax.random.PRNGKey(1), x, t))
  params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(2), a.shape), params)  # no zero layers
  a, b = f32.apply(params, x, t), bf16.apply(params, x, t)
  rel = float(jnp.abs(a - b).max() / jnp.abs(a).max())
  assert 1e-5 < rel < 3e-2, rel  # bfloat16 has 8 bits of mantissa: ~0.4 % per product, averaged over sums
  hlo = jax.jit(lambda p: bf16.apply(p, x, t)).lower(params).as_text()
  if kernels.amx_available():
    assert kernels.CONV_BF16 in hlo and kernels.DENSE_BF16 in hlo
  with pytest.raises(SynthMedError, match="matmul_precision='float16'"):
    cpu_ops("float16")


_EIGHT_BF16 = """
import json, sys
import numpy as np
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from synth_med.ops import xla
from synth_med.ops.cpu_native import kernels, layers
mesh = Mesh(np.array(jax.devices()), ("data",))
shard, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
x = jax.random.normal(jax.random.PRNGKey(0), (16, 8, 8, 32)); k = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (3, 3, 32, 16))
w = 0.1 * jax.random.normal(jax.random.PRNGKey(2), (32, 16))
kd, ko = 0.1 * jax.random.normal(jax.random.PRNGKey(3), (3, 3, 32, 32)), 0.1 * jax.random.normal(jax.random.PRNGKey(4), (3, 3, 32, 3))
f = lambda x, k, w, kd, ko: (jnp.sum(jnp.sin(layers.conv3x3_bf16(x, k))) + jnp.sum(jnp.sin(layers.dense_bf16(x, w)))
                             + jnp.sum(jnp.sin(layers.down_conv3x3_bf16(x, kd)))  # downsampling
                             + jnp.sum(jnp.sin(layers.conv3x3_bf16(x, ko))))  # 3 output channels, padded to 16
g = jax.jit(jax.grad(f, range(5)))
args = (jax.device_put(x, shard), jax.device_put(k, rep), jax.device_put(w, rep), jax.device_put(kd, rep),
        jax.device_put(ko, rep))
hlo = g.lower(*args).compile().as_text()
one, eight = g(x, k, w, kd, ko), g(*args)
local = [ln.split("=")[1].split("custom-call")[0].strip() for ln in hlo.splitlines()
         if "custom_call_target=\\"" + kernels.CONV_BF16 + "\\"" in ln]
print("RESULT" + json.dumps({{"amx": kernels.amx_available(),
      "err": max(float(jnp.abs(u - v).max() / jnp.abs(u).max()) for u, v in zip(one, eight)),
      "all_gather": "all-gather" in hlo, "local_conv": local, "shardings": [str(v.sharding.spec) for v in eight]}}))
"""


@needs_amx
def test_eight_device_mesh_runs_the_amx_layers_per_device():
  out, _ = _run(_EIGHT_DEVICES, _EIGHT_BF16)
  assert out["amx"] and out["err"] < 1e-5 and not out["all_gather"]
  # each convolution and its input gradient on the device's 2 images with the whole kernel: the
  # 16-channel conv, the downsampling (a stride-1 conv at full size), the 3-channel conv padded
  # to 16 (its input gradient reads 3 channels: the float32 kernel on rounded operands)
  assert sorted(out["local_conv"]) == ["f32[2,8,8,16]{3,2,1,0}"] * 2 + ["f32[2,8,8,32]{3,2,1,0}"] * 3, out["local_conv"]
  assert "data" in out["shardings"][0] and out["shardings"][1] in ("P()", "PartitionSpec()")


_ATTENTION_SHAPES = [(2, 16, 1, 32),   # one tile of tokens
                     (1, 48, 2, 16),   # 48 tokens: the 32 x 32 blocks' 16-wide remainders
                     (2, 64, 3, 16),
                     (2, 256, 2, 64)]  # the 9M benchmark's attention (16 x 16 px, heads of 64)


@needs_compiler
@pytest.mark.parametrize("products", ["rounded", "amx"])
@pytest.mark.parametrize("shape", _ATTENTION_SHAPES)
def test_bf16_attention_kernels_match_the_bf16_reference(shape, products):
  """Both native bfloat16 modes (AMX tiles; the float32 kernel on rounded operands) compute
  `attend_bf16`'s maths, forward and backward."""
  if products == "amx" and not kernels.amx_available():
    pytest.skip("no AMX tiles on this CPU")
  mode = kernels.ATTN_AMX_BF16 if products == "amx" else kernels.ATTN_ROUNDED_BF16
  b, n, h, d = shape
  ks = jax.random.split(jax.random.PRNGKey(n + d), 2)
  qkv, w = 2.0 * jax.random.normal(ks[0], (b, n, 3, h, d)), jax.random.normal(ks[1], (b, n, h, d))
  _attention_matches_bf16_reference(lambda qkv: layers.native_attend_qkv(qkv, mode), qkv, w)


def test_attend_bf16_reference_is_float32_attention_up_to_bfloat16_rounding():
  """The reference's hand-written VJP is attention's gradient, to bfloat16's precision."""
  ks = jax.random.split(jax.random.PRNGKey(5), 4)
  q, k, v = (jax.random.normal(kk, (2, 24, 2, 8)) for kk in ks[:3])
  w = jax.random.normal(ks[3], (2, 24, 2, 8))
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)) * w)  # noqa: E731
  got = jax.grad(loss(xla.attend_bf16), (0, 1, 2))(q, k, v)
  ref = jax.grad(loss(xla.attend), (0, 1, 2))(q, k, v)
  for g, r in zip(got, ref):
    assert 1e-4 < _rms_rel(g, r) < 2e-2
  r = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
  p = jax.nn.softmax(jnp.einsum("bnhd,bmhd->bhnm", r(q), r(k), precision="highest") / np.sqrt(8), -1)
  np.testing.assert_allclose(xla.attend_bf16(q, k, v), jnp.einsum("bhnm,bmhd->bnhd", r(p), r(v), precision="highest"),
                             rtol=1e-5, atol=1e-6)


def test_unet_picks_the_bf16_attention_mode_per_cpu_and_shape(monkeypatch):
  qkv = jnp.zeros((1, 32, 3, 2, 16))
  assert kernels.attention_products(qkv, False) == kernels.ATTN_FLOAT32
  monkeypatch.setattr(kernels, "amx_available", lambda: True)
  assert kernels.attention_products(qkv, True) == kernels.ATTN_AMX_BF16
  assert kernels.attention_products(jnp.zeros((1, 24, 3, 2, 16)), True) == kernels.ATTN_ROUNDED_BF16
  monkeypatch.setattr(kernels, "amx_available", lambda: False)
  assert kernels.attention_products(qkv, True) == kernels.ATTN_ROUNDED_BF16


@needs_amx
def test_amx_attention_refuses_shapes_it_cannot_tile_and_unknown_modes():
  qkv = jax.random.normal(jax.random.PRNGKey(0), (1, 24, 3, 1, 16))  # 24 tokens: not a multiple of 16
  with pytest.raises(Exception, match="multiples of (16|the SIMD width)"):  # an error, not float32 products
    jax.block_until_ready(kernels.attention_fwd(qkv, kernels.ATTN_AMX_BF16))
  with pytest.raises(Exception, match="products must be 0"):
    jax.block_until_ready(kernels.attention_fwd(qkv[:, :16], 3))
