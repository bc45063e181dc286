"""The diffusion stage: train the base model or the cascade upsampler, then show samples.

`run_diffusion(config, workdir)` trains through the one loop on labelled *and*
unlabelled data of the world (unlabelled domains from
`data.unlabelled_domains`), writes sample grids per (label, property) to PNG
and TensorBoard (also every `train.sample_every` steps), and, if
`generate.num_images > 0`, runs the resumable generation job into
`workdir/generated/`. A folder with DONE is skipped.
"""
from __future__ import annotations

import os
import time
from typing import Any, Mapping

import jax
import numpy as np

from synth_med.data.pipeline import ArraySource, TrainStream, WorldSource, materialise
from synth_med.data.schema import DatasetSpec, concat_batches
from synth_med.data.tables import save_vocabulary
from synth_med.data.sources import make_world
from synth_med.data.worlds.base import unlabelled_domains
from synth_med.diffusion import samplers
from synth_med.diffusion.conditioning import ConditioningSpec, condition_table, make_spec
from synth_med.diffusion.generator import Generator
from synth_med.diffusion.schedules import Schedule, make_schedule
from synth_med.diffusion.superres_preprocess import LowResAugment
from synth_med.diffusion.training import DiffusionTask
from synth_med.errors import SynthMedError
from synth_med.infra.image_grid import make_grid, save_png
from synth_med.infra import artifacts
from synth_med.experiments.generation import run_generation
from synth_med.models import unet
from synth_med.models.diffusion_unets import build_model
from synth_med.infra import sharding
from synth_med.train.loop import train
from synth_med.train.metric_writers import create_writer

def build_schedule(config: Any) -> Schedule:
  d = config.diffusion
  return make_schedule(d.schedule, int(d.num_steps), d.variance)


def build_cond_spec(config: Any, spec: DatasetSpec) -> ConditioningSpec:
  c = config.diffusion.condition
  return make_spec(spec, bool(c.label), tuple(c.attributes))


def sampler_config(config: Any) -> samplers.SamplerConfig:
  s = config.sampler
  return samplers.SamplerConfig(s.name, int(s.steps), float(s.eta), float(s.guidance), bool(s.clip_denoised),
                                float(s.start))


def low_res_augment(config: Any) -> LowResAugment | None:
  if config.model.name != "superres_unet":
    return None
  a = config.diffusion.low_res
  if config.data.image_size <= a.size:
    raise SynthMedError(f"the upsampler's diffusion.low_res.size={a.size} must be smaller than "
                        f"data.image_size={config.data.image_size}.")
  return LowResAugment(int(a.size), float(a.antialias_prob), float(a.noise_prob), float(a.noise_std),
                       float(a.blur_prob), float(a.blur_sigma_scale), int(a.blur_size))


def training_source(world: Any, config: Any) -> tuple[ArraySource, dict[str, int]]:
  """Labelled train split + unlabelled split (its label part is null), rendered once."""
  parts, counts = [], {}
  labelled = world.split("train")
  if len(labelled):
    parts.append(materialise(WorldSource(world, labelled), "labelled train split").arrays)
  counts["labelled"] = len(labelled)
  unl = world.split("unlabelled")  # the world decides which domains and how many (worlds.base.unlabelled_domains)
  if len(unl):
    parts.append(materialise(WorldSource(world, unl), "unlabelled split").arrays)
  counts["unlabelled"] = len(unl)
  if not parts:
    raise SynthMedError("the generator has no training data: the labelled split is empty and no "
                        "unlabelled data are configured; raise data.train_size or data.unlabelled_size.")
  return ArraySource(concat_batches(parts)), counts


def grid_conditions(spec: DatasetSpec, cond_spec: ConditioningSpec, labels: np.ndarray, max_rows: int,
                    per_cell: int) -> tuple[dict[str, np.ndarray], int, list[str]]:
  """Conditions for a sample grid: a row per label (most frequent first), a column block per value
  of the first conditioned property. Returns (conditions, number of columns, row names)."""
  k = spec.num_classes
  if spec.label_kind == "softmax":
    order = np.argsort(-labels.sum(0), kind="stable")[:max_rows]
    rows = [np.eye(k, dtype=np.float32)[c] for c in order]
    names = [spec.class_names[c] for c in order]
  elif spec.label_kind == "binary":
    rows, names = [np.zeros(1, np.float32), np.ones(1, np.float32)], ["negative", "positive"]
  else:
    rows = [np.zeros(k, np.float32)] + [np.eye(k, dtype=np.float32)[c] for c in range(k)]
    names = ["no finding"] + list(spec.class_names)
    rows, names = rows[:max_rows], names[:max_rows]
  attr = cond_spec.attributes[0] if cond_spec.attributes else None
  values = list(range(attr[1])) if attr else [-1]
  label_rows, attr_rows = [], []
  for r in rows:
    for v in values:
      label_rows += [r] * per_cell
      attr_rows += [v] * per_cell
  n = len(label_rows)
  attrs = {attr[0]: np.asarray(attr_rows)} if attr else None
  table = condition_table(cond_spec, n, np.stack(label_rows) if cond_spec.label_width else None, attrs)
  return table, len(values) * per_cell, names


def write_sample_grid(generator: Generator, spec: DatasetSpec, labels: np.ndarray, workdir: str, step: int,
                      writer: Any, grid_cfg: Any, low_res: np.ndarray | None = None) -> np.ndarray:
  """Samples the (label x property) grid, saves samples.png (the latest) and logs it at `step`."""
  cond, ncol, names = grid_conditions(spec, generator.cond_spec, labels, int(grid_cfg.max_rows),
                                      int(grid_cfg.per_cell))
  n = len(cond["label"])
  low = None if low_res is None else np.resize(low_res, (n,) + low_res.shape[1:])
  imgs = generator.generate(cond, n, seed=int(grid_cfg.seed), low_res=low)
  grid = make_grid(imgs, ncol=ncol)
  save_png(os.path.join(workdir, "samples.png"), grid)
  writer.write_images(step, {"samples": grid[None]})
  with open(os.path.join(workdir, "samples_rows.txt"), "w") as f:
    attr = generator.cond_spec.attributes[0][0] if generator.cond_spec.attributes else None
    f.write(f"rows: {names}\ncolumns: {'values of ' + attr if attr else 'samples'}\n")
  return imgs


def generation_conditions(labelled: Mapping[str, np.ndarray], cond_spec: ConditioningSpec, n: int,
                          seed: int) -> dict[str, np.ndarray]:
  """n conditions drawn (with replacement) from the labelled training examples: keeps the joint
  distribution of label and properties. (Fair sampling lives in the method stage.)"""
  rows = np.random.default_rng(seed).integers(0, len(labelled["label"]), n)
  attrs = {a: labelled[f"attrs/{a}"][rows] for a, _ in cond_spec.attributes}
  labels = labelled["label"][rows] if cond_spec.label_width else None
  return condition_table(cond_spec, n, labels, attrs)


def run_diffusion(config: Any, workdir: str) -> dict[str, Any]:
  """Trains one diffusion model (base or upsampler) in `workdir`; returns its metrics."""
  metrics_path = os.path.join(workdir, "metrics.json")
  done = artifacts.begin_stage(workdir, config, "diffusion stage")
  if done is not None:
    return done
  t0 = time.time()
  world = make_world(config.data)
  save_vocabulary(world, workdir)
  spec = world.spec
  unet.check_image_size(int(config.data.image_size), tuple(config.model.channel_mult))
  mesh = sharding.make_mesh(config.mesh)
  source, counts = training_source(world, config)
  print(f"generator data: {counts['labelled']} labelled + {counts['unlabelled']} unlabelled images "
        f"(unlabelled from {unlabelled_domains(config.data.unlabelled_domains, spec.domains)})", flush=True)
  stream = TrainStream(source, int(config.train.batch_size), seed=int(config.seed),
                       num_threads=int(config.data.num_threads))
  model = build_model(config.model, spec.channels)
  schedule = build_schedule(config)
  cond_spec = build_cond_spec(config, spec)
  low_aug = low_res_augment(config)
  task = DiffusionTask(model, schedule, cond_spec, float(config.diffusion.drop_prob), low_aug,
                       float(config.diffusion.min_snr_gamma), str(config.diffusion.prediction))
  size = int(config.data.image_size)
  labelled = {k: v[: counts["labelled"]] for k, v in source.arrays.items()}
  writer = create_writer(os.path.join(workdir, "tensorboard", "samples"), console=False)
  writer.write_images(0, {"train_examples": make_grid(source.fetch(np.arange(min(64, len(source))))["image"])[None]})
  low_val = None
  if low_aug is not None:  # super-resolve real (held-out) images for the grids
    val = materialise(WorldSource(world, world.split("val")), "val split")
    n_low = min(64, len(val))
    small = jax.image.resize(val.arrays["image"][:n_low].astype(np.float32),
                             (n_low, low_aug.low_size, low_aug.low_size, spec.channels), "linear",
                             antialias=True)
    low_val = np.asarray(np.clip(np.round(small), 0, 255), np.uint8)

  generators: list[Generator] = []  # built once; the hook and the final grid swap in new params

  def generator_for(params) -> Generator:
    if not generators:
      generators.append(Generator(model, params, schedule, cond_spec, sampler_config(config),
                                  (size, size, spec.channels), mesh, int(config.sampler.batch_size),
                                  low_res=low_aug is not None, prediction=str(config.diffusion.prediction)))
    generators[0].set_params(params)
    return generators[0]

  every = int(config.train.sample_every)

  def sample_hook(step: int, state) -> None:
    if every > 0 and step % every == 0 and step < int(config.train.steps):
      write_sample_grid(generator_for(state.ema_params), spec, labelled["label"], workdir, step, writer,
                        config.grid, low_val)

  result = train(task, config, stream, workdir, hooks=[sample_hook], mesh=mesh)
  t_train = time.time() - t0
  params = jax.device_get(result.state.ema_params)
  generator = generator_for(params)
  steps = int(config.train.steps)
  t1 = time.time()
  write_sample_grid(generator, spec, labelled["label"], workdir, steps, writer, config.grid, low_val)
  metrics: dict[str, Any] = {"world": spec.name, "model": config.model.name, "params": unet.num_params(params),
                             "steps": steps, "data": counts, "conditioning": list(cond_spec.part_names),
                             "wall_time_s": {"train": t_train, "grid": time.time() - t1}}
  n_gen = int(config.generate.num_images)
  if n_gen > 0:
    if low_aug is not None:
      raise SynthMedError("generate.num_images > 0 needs a base model; the upsampler generates inside a "
                          "cascade (see synth_med.diffusion.generator.CascadeGenerator).")
    cond = generation_conditions(labelled, cond_spec, n_gen, int(config.generate.seed))
    t2 = time.time()
    run_generation(generator, cond, os.path.join(workdir, "generated"), int(config.generate.seed),
                   int(config.generate.shard_size), steps)
    metrics["wall_time_s"]["generate"] = time.time() - t2
  writer.flush()
  metrics["wall_time_s"]["total"] = time.time() - t0
  artifacts.write_json(metrics_path, metrics)
  artifacts.mark_done(workdir)
  print(f"wrote {os.path.join(workdir, 'samples.png')} and {metrics_path} "
        f"({metrics['wall_time_s']['total']:.0f} s)", flush=True)
  return metrics
