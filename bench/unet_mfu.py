"""MFU of the diffusion train step on an accelerator (the `:full` Table E1 base model, bf16).

    python bench/unet_mfu.py                     # derm :full base model, batch 128
    python bench/unet_mfu.py --config_arg=smoke --batch=8 --steps=3   # a quick CPU check

It builds the model from `configs/derm_diffusion.py:<arg>`, runs the very train
step the loop runs (`synth_med.train.step.make_train_step`: loss, grads, Adam,
EMA) on a device-resident random batch, and reports

    MFU = model FLOPs per step / (seconds per step * peak FLOP/s)

- Model FLOPs: 2 x the multiply-adds of every convolution and matmul in the
  step's jaxpr (forward and backward), traced with the reference ops (plain
  convolutions, attention as two matmuls), so every variant is charged the
  same work (`synth_med.ops.xla_ops`). `--flops_only` on a CPU also prints XLA's cost analysis of the
  same step (GPU backends return none) as a cross-check.
- Peak is the datasheet dense bf16 rate (989 TFLOP/s for H100/H200 SXM) and,
  for reference, the rate of a large bf16 matmul measured in the same run.
- Variants, each the model built on this backend's `Ops` with one op swapped: `default`,
  `xla_attention` (attention as two matmuls instead of cuDNN's fused kernel),
  `matmul_conv_grad` (the 3x3 kernel gradient as one matmul over shifted copies, as CPUs
  compute it), `autodiff_norm` (GroupNorm + SiLU differentiated by autodiff instead of
  `xla.group_norm_act`'s custom VJP) and the diagnostic `affine_norm` (the norm without its
  statistics: not a valid model).
  `tests/test_bench_scripts.py` runs them on the smoke model.
- Memory: each variant prints what its compiled step holds (XLA's buffer assignment: state,
  batch and temporaries) against the device's limit, and after timing the device's peak use;
  an out-of-memory variant is reported with the batch to try instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import derm_diffusion
from synth_med.diffusion.conditioning import ConditioningSpec
from synth_med.diffusion.schedules import make_schedule
from synth_med.diffusion.training import DiffusionTask
from synth_med.models import unet
from synth_med.models.diffusion_unets import build_model
from synth_med.ops import Ops, select_ops, xla, xla_ops
from synth_med.train import state as state_lib
from synth_med.train.optimizers import make_optimizer
from synth_med.train.step import make_train_step

DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12}


def _affine_norm_act(x, a, b, groups, silu):
  del groups
  z = x.astype(jnp.float32) * a[:, None, None, :] + b[:, None, None, :]
  return (jax.nn.silu(z) if silu else z).astype(x.dtype)


def _autodiff_norm_act(x, a, b, groups, silu):
  """GroupNorm -> affine -> SiLU written out for autodiff (storing what `xla.group_norm_act`'s
  custom VJP recomputes)."""
  xf = x.astype(jnp.float32)
  mean, inv = xla.group_stats(xf, groups)
  z = (xf - mean[:, None, None, :]) * inv[:, None, None, :] * a[:, None, None, :] + b[:, None, None, :]
  return (jax.nn.silu(z) if silu else z).astype(x.dtype)


def variant_ops(name: str, precision: str) -> Ops:
  """The ops a variant builds the model with: this backend's, with one op swapped."""
  ops = select_ops(jax.default_backend(), precision)
  swaps = {
      "default": {},
      "xla_attention": {"attention": functools.partial(xla.attend_qkv, bf16_products=precision == "bfloat16")},
      "matmul_conv_grad": {"conv3x3": xla.conv3x3_matmul_grad},
      # diagnostic only (not a valid model): GroupNorm replaced by its affine part, to price the norm
      "affine_norm": {"norm_act": _affine_norm_act},
      # the norm as autodiff sees the plain chain, to price group_norm_act's custom VJP on this device
      "autodiff_norm": {"norm_act": _autodiff_norm_act},
  }[name]
  return dataclasses.replace(ops, name=f"{ops.name}+{name}", **swaps)


VARIANTS = ("default", "xla_attention", "matmul_conv_grad", "affine_norm", "autodiff_norm")


def jaxpr_flops(jaxpr) -> float:
  """2 x multiply-adds of every convolution and matmul in a (closed) jaxpr, sub-jaxprs included."""
  total = 0.0
  for e in jaxpr.eqns:
    if e.primitive.name == "conv_general_dilated":
      rhs = e.invars[1].aval.shape
      out_feat_dim = e.params["dimension_numbers"].rhs_spec[0]
      total += 2.0 * np.prod(e.outvars[0].aval.shape) * np.prod(rhs) / rhs[out_feat_dim]
    elif e.primitive.name == "dot_general":
      (lc, _), _ = e.params["dimension_numbers"]
      lhs = e.invars[0].aval.shape
      total += 2.0 * np.prod(e.outvars[0].aval.shape) * np.prod([lhs[i] for i in lc])
    for v in e.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else (v,)):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          total += jaxpr_flops(inner if hasattr(inner, "eqns") else inner.jaxpr)
        elif hasattr(sub, "eqns"):
          total += jaxpr_flops(sub)
  return total


def random_batch(batch: int, size: int, num_classes: int, rng: np.random.Generator) -> dict:
  label = rng.dirichlet(np.ones(num_classes), batch).astype(np.float32)
  return {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
          "label": label, "label_mask": np.ones_like(label),
          "labelled": rng.random(batch) < 0.7, "attrs/sex": rng.integers(0, 2, batch).astype(np.int32)}


def matmul_peak(n: int = 8192, reps: int = 10) -> float:
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.bfloat16)
  b = jax.random.normal(kb, (n, n), jnp.bfloat16)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.bfloat16))
  f(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / statistics.median(times)


def memory_report(compiled, dev) -> str:
  """What the compiled step holds on the device (XLA's buffer assignment), against the device's limit."""
  m = compiled.memory_analysis()
  if m is None:
    return "memory: no analysis on this backend"
  held = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  limit = (dev.memory_stats() or {}).get("bytes_limit")
  return (f"memory: state+batch {m.argument_size_in_bytes / 2**30:.2f} GiB, temporaries "
          f"{m.temp_size_in_bytes / 2**30:.2f} GiB, {held / 2**30:.2f} GiB in all"
          + (f" of the device's {limit / 2**30:.1f} GiB" if limit else ""))


def _category(name: str) -> str:
  n = name.lower()
  for key, words in (("attention (cuDNN fmha)", ("fmha", "flash", "attention", "sdpa")),
                     ("convolution", ("conv", "xmma", "implicit", "wgrad", "dgrad", "fprop", "cudnn")),
                     ("matmul", ("gemm", "dot", "matmul", "cublas", "sm90_", "triton_gemm")),
                     ("reduction / norm", ("reduce", "reduction")),
                     ("copy / transpose", ("copy", "transpose")),
                     ("elementwise fusion", ("fusion", "loop", "input"))):
    if any(w in n for w in words):
      return key
  return "other"


def profile_step(fn, state, batch, steps: int, top: int = 30):
  """Trace `steps` calls of `fn` and print device time by HLO op and by kind (jax.profiler.ProfileData)."""
  import collections
  import glob
  import tempfile
  from jax.profiler import ProfileData

  for _ in range(2):
    state, m = fn(state, batch)
  jax.block_until_ready((state, m))
  logdir = tempfile.mkdtemp()
  with jax.profiler.trace(logdir):
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = fn(state, batch)
    jax.block_until_ready((state, m))
    wall = (time.perf_counter() - t0) / steps
  (path,) = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
  data = ProfileData.from_file(path)
  planes = [p for p in data.planes if p.name.startswith("/device:")]
  if not planes:
    print(f"profile: no device plane in {[p.name for p in data.planes]}")
    return state
  for line_kind in ("XLA Ops", "Kernels"):
    totals, counts, detail = collections.Counter(), collections.Counter(), {}
    for plane in planes[:1]:
      for line in plane.lines:
        use = (line.name == "XLA Ops") if line_kind == "XLA Ops" else line.name.startswith("Stream")
        if not use:
          continue
        for e in line.events:
          totals[e.name] += e.duration_ns
          counts[e.name] += 1
          if e.name not in detail:
            try:
              stats = dict(e.stats)
              detail[e.name] = str(stats.get("long_name") or stats.get("tf_op") or "")
            except Exception:  # noqa: BLE001 - stats are only a hint
              detail[e.name] = ""
    busy = sum(totals.values()) / steps / 1e6
    if not totals:
      print(f"profile: no '{line_kind}' events")
      continue
    print(f"\nprofile [{line_kind}]: wall {wall * 1e3:.1f} ms/step, device busy {busy:.1f} ms/step "
          f"({len(totals)} distinct names)")
    by_cat = collections.Counter()
    for name, ns in totals.items():
      by_cat[_category(name)] += ns
    for cat, ns in by_cat.most_common():
      print(f"  {cat:24s} {ns / steps / 1e6:8.1f} ms/step  {ns / sum(totals.values()):6.1%}")
    for name, ns in totals.most_common(top):
      print(f"  {ns / steps / 1e6:7.2f} ms x{counts[name] // steps:<4d} {name[:110]}")
      if detail.get(name):
        print(f"      {detail[name][:220]}")
  return state


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--config_arg", default="full")
  ap.add_argument("--batch", type=int, default=0, help="0: the config's train.batch_size")
  ap.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--flops_only", action="store_true", help="print the model FLOPs and stop")
  ap.add_argument("--profile", type=int, default=0, metavar="N",
                  help="after timing, trace N steps of the default variant and print where device time goes")
  args = ap.parse_args()

  config = derm_diffusion.get_config(args.config_arg + ",label_property")
  batch_size = args.batch or int(config.train.batch_size)
  size = int(config.data.image_size)
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", str(dev))
  print(f"device: {kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
  print(f"config: derm_diffusion:{args.config_arg}  {size} px  ch {config.model.model_channels} "
        f"mult {tuple(config.model.channel_mult)} res {config.model.num_res_blocks} "
        f"attn {tuple(config.model.attention_resolutions)} dtype {config.model.dtype}  batch {batch_size}",
        flush=True)

  d = config.diffusion
  precision = str(config.model.matmul_precision)
  tx, schedule = make_optimizer(config.train.optimizer, int(config.train.steps))
  batch = jax.device_put(random_batch(batch_size, size, 27, np.random.default_rng(0)))

  def step_and_init(ops: Ops):
    """The loop's train step and state initialiser for the model built on `ops`."""
    task = DiffusionTask(build_model(config.model, 3, ops), make_schedule(d.schedule, int(d.num_steps), d.variance),
                         ConditioningSpec("softmax", 27, (("sex", 2),)), float(d.drop_prob))
    init = lambda rng: state_lib.create(task.init(rng, batch), tx, jax.random.fold_in(rng, 1))  # noqa: E731
    return make_train_step(task, tx, schedule, float(config.train.ema_decay)), init

  # Model FLOPs, from the step with the reference ops.
  step, init = step_and_init(xla_ops(precision))
  abstract = jax.eval_shape(init, jax.random.key(0))
  flops = jaxpr_flops(jax.make_jaxpr(step)(abstract, batch).jaxpr)
  if args.flops_only and jax.default_backend() == "cpu":
    cost = jax.jit(step).lower(abstract, batch).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    print(f"XLA cost analysis (CPU): {float(cost['flops']) / 1e12:.3f} TFLOP/step")
  n_params = unet.num_params(abstract.params)
  print(f"params {n_params / 1e6:.1f}M  model FLOPs/step {flops / 1e12:.3f} TFLOP "
        f"({flops / batch_size / 1e9:.1f} GFLOP/image)", flush=True)

  if args.flops_only:
    return
  peak_data = next((v for k, v in DATASHEET_BF16.items() if k in kind), None)
  peak_meas = matmul_peak() if jax.default_backend() == "gpu" else None
  if peak_meas:
    print(f"bf16 8192^3 matmul: {peak_meas / 1e12:.0f} TFLOP/s", flush=True)

  rows = []
  for name in args.variants.split(","):
    try:
      step, init = step_and_init(variant_ops(name, precision))
      state = jax.jit(init)(jax.random.key(0))
      t0 = time.perf_counter()
      fn = jax.jit(step, donate_argnums=(0,)).lower(state, batch).compile()
      compile_s = time.perf_counter() - t0
      print(f"{name}: {memory_report(fn, dev)}", flush=True)
      state, m = fn(state, batch)
      jax.block_until_ready(m)
      for _ in range(2):
        state, m = fn(state, batch)
      jax.block_until_ready(m)
      per_step = []
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
          state, m = fn(state, batch)
        jax.block_until_ready((state, m))
        per_step.append((time.perf_counter() - t0) / args.steps)
      s = statistics.median(per_step)
      loss = float(m["loss"])
      if not np.isfinite(loss):
        raise SystemExit(f"variant {name}: loss is {loss}")
      rows.append((name, s, compile_s, loss))
      if args.profile and name == "default":
        state = profile_step(fn, state, batch, args.profile)
      peak = (dev.memory_stats() or {}).get("peak_bytes_in_use")
      print(f"{name}: {s * 1e3:.1f} ms/step (spread {min(per_step) * 1e3:.1f}-{max(per_step) * 1e3:.1f}), "
            f"{batch_size / s:.0f} img/s, {flops / s / 1e12:.0f} TFLOP/s, compile {compile_s:.0f} s, "
            + (f"device peak {peak / 2**30:.1f} GiB, " if peak else "") + f"loss {loss:.4f}", flush=True)
      del state
    except Exception as e:  # noqa: BLE001 - report and go on to the next variant
      hint = (f" (out of device memory at batch {batch_size}: try --batch={batch_size // 2}, or a device "
              "with more memory)") if "RESOURCE_EXHAUSTED" in str(e) or "Out of memory" in str(e) else ""
      print(f"{name}: FAILED {type(e).__name__}{hint}: {str(e)[:400]}", flush=True)

  print("\nvariant            ms/step   img/s  TFLOP/s  MFU(datasheet)  MFU(measured matmul)")
  for name, s, _, _ in rows:
    rate = flops / s
    md = f"{rate / peak_data:.1%}" if peak_data else "n/a"
    mm = f"{rate / peak_meas:.1%}" if peak_meas else "n/a"
    print(f"{name:18s} {s * 1e3:8.1f} {batch_size / s:7.0f} {rate / 1e12:8.1f} {md:>15s} {mm:>21s}")


if __name__ == "__main__":
  main()
