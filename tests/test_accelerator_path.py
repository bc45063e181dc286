"""The UNet on a GPU's ops, run and lowered on this CPU.

`select_ops('gpu', precision)` gives XLA's own convolutions and dots (bfloat16 operands at
'bfloat16' precision) and cuDNN's fused attention for 16-bit activations. An accelerator is not
always at hand, so the model is built here on those ops with one change, cuDNN's attention run as
`jax.nn.dot_product_attention`'s XLA implementation (the same maths, which runs on a CPU). It
must match the CPU ops' float32 maths, use no native kernel, and its whole train step must lower
for CUDA (`jax.export`).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export

from synth_med.diffusion.conditioning import ConditioningSpec
from synth_med.diffusion.schedules import make_schedule
from synth_med.diffusion.training import DiffusionTask
from synth_med.experiments.diffusion import build_schedule, low_res_augment
from synth_med.models.diffusion_unets import build_model
from synth_med.models import unet
from synth_med.ops import cpu_ops, select_ops, xla
from synth_med.ops.cpu_native import kernels
from synth_med.train import state as state_lib
from synth_med.train.optimizers import make_optimizer
from synth_med.train.step import make_train_step
from tests.conftest import load_config

NATIVE_PREFIX = "synth_med_"  # every native kernel's FFI target's name starts so

# A GPU's ops on a CPU: the float32 reference runs the CPU ops (native kernels)
pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="runs a GPU's ops on a CPU")


def gpu_ops(precision: str = "float32"):
  """`select_ops('gpu', precision)` with its cuDNN attention run as XLA's (checked to be cuDNN)."""
  ops = select_ops("gpu", precision)
  assert ops.attention.keywords["fused"] == "cudnn"
  return dataclasses.replace(ops, attention=functools.partial(ops.attention, fused="xla"))


def _model(**kw) -> unet.Model:
  # resblock_updown=False: the downsampling is the strided convolution
  args = dict(out_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
              num_head_channels=8, resblock_updown=False, ops=gpu_ops())
  args.update(kw)
  return unet.Model(**args)


def test_16_bit_attention_takes_the_fused_call_the_ops_name():
  """`xla.attend_qkv(fused=impl)` is `jax.nn.dot_product_attention(implementation=impl)` for 16-bit
  qkv (bit for bit: the GPU ops pass 'cudnn'), and the two-matmul `attend` for float32."""
  qkv = jax.random.normal(jax.random.key(0), (2, 16, 3, 2, 8))
  for dtype, fused in ((jnp.bfloat16, True), (jnp.float32, False)):
    a = qkv.astype(dtype)
    q, k, v = a[:, :, 0], a[:, :, 1], a[:, :, 2]
    got = np.asarray(xla.attend_qkv(a, fused="xla"), np.float32)
    call = np.asarray(jax.nn.dot_product_attention(q, k, v, implementation="xla"), np.float32)
    two_matmuls = np.asarray(xla.attend(q, k, v), np.float32)
    assert np.array_equal(got, call if fused else two_matmuls)
    if fused:
      assert not np.array_equal(got, two_matmuls)  # (so the line above can fail)


def _inputs():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  return x, jnp.array([10, 700])


def _perturbed_params(model, x, t):
  params = model.init(jax.random.PRNGKey(1), x, t)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))  # no zero layers: every branch matters
  return jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def _out_and_grads(model, params, x, t):
  def loss(p):
    out = model.apply(p, x, t).astype(jnp.float32)
    return jnp.sum(jnp.sin(out)), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return out, grads


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_gpu_ops_match_the_cpu_float32_maths(precision):
  x, t = _inputs()
  reference = _model(ops=cpu_ops())
  params = _perturbed_params(reference, x, t)
  model = _model(dtype=jnp.bfloat16, ops=gpu_ops(precision))  # :full's compute dtype

  ref_out, ref_grads = _out_and_grads(reference, params, x, t)
  cpu_hlo = jax.jit(lambda p: reference.apply(p, x, t)).lower(params).as_text()
  out, grads = _out_and_grads(model, params, x, t)

  hlo = jax.jit(lambda p: model.apply(p, x, t)).lower(params).as_text()
  assert NATIVE_PREFIX not in hlo  # no CPU-only custom call on an accelerator
  if kernels.simd_width():
    assert NATIVE_PREFIX in cpu_hlo  # (so the line above can fail)
  # bfloat16 activations: ~0.4 % per rounding, over a few layers (measured: out 0.9 %, grads 1.4 %).
  # Biases are added in float32 so that their gradients are float32 sums: summed in bfloat16, the
  # output conv's bias gradient here (512 terms of ~0.95) stuck at 256, 47 % off.
  assert _rel(out, ref_out) < 3e-2, _rel(out, ref_out)
  worst = max(jax.tree.leaves(jax.tree.map(_rel, grads, ref_grads)))
  assert worst < 5e-2, worst
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))  # params stay float32


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for sub in (value if isinstance(value, (list, tuple)) else (value,)):
      inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's jaxpr, or a Jaxpr
      if hasattr(inner, "eqns"):
        yield inner


def _sums_of_16_bit_terms(jaxpr) -> list[tuple[str, int]]:
  """(op, number of terms) of every reduction in a jaxpr (sub-jaxprs included) with 16-bit operands."""
  found = []
  for e in jaxpr.eqns:
    if e.primitive.name.startswith("reduce_") and e.invars[0].aval.dtype in (jnp.bfloat16, jnp.float16):
      shape = e.invars[0].aval.shape
      found.append((e.primitive.name, int(np.prod([shape[a] for a in e.params["axes"]]))))
    for sub in _sub_jaxprs(e):
      found += _sums_of_16_bit_terms(sub)
  return found


def _check_lowers_for_cuda(step, state, batch) -> str:
  """`step` sums no more than 4 bfloat16 terms anywhere (the nearest upsampling's gradient sums
  4) and lowers for CUDA with no native kernel in it; its StableHLO."""
  sums = _sums_of_16_bit_terms(jax.make_jaxpr(step)(state, batch).jaxpr)
  assert max((n for _, n in sums), default=0) <= 4, sorted(set(sums))
  exported = export.export(step, platforms=["cuda"])(state, batch)
  assert exported.platforms == ("cuda",)
  text = exported.mlir_module()
  assert NATIVE_PREFIX not in text
  return text


@pytest.mark.slow
@pytest.mark.parametrize("scale_shift", [True, False])
def test_the_train_step_lowers_for_cuda_and_sums_in_float32(scale_shift):
  """The whole step (loss, grads, Adam, EMA) of a bfloat16 model conditioned on a label and sex:
  bias and embedding gradients, which sum over the batch and the pixels, are float32 sums."""
  task = DiffusionTask(_model(dtype=jnp.bfloat16, use_scale_shift_norm=scale_shift), make_schedule("linear", 1000),
                       ConditioningSpec("softmax", 3, (("sex", 2),)), 0.1)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8),
           "label": np.eye(3, dtype=np.float32)[rng.integers(0, 3, 4)], "label_mask": np.ones((4, 3), np.float32),
           "labelled": np.array([True, True, False, True]), "attrs/sex": np.array([0, 1, 1, 0], np.int32)}
  tx = optax.adam(1e-4)
  params = task.init(jax.random.PRNGKey(0), batch)
  state = state_lib.create(params, tx, jax.random.key(1))
  step = jax.jit(make_train_step(task, tx, lambda _: 1e-4, 0.999))
  assert "stablehlo.convolution" in _check_lowers_for_cuda(step, state, batch)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["base", "upsampler"])
def test_the_full_table_e1_train_steps_lower_for_cuda(stage):
  """`derm_cascade:full`'s base (64 px, 276 M params, batch 128) and upsampler (64 -> 256 px,
  batch 32) train steps, as an accelerator runs them, lowered for CUDA on abstract shapes:
  the configs build, trace in bfloat16 with cuDNN attention, and sum no gradient in 16 bits."""
  config = load_config("derm_cascade", "full")[stage]
  assert config.model.dtype == "bfloat16"
  low_aug = low_res_augment(config)
  ops = gpu_ops(str(config.model.matmul_precision))
  task = DiffusionTask(build_model(config.model, 3, ops), build_schedule(config),
                       ConditioningSpec("softmax", 27, (("sex", 2),)), float(config.diffusion.drop_prob), low_aug)
  tx, schedule = make_optimizer(config.train.optimizer, int(config.train.steps))
  b, size = int(config.train.batch_size), int(config.data.image_size)
  batch = {"image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8),
           "label": jax.ShapeDtypeStruct((b, 27), jnp.float32), "label_mask": jax.ShapeDtypeStruct((b, 27), jnp.float32),
           "labelled": jax.ShapeDtypeStruct((b,), jnp.bool_), "attrs/sex": jax.ShapeDtypeStruct((b,), jnp.int32)}
  state = jax.eval_shape(lambda rng, b: state_lib.create(task.init(rng, b), tx, jax.random.fold_in(rng, 1)),
                         jax.random.key(0), batch)
  step = jax.jit(make_train_step(task, tx, schedule, float(config.train.ema_decay)))
  _check_lowers_for_cuda(step, state, batch)
  if stage == "base":
    assert 270e6 < unet.num_params(state.params) < 280e6  # Table E1's base model (bench/README: 276.4 M)
