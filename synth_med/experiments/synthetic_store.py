"""The synthetic data store: fair samples from the trained cascade, generated once per study.

`generate_fair(config, workdir)` loads the EMA weights of `base/` (and
`upsampler/`), draws the fair conditions (`diffusion.fair_sampler`) from the
labelled training data, and runs the resumable generation job into
`synthetic/<mode>/` for each of `generate.modes`. Every classifier seed and
method reads the same shards.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from synth_med.data.worlds import make_world
from synth_med.diffusion.fair_sampler import fair_conditions, known_values
from synth_med.diffusion.generator import CascadeGenerator, Generator
from synth_med.errors import SynthMedError
from synth_med.experiments import artifacts
from synth_med.experiments.diffusion import build_cond_spec, build_model, build_schedule, sampler_config
from synth_med.experiments.generation import run_generation
from synth_med.models import unet
from synth_med.train import sharding


def labelled_training_data(world: Any) -> dict[str, np.ndarray]:
  """Labels, label masks and properties of the labelled training split (metadata only; no rendering)."""
  split = world.split("train")
  if len(split) == 0:
    raise SynthMedError("the labelled training split is empty; raise data.train_size or relax data.skew.")
  meta = world.metadata(np.asarray(split.ids, np.int64))
  out = {"label": meta["label"].astype(np.float32), "label_mask": meta["label_mask"].astype(np.float32)}
  for a in world.spec.attributes:
    out[f"attrs/{a.name}"] = meta[f"attrs/{a.name}"].astype(np.int32)
  return out


def property_pool(world: Any, attribute: str, requested: tuple[int, ...] = ()) -> list[int]:
  """The values of `attribute` that fair sampling draws: every value seen in the labelled training split
  or the generator's unlabelled split (metadata only), or the `requested` ones, each of which must be
  among them (`fair_sampler.known_values`)."""
  arrays = []
  for name in ("train", "unlabelled"):
    ids = np.asarray(world.split(name).ids, np.int64)
    if len(ids):
      arrays.append(world.metadata(ids)[f"attrs/{attribute}"])
  spec = next((a for a in world.spec.attributes if a.name == attribute), None)
  names = tuple(spec.values) if spec is not None else ()
  return known_values(*arrays, requested=requested, value_names=names)


def load_generator(stage_cfg: Any, folder: str, spec: Any, mesh: Any, low_res: bool) -> tuple[Generator, int]:
  """A Generator with the EMA weights of the diffusion stage in `folder`."""
  if not artifacts.is_done(folder):
    raise SynthMedError(f"the diffusion stage in {folder!r} is not finished; run it first "
                        "(--config.stages=base,upsampler,...).")
  params, step = unet.load(folder)
  size = int(stage_cfg.data.image_size)
  gen = Generator(build_model(stage_cfg.model, spec.channels), params, build_schedule(stage_cfg),
                  build_cond_spec(stage_cfg, spec), sampler_config(stage_cfg), (size, size, spec.channels),
                  mesh, int(stage_cfg.sampler.batch_size), low_res=low_res,
                  name="upsampling" if low_res else "sampling")
  return gen, step


def generate_fair(config: Any, workdir: str) -> bool:
  """Generates every configured mode's store; returns True if all were already finished."""
  from synth_med.experiments.study import stage_config
  folders = {m: os.path.join(workdir, "synthetic", m) for m in config.generate.modes}
  if all(artifacts.is_done(f) for f in folders.values()):
    print("synthetic stores are finished; skipping", flush=True)
    return True
  base_cfg = stage_config(config, "base")
  world = make_world(base_cfg.data)
  spec = world.spec
  mesh = sharding.make_mesh(config.mesh)
  generator, step = load_generator(base_cfg, os.path.join(workdir, "base"), spec, mesh, low_res=False)
  if config.get("upsampler") is not None:
    up_cfg = stage_config(config, "upsampler")
    up, _ = load_generator(up_cfg, os.path.join(workdir, "upsampler"), spec, mesh, low_res=True)
    generator = CascadeGenerator(generator, up)
  attr = str(config.generate.attribute)
  names = tuple(a.name for a in spec.attributes)
  if attr not in names:
    raise SynthMedError(f"generate.attribute={attr!r}; the {spec.name} data have {list(names)}.")
  if "label_property" in folders and attr not in [a for a, _ in generator.cond_spec.attributes]:
    raise SynthMedError(f"label_property sampling needs a generator conditioned on {attr!r}; set "
                        f"base.diffusion.condition.attributes=('{attr}',) (and the upsampler's).")
  labelled = labelled_training_data(world)
  pool = property_pool(world, attr, tuple(int(v) for v in config.generate.get("property_values", ())))
  print(f"fair sampling draws {attr} uniformly over {[spec.attribute(attr).values[v] for v in pool]} "
        "(values seen in labelled or unlabelled training data)", flush=True)
  for i, (mode, folder) in enumerate(folders.items()):
    cond = fair_conditions(labelled, spec.label_kind, int(config.generate.num_images),
                           int(config.generate.seed) + i, mode, attr, names, draw_values=pool)
    print(f"generating {len(cond['label'])} images ({mode} conditioning) into {folder}", flush=True)
    run_generation(generator, cond, folder, int(config.generate.seed) + 101 * i,
                   int(config.generate.shard_size), step)
  return False
