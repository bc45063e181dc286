"""Benchmark: our Flax UNet vs HF diffusers' PyTorch UNet2DModel at a matched config, same CPU.

Measures, for each size (about 1M and 9M parameters, 32 px, batch 16):
  train   img/s of one optimisation step (forward, backward, Adam; ours also EMA,
          as the training loop does),
  step    img/s of one denoising forward pass,
  ddim50  img/s of a full 50-step DDIM sample.
The last line reads `unet vs diffusers: train X.XXx, sample Y.YYx` (ours over
theirs; the geometric mean over sizes; sample = full DDIM-50).

Needs `pip install -r bench/requirements.txt` (torch CPU build, diffusers).
  python bench/unet.py [--sizes 1M,9M] [--batch 16] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

SIZES = {
    # name: (model_channels, channel_mult, num_res_blocks, attention downsample factors, head channels)
    "1M": (32, (1, 2, 2), 1, (2,), 32),
    "9M": (64, (1, 2, 2, 2), 2, (2,), 64),
}


def _timeit(fn, repeats: int) -> float:
  fn()  # warm-up / compile
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def bench_ours(size: str, batch: int, res: int, repeats: int) -> dict[str, float]:
  import jax
  import optax

  from synth_med.diffusion import samplers
  from synth_med.diffusion.conditioning import ConditioningSpec
  from synth_med.diffusion.generator import model_apply
  from synth_med.diffusion.schedules import make_schedule
  from synth_med.diffusion.training import DiffusionTask
  from synth_med.models import unet
  from synth_med.train import state as state_lib
  from synth_med.train.step import make_train_step

  ch, mult, nrb, attn, head = SIZES[size]
  model = unet.Model(out_channels=3, model_channels=ch, channel_mult=mult, num_res_blocks=nrb,
                     attention_resolutions=attn, num_head_channels=head, use_scale_shift_norm=True)
  sched = make_schedule("linear", 1000)
  spec = ConditioningSpec("softmax", 0)
  task = DiffusionTask(model, sched, spec, 0.0)
  batch_np = {"image": np.random.RandomState(0).randint(0, 256, (batch, res, res, 3)).astype(np.uint8),
              "label": np.zeros((batch, 1), np.float32), "labelled": np.zeros(batch, bool)}
  # The batch is split over every XLA device (one per core by default, --cpu-devices), as the loop does.
  from synth_med.train import sharding
  mesh = sharding.make_mesh({"data": -1})
  data, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  b = jax.device_put(batch_np, data)
  params = jax.jit(task.init, out_shardings=rep)(jax.random.key(0), b)
  n_params = unet.num_params(params)
  tx = optax.adam(1e-4)
  state = jax.device_put(state_lib.create(params, tx, jax.random.key(1)), rep)

  # The loop's own step (loss, grads, Adam, EMA).
  train_step = jax.jit(make_train_step(task, tx, lambda _: 1e-4, 0.999))

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
  return {"params": n_params,
          "train": batch / _timeit(run_train, repeats),
          "step": batch / _timeit(lambda: fwd(params, x, t, cond).block_until_ready(), repeats),
          "ddim50": batch / _timeit(lambda: sample(params, idx, cond).block_until_ready(), max(1, repeats // 2))}


def bench_diffusers(size: str, batch: int, res: int, repeats: int) -> dict[str, float]:
  import torch
  from diffusers import DDIMScheduler, UNet2DModel

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

  def run_train():
    t = torch.randint(0, 1000, (batch,))
    noise = torch.randn_like(x0)
    pred = model(x0 + noise, t).sample
    loss = torch.nn.functional.mse_loss(pred, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  model.train()
  train = batch / _timeit(run_train, repeats)
  model.eval()
  x = torch.randn(batch, 3, res, res)
  t = torch.full((batch,), 500)
  sched = DDIMScheduler(num_train_timesteps=1000)

  def run_sample():
    sched.set_timesteps(50)
    s = torch.randn(batch, 3, res, res)
    for tt in sched.timesteps:
      s = sched.step(model(s, tt).sample, tt, s).prev_sample
    return s

  with torch.inference_mode():
    step = batch / _timeit(lambda: model(x, t).sample, repeats)
    ddim = batch / _timeit(run_sample, max(1, repeats // 2))
  return {"params": n_params, "train": train, "step": step, "ddim50": ddim}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--sizes", default="1M,9M")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--res", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--only", choices=("both", "ours", "diffusers"), default="both")
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
  ratios = {"train": [], "ddim50": []}
  for size in args.sizes.split(","):
    ours = bench_ours(size, args.batch, args.res, args.repeats) if args.only != "diffusers" else None
    theirs = bench_diffusers(size, args.batch, args.res, args.repeats) if args.only != "ours" else None
    for name, r in (("ours", ours), ("diffusers", theirs)):
      if r:
        print(f"[{size}] {name:9s} params {r['params']:>9,d}  train {r['train']:7.1f} img/s  "
              f"step {r['step']:7.1f} img/s  ddim50 {r['ddim50']:6.2f} img/s", flush=True)
    if ours and theirs:
      print(f"[{size}] params ours/theirs {ours['params'] / theirs['params']:.3f}; ratios: train "
            f"{ours['train'] / theirs['train']:.2f}x, step {ours['step'] / theirs['step']:.2f}x, ddim50 "
            f"{ours['ddim50'] / theirs['ddim50']:.2f}x", flush=True)
      for k in ratios:
        ratios[k].append(ours[k] / theirs[k])
  if ratios["train"]:
    g = lambda v: float(np.exp(np.mean(np.log(v))))  # noqa: E731
    print(f"unet vs diffusers: train {g(ratios['train']):.2f}x, sample {g(ratios['ddim50']):.2f}x")


if __name__ == "__main__":
  main()
