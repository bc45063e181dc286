"""Does the base generator render what it is asked? Fidelity against base steps, width and guidance.

Trains the `derm_cascade` study's base diffusion model (or a variant) and
samples the study's fair conditions (label + property, and label only) at each
guidance scale w, then scores the samples with the study's probe
(`evaluation.condition_fidelity`): label agreement and the rate at which each
requested property value comes out as requested, next to real held-out images
at the same resolution. Prints one line per (variant, w); asserts nothing.

    python bench/generator_fidelity.py --workdir=/tmp/fid --steps=1000,2000 --channels=32,64 \
        --guidance=0,1,3 --num_images=500

Each (steps, channels) model trains once in <workdir>/s<steps>_c<channels>/ and is
reused by later runs (the stage is resumable and skips a finished model).
"""
from __future__ import annotations

import argparse
import json
import os
import time



def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--config", default="configs/derm_cascade.py", help="a study config file")
  p.add_argument("--config_arg", default="")
  p.add_argument("--steps", default="1000", help="comma list of base training steps")
  p.add_argument("--channels", default="32", help="comma list of base model_channels")
  p.add_argument("--guidance", default="0,1,3", help="comma list of CFG w")
  p.add_argument("--sampler_steps", type=int, default=0, help="> 0 overrides the base sampler's steps")
  p.add_argument("--num_images", type=int, default=500, help="per mode")
  p.add_argument("--set", action="append", default=[], help="KEY=VALUE overrides of the base stage config "
                 "(python literal), e.g. --set=diffusion.min_snr_gamma=0.0")
  args = p.parse_args()

  from synth_med.experiments.cli import enable_compilation_cache, load_config_file
  from synth_med.train.host_devices import configure_host_devices
  config = load_config_file(f"{args.config}:{args.config_arg}" if args.config_arg else args.config)
  configure_host_devices(int(config.cpu_devices))
  enable_compilation_cache()

  import ast

  import numpy as np

  from synth_med.data.pipeline import WorldSource, materialise
  from synth_med.data.schema import concat_batches
  from synth_med.data.sources import make_world
  from synth_med.diffusion.fair_sampler import fair_conditions
  from synth_med.evaluation.condition_fidelity import fidelity, fit_probes
  from synth_med.experiments.diffusion import run_diffusion
  from synth_med.experiments.study import stage_config
  from synth_med.experiments.synthetic_store import labelled_training_data, load_generator, property_pool
  from synth_med.experiments.tuning import apply_overrides
  from synth_med.infra import sharding

  attr = str(config.generate.attribute)
  base_cfg = stage_config(config, "base")
  world = make_world(base_cfg.data)
  real = concat_batches([materialise(WorldSource(world, world.split(s)), s).arrays for s in ("val", "id")])
  probes = fit_probes(real, attr, 0)
  print(f"real held-out at {base_cfg.data.image_size} px: label {probes['label']['real_heldout']:.3f} "
        f"(majority {probes['label']['majority_baseline']:.3f}), {attr} {probes[attr]['real_heldout']:.3f}",
        flush=True)
  names = tuple(a.name for a in world.spec.attributes)
  labelled = labelled_training_data(world)
  pool = property_pool(world, attr)
  mesh = sharding.make_mesh(config.mesh)
  for steps in [int(s) for s in args.steps.split(",")]:
    for ch in [int(c) for c in args.channels.split(",")]:
      cfg = stage_config(config, "base")
      with cfg.unlocked():
        cfg.train.steps = steps
        cfg.train.checkpoint_every = steps
        cfg.model.model_channels = ch
        if args.sampler_steps:
          cfg.sampler.steps = args.sampler_steps
        apply_overrides(cfg, {k: ast.literal_eval(v) for k, v in (kv.split("=", 1) for kv in args.set)})
      tag = f"s{steps}_c{ch}" + "".join(f"_{kv}" for kv in args.set).replace("/", "-")
      folder = os.path.join(args.workdir, tag)
      t0 = time.time()
      run_diffusion(cfg, folder)
      t_train = json.load(open(os.path.join(folder, "metrics.json")))["wall_time_s"]["train"]
      gen, _ = load_generator(cfg, folder, world.spec, mesh, low_res=False)
      for w in [float(g) for g in args.guidance.split(",")]:
        row = {"steps": steps, "channels": ch, "guidance": w, "train_s": round(t_train, 1)}
        for i, mode in enumerate(("label_property", "label")):
          cond = fair_conditions(labelled, world.spec.label_kind, args.num_images, 7 + i, mode, attr, names,
                                 draw_values=pool)
          t1 = time.time()
          imgs = gen.generate(cond, seed=11 + i, guidance=w)
          row[f"{mode}_sample_s"] = round(time.time() - t1, 1)
          fid = fidelity(probes, {**cond, "image": imgs}, attr)
          row[f"{mode}_label"] = round(fid["label"]["synthetic_as_requested"], 3)
          if mode == "label_property":
            row[f"{attr}_per_value"] = {k: round(v, 3) for k, v in fid[attr]["synthetic_per_value"].items()}
        print(json.dumps(row), flush=True)
      print(f"({tag}: {time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
  main()
