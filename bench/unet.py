"""Benchmark: our Flax UNet vs HF diffusers' PyTorch UNet2DModel at a matched config, same CPU.

Measures, for each size (about 1M and 9M parameters, 32 px, batch 16):
  train   img/s of one optimisation step (forward, backward, Adam; ours also EMA,
          as the training loop does),
  step    img/s of one denoising forward pass,
  ddim50  img/s of a full 50-step DDIM sample.
The last line reads `unet vs diffusers: train X.XXx, sample Y.YYx` (ours over
theirs; the geometric mean over sizes; sample = full DDIM-50).

Needs `pip install -r bench/requirements.txt` (torch CPU build, diffusers).
  python bench/unet.py [--sizes 1M,9M] [--batch 16] [--repeats 5] [--rounds 3]
                       [--precision float32|bfloat16] [--diffusers-precision float32|bfloat16]
By default both sides compute in float32. `--precision bfloat16` gives ours bfloat16 products with
float32 sums (the model's matmul_precision) and theirs torch.autocast(bfloat16): PyTorch's own
mixed precision, the matched comparison; `--diffusers-precision float32` times that mode of ours
against their float32 instead.
Both sides are built and compiled first; then each round times ours, then theirs, at every
size, and a size's ratio is the median of its rounds' ratios.
"""
from __future__ import annotations

import argparse
import os
import time


import numpy as np  # noqa: E402

SIZES = {
    # name: (model_channels, channel_mult, num_res_blocks, attention downsample factors, head channels)
    "1M": (32, (1, 2, 2), 1, (2,), 32),
    "9M": (64, (1, 2, 2, 2), 2, (2,), 64),
}


def _timeit(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def measure(side: dict, batch: int, repeats: int) -> dict[str, float]:
  """img/s of each of a side's runners (best of `repeats`; DDIM-50 best of half as many)."""
  out = {"params": side["params"]}
  for name, fn in side["runners"].items():
    out[name] = batch / _timeit(fn, max(1, repeats // 2) if name == "ddim50" else repeats)
  return out


def _warm(params: int, runners: dict) -> dict:
  for fn in runners.values():
    fn()  # compile / first-call allocations, outside every timing
  return {"params": params, "runners": runners}


def build_ours(size: str, batch: int, res: int, precision: str = "float32") -> dict:
  """Our train step, denoising step and DDIM-50 sampler at `size`, compiled and warm.

  precision 'bfloat16' is the model's matmul_precision: bfloat16 products, float32 sums."""
  import jax
  import jax.numpy as jnp
  import optax

  from synth_med.diffusion import samplers
  from synth_med.diffusion.conditioning import ConditioningSpec
  from synth_med.diffusion.generator import model_apply
  from synth_med.diffusion.schedules import make_schedule
  from synth_med.diffusion.training import DiffusionTask
  from synth_med.models import unet
  from synth_med.ops import cpu_ops
  from synth_med.train import state as state_lib
  from synth_med.train.step import make_train_step

  ch, mult, nrb, attn, head = SIZES[size]
  model = unet.Model(out_channels=3, model_channels=ch, channel_mult=mult, num_res_blocks=nrb,
                     attention_resolutions=attn, num_head_channels=head, use_scale_shift_norm=True,
                     ops=cpu_ops(precision))
  sched = make_schedule("linear", 1000)
  spec = ConditioningSpec("softmax", 0)
  task = DiffusionTask(model, sched, spec, 0.0)
  batch_np = {"image": np.random.RandomState(0).randint(0, 256, (batch, res, res, 3)).astype(np.uint8),
              "label": np.zeros((batch, 1), np.float32), "labelled": np.zeros(batch, bool)}
  # The batch is split over every XLA device (one per core by default, --cpu-devices), as the loop does.
  from synth_med.infra import sharding
  mesh = sharding.make_mesh({"data": -1})
  data, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  b = jax.device_put(batch_np, data)
  params = jax.jit(task.init, out_shardings=rep)(jax.random.key(0), b)
  n_params = unet.num_params(params)
  tx = optax.adam(1e-4)
  # a copy of the parameters: the step donates its state, and `params` also serves the sampling runners
  state = jax.device_put(state_lib.create(jax.tree.map(jnp.copy, params), tx, jax.random.key(1)), rep)

  # The loop's own step (loss, grads, Adam, EMA), its state donated as the loop donates it.
  train_step = jax.jit(make_train_step(task, tx, lambda _: 1e-4, 0.999), donate_argnums=(0,))

  holder = [state]

  def run_train():
    holder[0], metrics = train_step(holder[0], b)
    metrics["loss"].block_until_ready()

  apply = model_apply(model)
  x = jax.device_put(np.random.RandomState(1).randn(batch, res, res, 3).astype(np.float32), data)
  t = jax.device_put(np.full((batch,), 500, np.int32), data)
  cond = jax.device_put(np.zeros((batch, 0), np.float32), data)
  fwd = jax.jit(lambda p, x, t, cond: apply(p, x, t, cond, None))
  cfg = samplers.SamplerConfig("ddim", 50, 0.0, 0.0, True)
  sample = jax.jit(lambda p, idx, cond: samplers.sample_loop(apply, sched, cfg, p, samplers.image_keys(0, idx),
                                                             cond, None, None, (res, res, 3)))
  idx = jax.device_put(np.arange(batch, dtype=np.int32), data)
  return _warm(n_params, {"train": run_train,
                          "step": lambda: fwd(params, x, t, cond).block_until_ready(),
                          "ddim50": lambda: sample(params, idx, cond).block_until_ready()})


def build_diffusers(size: str, batch: int, res: int, precision: str = "float32") -> dict:
  """diffusers' UNet2DModel train step, denoising step and DDIM-50 loop at `size`, warm.

  precision 'bfloat16' runs the forward passes under torch.autocast(bfloat16) (PyTorch's mixed
  precision: matmuls and convolutions on bfloat16 operands through oneDNN, AMX where the CPU has
  it); the parameters, the optimiser and the backward's accumulation stay float32."""
  import contextlib

  import torch
  from diffusers import DDIMScheduler, UNet2DModel

  def autocast():
    if precision == "bfloat16":
      return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()

  torch.manual_seed(0)
  ch, mult, nrb, attn, head = SIZES[size]
  levels = [2 ** i for i in range(len(mult))]  # downsample factor of each level
  down = tuple("AttnDownBlock2D" if ds in attn else "DownBlock2D" for ds in levels)
  up = tuple("AttnUpBlock2D" if ds in attn else "UpBlock2D" for ds in reversed(levels))
  model = UNet2DModel(sample_size=res, in_channels=3, out_channels=3, layers_per_block=nrb,
                      block_out_channels=tuple(ch * m for m in mult), down_block_types=down,
                      up_block_types=up, attention_head_dim=head, norm_num_groups=max(1, min(32, ch // 4)),
                      resnet_time_scale_shift="scale_shift", add_attention=True)
  n_params = sum(p.numel() for p in model.parameters())
  opt = torch.optim.Adam(model.parameters(), lr=1e-4)
  x0 = torch.randn(batch, 3, res, res)

  x = torch.randn(batch, 3, res, res)
  t = torch.full((batch,), 500)
  sched = DDIMScheduler(num_train_timesteps=1000)

  def run_train():
    model.train()
    tt = torch.randint(0, 1000, (batch,))
    noise = torch.randn_like(x0)
    with autocast():
      pred = model(x0 + noise, tt).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  def run_step():
    model.eval()
    with torch.inference_mode(), autocast():
      return model(x, t).sample

  def run_sample():
    model.eval()
    with torch.inference_mode():
      sched.set_timesteps(50)
      s = torch.randn(batch, 3, res, res)
      for tt in sched.timesteps:
        with autocast():
          eps = model(s, tt).sample
        s = sched.step(eps.float(), tt, s).prev_sample
    return s

  return _warm(n_params, {"train": run_train, "step": run_step, "ddim50": run_sample})


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--sizes", default="1M,9M")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--res", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--rounds", type=int, default=3,
                  help="time ours then theirs this many times over; ratios are the median of the rounds "
                       "(this shared machine drifts by 10-30 %% between minutes)")
  ap.add_argument("--only", choices=("both", "ours", "diffusers"), default="both")
  ap.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                  help="ours: the UNet's matmul_precision (bfloat16 products of its convolutions and "
                       "per-pixel dense layers, float32 sums; AMX kernels where the CPU has them)")
  ap.add_argument("--diffusers-precision", choices=("float32", "bfloat16"), default=None,
                  help="theirs: bfloat16 runs the forward passes under torch.autocast (default: as --precision)")
  ap.add_argument("--cpu-devices", type=int, default=0,
                  help="as the config key cpu_devices: split the CPU into this many XLA devices and "
                       "shard the batch over them (0: one single-threaded device per core, the "
                       "project's default; 1: one multi-threaded device)")
  ap.add_argument("--no-huge-pages", action="store_true",
                  help="keep glibc's default 4 KiB pages for large buffers (both sides); by default the "
                       "process restarts with glibc.malloc.hugetlb=1 as launch/main.py does")
  args = ap.parse_args()
  if not args.no_huge_pages:
    from synth_med.train.host_memory import reexec_with_huge_pages
    reexec_with_huge_pages()
  from synth_med.train.host_devices import configure_host_devices
  configure_host_devices(args.cpu_devices)
  import jax
  print(f"jax {jax.__version__} on {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{os.cpu_count()} CPUs, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}", flush=True)
  theirs_precision = args.diffusers_precision or args.precision
  from synth_med.ops.cpu_native import kernels
  amx = "" if args.precision == "float32" else (
      " (AMX kernels)" if kernels.amx_available() else " (no AMX here: float32 kernels on rounded operands)")
  print(f"precision: ours {args.precision}{amx}, diffusers {theirs_precision}"
        f"{' (torch.autocast)' if theirs_precision == 'bfloat16' else ''}", flush=True)
  precision = {"ours": args.precision, "diffusers": theirs_precision}
  sizes = args.sizes.split(",")
  built = {size: {name: build(size, args.batch, args.res, precision[name])
                  for name, build in (("ours", build_ours), ("diffusers", build_diffusers))
                  if args.only in ("both", name)} for size in sizes}
  # Each round times ours, then theirs, on an otherwise idle CPU (a second's pause lets each side's
  # spinning threads go to sleep first); the rounds repeat that, so both sides see the same drift.
  runs = {size: {name: [] for name in built[size]} for size in sizes}
  for rnd in range(args.rounds):
    for size in sizes:
      for name, side in built[size].items():
        time.sleep(1.0)
        r = measure(side, args.batch, args.repeats)
        runs[size][name].append(r)
        print(f"[{size}] {name:9s} params {r['params']:>9,d}  train {r['train']:7.1f} img/s  "
              f"step {r['step']:7.1f} img/s  ddim50 {r['ddim50']:6.2f} img/s  (round {rnd + 1})", flush=True)
  if args.only != "both":
    return
  ratios = {"train": [], "ddim50": []}
  for size in sizes:
    ours, theirs = runs[size]["ours"], runs[size]["diffusers"]
    per_round = {k: [o[k] / t[k] for o, t in zip(ours, theirs)] for k in ("train", "step", "ddim50")}
    med = {k: float(np.median(v)) for k, v in per_round.items()}
    spread = "" if args.rounds == 1 else "  (rounds: " + "; ".join(
        f"{k} " + " ".join(f"{v:.2f}" for v in per_round[k]) for k in ("train", "ddim50")) + ")"
    print(f"[{size}] params ours/theirs {ours[0]['params'] / theirs[0]['params']:.3f}; ratios"
          f"{' (median of rounds)' if args.rounds > 1 else ''}: train {med['train']:.2f}x, "
          f"step {med['step']:.2f}x, ddim50 {med['ddim50']:.2f}x{spread}", flush=True)
    for k in ratios:
      ratios[k].append(med[k])
  g = lambda v: float(np.exp(np.mean(np.log(v))))  # noqa: E731
  print(f"unet vs diffusers: train {g(ratios['train']):.2f}x, sample {g(ratios['ddim50']):.2f}x")

if __name__ == "__main__":
  main()
