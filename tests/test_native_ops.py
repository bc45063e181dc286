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

from synth_med.models import native_ops, unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_compiler = pytest.mark.skipif(native_ops.compiler() is None, reason="no C++ compiler on this machine")


def _autodiff_kernel_grad(x, g):
  """XLA's own gradient of its own convolution: an independent reference."""
  return jax.grad(lambda k: jnp.sum(unet._conv(x, k) * g))(jnp.zeros((3, 3, x.shape[-1], g.shape[-1])))


@needs_compiler
@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 32),     # first conv: o fits the SIMD width
                                   (2, 8, 6, 32, 3),     # last conv: only c fits, the transposed call
                                   (3, 6, 9, 40, 48),    # partial register tiles, h != w
                                   (2, 1, 4, 16, 16),    # one-row images: only the middle taps see data
                                   (4, 16, 16, 64, 64)])
def test_native_kernel_grad_matches_autodiff(shape):
  assert native_ops.simd_width() in (8, 16)
  b, h, w, c, o = shape
  kx, kg = jax.random.split(jax.random.PRNGKey(sum(shape)))
  x, g = jax.random.normal(kx, (b, h, w, c)), jax.random.normal(kg, (b, h, w, o))
  got = jax.jit(native_ops.kernel_grad)(x, g)
  assert got is not None and got.shape == (3, 3, c, o)
  ref = _autodiff_kernel_grad(x, g)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))


def _xla_conv_input_grad(g, k):
  """XLA's own input gradient of its own convolution, for output gradient g: an independent reference."""
  x0 = jnp.zeros(g.shape[:3] + (k.shape[2],))
  return jax.vjp(lambda x: unet._conv(x, k), x0)[1](g)[0]


@needs_compiler
@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 32),     # the input conv: 3 channels in
                                   (3, 6, 9, 48, 32),    # rows of 9 pixels: a full and a one-pixel tile
                                   (2, 1, 4, 16, 16),    # one-row images: only the middle taps see data
                                   (2, 12, 20, 32, 48),  # 48 outputs: two vectors, then one
                                   (2, 4, 4, 128, 64)])
def test_native_conv3x3_and_its_input_gradient_match_xla(shape):
  assert native_ops.simd_width() in (8, 16)
  b, h, w, c, o = shape
  kx, kk, kg = jax.random.split(jax.random.PRNGKey(sum(shape)), 3)
  x, k, g = jax.random.normal(kx, (b, h, w, c)), jax.random.normal(kk, (3, 3, c, o)), jax.random.normal(kg, (b, h, w, o))
  close = lambda got, ref: np.testing.assert_allclose(  # noqa: E731
      np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-5 * float(jnp.abs(ref).max()))
  close(jax.jit(native_ops.conv3x3)(x, k), unet._conv(x, k))
  if c % native_ops.simd_width() == 0:
    close(jax.jit(lambda g, k: native_ops.conv3x3(g, k, flip=True))(g, k), _xla_conv_input_grad(g, k))


@needs_compiler
@pytest.mark.parametrize("shapes", [((2, 5, 7), 24, 32),   # skip 1x1 conv: n fits the SIMD width
                                    ((3, 20), 32, 12),     # only m fits: the transposed call
                                    ((2, 9), 16, 48)])     # attention's qkv: (batch, tokens)
def test_native_dense_kernel_grad_matches_a_matmul(shapes):
  lead, m, n = shapes
  x = jax.random.normal(jax.random.PRNGKey(m), lead + (m,))
  g = jax.random.normal(jax.random.PRNGKey(n), lead + (n,))
  got = jax.jit(native_ops.dense_kernel_grad)(x, g)
  ref = np.asarray(x).reshape(-1, m).T @ np.asarray(g).reshape(-1, n)
  assert got is not None and got.shape == (m, n)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  kernel = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (m, n)))
  if n % native_ops.simd_width() == 0:  # the product itself
    np.testing.assert_allclose(native_ops.dense(x, kernel), np.asarray(x) @ kernel, rtol=1e-4, atol=1e-4)
  if m % native_ops.simd_width() == 0:  # the input gradient, g @ kernel.T
    np.testing.assert_allclose(native_ops.dense(g, kernel, transpose_kernel=True), np.asarray(g) @ kernel.T,
                               rtol=1e-4, atol=1e-4)


def test_pixel_dense_is_nn_dense_with_the_same_parameters_and_gradients():
  from flax import linen as nn
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 16))
  ours, theirs = unet.PixelDense(32), nn.Dense(32)
  params = theirs.init(jax.random.PRNGKey(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(1), x)) == jax.tree.map(jnp.shape, params)
  params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias too
  loss = lambda layer: lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x)))  # noqa: E731
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.grad(loss(ours), (0, 1))(params, x)),
                  jax.tree.leaves(jax.grad(loss(theirs), (0, 1))(params, x))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  hlo = jax.jit(jax.grad(loss(ours))).lower(params, x).as_text()
  native = native_ops.simd_width() is not None
  assert (native_ops.DENSE_GRAD in hlo) == native and (f"@{native_ops.DENSE}(" in hlo) == native


@needs_compiler
def test_conv3x3_gradients_use_the_native_kernel_and_match():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 16))
  k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 16, 32)) * 0.1
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))  # noqa: E731
  hlo = jax.jit(jax.grad(loss(unet.conv3x3), (0, 1))).lower(x, k).as_text()
  assert native_ops.KERNEL_GRAD in hlo and native_ops.CONV in hlo and "conv_general_dilated" not in hlo
  got = jax.grad(loss(unet.conv3x3), (0, 1))(x, k)
  ref = jax.grad(loss(unet._conv), (0, 1))(x, k)
  for a, r in zip(got, ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-4)


def test_channels_that_fit_no_simd_width_fall_back(monkeypatch):
  monkeypatch.setitem(native_ops._state, "width", 16)
  assert native_ops.kernel_grad(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 4, 5))) is None
  assert native_ops.dense_kernel_grad(jnp.zeros((1, 4, 3)), jnp.zeros((1, 4, 5))) is None
  assert native_ops.dense(jnp.zeros((1, 4, 16)), jnp.zeros((16, 5))) is None
  with pytest.raises(ValueError, match="do not match"):
    native_ops.dense(jnp.zeros((1, 4, 16)), jnp.zeros((16, 32)), transpose_kernel=True)
  with pytest.raises(ValueError, match="agree"):
    native_ops.dense_kernel_grad(jnp.zeros((1, 4, 3)), jnp.zeros((1, 5, 16)))
  assert native_ops.conv3x3(jnp.zeros((1, 4, 4, 32)), jnp.zeros((3, 3, 32, 3))) is None  # the output conv
  assert native_ops.conv3x3(jnp.zeros((1, 4, 4, 16), jnp.bfloat16), jnp.zeros((3, 3, 16, 16), jnp.bfloat16)) is None
  with pytest.raises(ValueError, match="do not match"):
    native_ops.conv3x3(jnp.zeros((1, 4, 4, 8)), jnp.zeros((3, 3, 16, 16)))
  with pytest.raises(ValueError, match="same"):
    native_ops.kernel_grad(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 5, 16)))


_SUBPROCESS = """
import json, sys, logging
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp
from synth_med.models import native_ops, unet
logging.basicConfig(level=logging.WARNING)
x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 16)); k = jnp.ones((3, 3, 16, 16)) * 0.1
dk = jax.grad(lambda k: jnp.sum(unet.conv3x3(x, k) ** 2))(k)
ref = jax.grad(lambda k: jnp.sum(unet._conv(x, k) ** 2))(k)
print("RESULT" + json.dumps({{"width": native_ops.simd_width(), "err": float(jnp.abs(dk - ref).max())}}))
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


@needs_compiler
def test_build_is_cached_per_source_and_written_atomically(tmp_path, monkeypatch):
  monkeypatch.setenv("SYNTH_MED_NATIVE_CACHE", str(tmp_path))
  first = native_ops.build()
  assert first.parent == tmp_path and first.stat().st_size > 0
  mtime = first.stat().st_mtime_ns
  assert native_ops.build() == first and first.stat().st_mtime_ns == mtime  # cached, not rebuilt
  assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left
  monkeypatch.setattr(native_ops, "_cpu_fingerprint", lambda: "another CPU")  # -march=native: per CPU
  assert native_ops.library_path(native_ops.compiler()) != first


_EIGHT = """
import json, sys
import numpy as np
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from synth_med.models import native_ops, unet
mesh = Mesh(np.array(jax.devices()), ("data",))
x = jax.random.normal(jax.random.PRNGKey(0), (16, 8, 8, 32)); g = jax.random.normal(jax.random.PRNGKey(1), (16, 8, 8, 3))
shard = NamedSharding(mesh, P("data"))
xs, gs = jax.device_put(x, shard), jax.device_put(g, shard)
out = {{}}
for name, op, target in (("conv", native_ops.kernel_grad, native_ops.KERNEL_GRAD),
                         ("dense", native_ops.dense_kernel_grad, native_ops.DENSE_GRAD)):
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


@needs_compiler
@pytest.mark.skipif(native_ops.simd_width() != 16, reason="the AVX2 variant is the default build on this CPU")
def test_avx2_build_gives_the_same_values(tmp_path, monkeypatch):
  """Machines without AVX-512 get the 8-float variant (other register tiles, 8-wide exp); check
  all three ops of it here too, against XLA's paths, with channel counts that only 8 divides."""
  import ctypes
  monkeypatch.setenv("SYNTH_MED_NATIVE_CACHE", str(tmp_path))
  lib = ctypes.cdll.LoadLibrary(str(native_ops.build(extra_flags=("-mno-avx512f",))))
  assert lib.synth_med_simd_width() == 8
  for name in ("Conv3x3", "KernelGrad", "Dense", "DenseGrad", "GroupNormActFwd", "GroupNormActBwd", "AttentionFwd", "AttentionBwd"):
    jax.ffi.register_ffi_target(f"avx2_{name}", jax.ffi.pycapsule(getattr(lib, f"SynthMed{name}")), platform="cpu")
  close = lambda got, ref: np.testing.assert_allclose(  # noqa: E731
      np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))
  ks = jax.random.split(jax.random.PRNGKey(3), 8)

  x, g = jax.random.normal(ks[0], (3, 6, 9, 13)), jax.random.normal(ks[1], (3, 6, 9, 24))
  close(native_ops._local(x, g, True, target="avx2_KernelGrad"), _autodiff_kernel_grad(x, g))
  close(jax.ffi.ffi_call("avx2_DenseGrad", jax.ShapeDtypeStruct((13, 24), jnp.float32))(x, g),
        np.asarray(x).reshape(-1, 13).T @ np.asarray(g).reshape(-1, 24))
  w = jax.random.normal(ks[4], (24, 13))  # 24 outputs: a 6-row group and 3 vectors of 8
  close(jax.ffi.ffi_call("avx2_Dense", jax.ShapeDtypeStruct(g.shape, jnp.float32))(x, w, transpose_kernel=True),
        np.asarray(x) @ np.asarray(w).T)
  k = jax.random.normal(ks[2], (3, 3, 13, 24))
  close(jax.ffi.ffi_call("avx2_Conv3x3", jax.ShapeDtypeStruct(g.shape, jnp.float32))(x, k, flip=False),
        unet._conv(x, k))
  k = jax.random.normal(ks[3], (3, 3, 24, 8))
  close(jax.ffi.ffi_call("avx2_Conv3x3", jax.ShapeDtypeStruct(g.shape, jnp.float32))(
      g[..., :8], k, flip=True), _xla_conv_input_grad(g[..., :8], k))

  x = 2.0 * jax.random.normal(ks[2], (2, 5, 7, 24)) + 1.0  # 24 channels: 3 vectors of 8, groups of 6
  a, b = 1 + 0.3 * jax.random.normal(ks[3], (2, 24)), 0.3 * jax.random.normal(ks[4], (2, 24))
  dy = jax.random.normal(ks[5], x.shape)
  monkeypatch.setattr(native_ops, "norm_fits", lambda x, groups: False)  # the reference: XLA's path
  y_ref, res = unet._group_norm_act_fwd(x, a, b, 4, True)
  grads_ref = unet._group_norm_act_bwd(4, True, res, dy)
  bc = jax.ShapeDtypeStruct((2, 24), jnp.float32)
  y, mean, inv = jax.ffi.ffi_call("avx2_GroupNormActFwd", (jax.ShapeDtypeStruct(x.shape, jnp.float32), bc, bc))(
      x, a, b, groups=np.int64(4), silu=True)
  close(y, y_ref)
  grads = jax.ffi.ffi_call("avx2_GroupNormActBwd", (jax.ShapeDtypeStruct(x.shape, jnp.float32), bc, bc))(
      x, a, b, mean, inv, dy, groups=np.int64(4), silu=True)
  for got, ref in zip(grads, grads_ref):
    close(got, ref)

  qkv, w = jax.random.normal(ks[6], (2, 24, 3, 2, 8)), jax.random.normal(ks[7], (2, 24, 2, 8))
  ref_attend = lambda qkv: unet.attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # noqa: E731
  out, lse = jax.ffi.ffi_call("avx2_AttentionFwd", (jax.ShapeDtypeStruct((2, 24, 2, 8), jnp.float32),
                                                    jax.ShapeDtypeStruct((2, 2, 24), jnp.float32)))(qkv)
  close(out, ref_attend(qkv))
  dqkv = jax.ffi.ffi_call("avx2_AttentionBwd", jax.ShapeDtypeStruct(qkv.shape, jnp.float32))(qkv, lse, w)
  close(dqkv, jax.grad(lambda q: jnp.sum(ref_attend(q) * w))(qkv))


@needs_compiler
@pytest.mark.parametrize("shape", [(2, 32, 2, 16), (3, 64, 1, 32), (2, 48, 3, 16)])
def test_native_attention_matches_xla_attend_values_and_gradients(shape):
  b, n, h, d = shape
  assert native_ops.attention_fits(jnp.zeros((b, n, 3, h, d)))  # 16 | n, d: both SIMD widths fit
  qkv = 2.0 * jax.random.normal(jax.random.PRNGKey(n + d), (b, n, 3, h, d))
  w = jax.random.normal(jax.random.PRNGKey(1), (b, n, h, d))
  ref = lambda qkv: unet.attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # noqa: E731
  np.testing.assert_allclose(unet.attend_qkv(qkv), ref(qkv), rtol=1e-4, atol=1e-5)
  out, lse = native_ops.attention_fwd(qkv)
  logits = jnp.einsum("bnhd,bmhd->bhnm", qkv[:, :, 0], qkv[:, :, 1]) / np.sqrt(d)
  np.testing.assert_allclose(lse, jax.nn.logsumexp(logits, -1), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda qkv: jnp.sum(jnp.sin(f(qkv)) * w)  # noqa: E731
  np.testing.assert_allclose(jax.grad(loss(unet.attend_qkv))(qkv), jax.grad(loss(ref))(qkv), rtol=1e-4, atol=1e-4)


def test_unet_attention_uses_the_native_kernels_only_where_they_fit():
  from flax import linen as nn  # noqa: F401
  width = native_ops.simd_width()
  for c, hw, want in ((32, 4, width is not None and 16 % width == 0), (24, 3, False)):
    layer = unet.Attention(num_head_channels=c // 2 if c == 32 else 24)
    x = jnp.ones((1, hw, hw, c))
    params = layer.init(jax.random.PRNGKey(0), x)
    hlo = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x)))).lower(params).as_text()
    assert (native_ops.ATTN_FWD in hlo and native_ops.ATTN_BWD in hlo) == want, (c, hw)


_EIGHT_ATTN = """
import json, sys
import numpy as np
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from synth_med.models import native_ops, unet
mesh = Mesh(np.array(jax.devices()), ("data",))
shard = NamedSharding(mesh, P("data"))
x = jax.random.normal(jax.random.PRNGKey(0), (16, 4, 8, 32))
a, b = 1 + 0.1 * jax.random.normal(jax.random.PRNGKey(1), (16, 32)), jnp.zeros((16, 32))
qkv = jax.random.normal(jax.random.PRNGKey(2), (16, 32, 3, 2, 16))
k = 0.1 * jax.random.normal(jax.random.PRNGKey(3), (3, 3, 32, 16))
def f(x, a, b, qkv, k):
  return (jnp.sum(unet.group_norm_act(x, a, b, 8, True) ** 2) + jnp.sum(unet.attend_qkv(qkv) ** 2)
          + jnp.sum(jnp.sin(unet.conv3x3(x, k))))
g = jax.jit(jax.grad(f, range(5)))
args = (x, a, b, qkv, k)
sharded = [jax.device_put(v, shard) for v in args[:4]] + [jax.device_put(k, NamedSharding(mesh, P()))]
hlo = g.lower(*sharded).compile().as_text()
one, eight = g(*args), g(*sharded)
print("RESULT" + json.dumps({{"err": max(float(jnp.abs(u - v).max()) for u, v in zip(one, eight)),
      "all_gather": "all-gather" in hlo, "local_norm": "f32[2,4,8,32]" in hlo, "local_attn": "f32[2,32,3,2,16]" in hlo,
      "local_conv": [ln.split("=")[1].split("custom-call")[0].strip() for ln in hlo.splitlines()
                     if "custom_call_target=\\"" + native_ops.CONV + "\\"" in ln],
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


@needs_compiler
def test_an_unwritable_cache_directory_builds_in_the_temp_dir(tmp_path, monkeypatch):
  blocker = tmp_path / "not_a_dir"
  blocker.write_text("a file where the cache directory should be")
  monkeypatch.setenv("SYNTH_MED_NATIVE_CACHE", str(blocker / "native"))
  monkeypatch.setattr(native_ops.tempfile, "tempdir", str(tmp_path / "tmp"))
  (tmp_path / "tmp").mkdir()
  out = native_ops.build()
  assert out.exists() and out.parent.parent == tmp_path / "tmp"
