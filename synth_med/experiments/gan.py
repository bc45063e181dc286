"""The GAN stage (paper 001's cpD-GAN or prog-GAN): train on the labelled training split through the one
loop, stop early on FID, keep the best generator.

`run_gan(config, workdir, embed)` trains `config.model.name` in `workdir`; every `fid.every_images`
images it generates `fid.images` images for the training labels (fixed noise), embeds them with `embed`
(the study's real-data classifier; without one, fixed image statistics) and computes FID against the
real training images. The best generator so far is saved under `best/`; training stops after
`fid.patience` evaluations without improvement once `fid.min_images` images were seen (001: every 400K
images, 10k images per FID, at least 7M images). A sample grid goes to samples.png and TensorBoard at
every FID evaluation. A folder with DONE is skipped; a killed run resumes (checkpoints and the FID
history in fid.json).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from synth_med.analysis.distributions import frechet_distance
from synth_med.data.pipeline import TrainStream, WorldSource, materialise
from synth_med.data.sources import make_world
from synth_med.errors import SynthMedError
from synth_med.evaluation.condition_fidelity import image_features
from synth_med.infra import artifacts, sharding
from synth_med.infra.checkpoint import Checkpointer, read_checkpoint
from synth_med.infra.image_grid import make_grid, save_png
from synth_med.models import cpd_gan, prog_gan
from synth_med.objectives.gan import GANTask, to_uint8
from synth_med.train.early_stopping import EarlyStopping
from synth_med.train.loop import StopTraining, train
from synth_med.train.metric_writers import create_writer

GANS = {"cpd_gan": cpd_gan.Model, "prog_gan": prog_gan.Model}
FID_FILE = "fid.json"
Embed = Callable[[np.ndarray], np.ndarray]  # uint8 images [N, H, W, C] -> features [N, d]


def build_gan(model_cfg: Any, image_size: int, channels: int, num_classes: int) -> Any:
  """The cpD-GAN or prog-GAN named by model.name."""
  if model_cfg.name not in GANS:
    raise SynthMedError(f"model.name={model_cfg.name!r}; choose one of {list(GANS)}.")
  return GANS[model_cfg.name](image_size, channels, num_classes, z_dim=int(model_cfg.z_dim),
                              base_channels=int(model_cfg.base_channels), max_channels=int(model_cfg.max_channels),
                              start_size=int(model_cfg.get("start_size", 8)))


def build_task(config: Any, model: Any, label_kind: str) -> GANTask:
  g = config.gan
  phase = -(-int(g.phase_images) // int(config.train.batch_size))
  return GANTask(model, label_kind, float(g.gp_weight), float(g.drift), float(g.ac_weight), phase)


class GANGenerator:
  """`generate(conditions, n, seed, start_index)` for the generation job: image k of a job draws its noise
  from (seed, k) alone, so a resumed job writes the same images."""

  def __init__(self, task: GANTask, generator_params: Any, batch_size: int = 256):
    self.task, self.params, self.batch_size = task, generator_params, int(batch_size)
    m = task.model
    self.image_shape = (m.image_size, m.image_size, m.channels)
    self._fn = jax.jit(lambda p, z, y: to_uint8(task.generate(p, z, y)))

  def noise(self, seed: int, index: np.ndarray) -> jax.Array:
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.asarray(index, jnp.uint32))
    return jax.vmap(lambda k: jax.random.normal(k, (self.task.model.z_dim,)))(keys)

  def generate(self, conditions: Mapping[str, np.ndarray], n: int | None = None, seed: int = 0,
               start_index: int = 0) -> np.ndarray:
    label = np.asarray(conditions["label"], np.float32)
    mask = np.asarray(conditions.get("label_mask", np.ones_like(label)), np.float32)
    y = label * mask
    n = len(y) if n is None else int(n)
    out = []
    for lo in range(0, n, self.batch_size):
      hi = min(lo + self.batch_size, n)
      pad = self.batch_size - (hi - lo)  # one compiled shape
      idx = np.arange(start_index + lo, start_index + hi + pad)
      yb = np.concatenate([y[lo:hi], np.repeat(y[hi - 1:hi], pad, 0)]) if pad else y[lo:hi]
      out.append(np.asarray(self._fn(self.params, self.noise(seed, idx), jnp.asarray(yb)))[: hi - lo])
    return np.concatenate(out) if out else np.zeros((0,) + self.image_shape, np.uint8)


def load_generator(config: Any, workdir: str, spec: Any) -> tuple[GANGenerator, int]:
  """The best (lowest FID) generator of a finished GAN stage, or its last EMA generator when FID was off."""
  if not artifacts.is_done(workdir):
    raise SynthMedError(f"the GAN stage in {workdir!r} is not finished; run it first.")
  model = build_gan(config.model, int(config.data.image_size), spec.channels, spec.num_classes)
  task = build_task(config, model, spec.label_kind)
  best = os.path.join(workdir, "best")
  tree, step = read_checkpoint(best if os.path.isdir(best) else os.path.join(workdir, "checkpoints"))
  return GANGenerator(task, tree["ema_params"]["generator"]), step


def default_embed(images: np.ndarray) -> np.ndarray:
  """Without a classifier: colour, layout and edge statistics (`condition_fidelity.image_features`)."""
  return image_features(images)


def run_gan(config: Any, workdir: str, embed: Embed | None = None) -> dict[str, Any]:
  """Trains one GAN in `workdir`; returns its metrics (metrics.json)."""
  done = artifacts.begin_stage(workdir, config, "GAN stage")
  if done is not None:
    return done
  t0 = time.time()
  world = make_world(config.data)
  spec = world.spec
  mesh = sharding.make_mesh(config.mesh)
  train_split = world.split("train")
  if len(train_split) == 0:
    raise SynthMedError("the GAN's training split is empty; raise data.train_size.")
  source = materialise(WorldSource(world, train_split), "labelled train split")
  bs = int(config.train.batch_size)
  stream = TrainStream(source, bs, seed=int(config.seed), num_threads=int(config.data.num_threads))
  model = build_gan(config.model, int(config.data.image_size), spec.channels, spec.num_classes)
  task = build_task(config, model, spec.label_kind)
  embed = embed or default_embed
  fcfg = config.fid
  every = -(-int(fcfg.every_images) // bs) if int(fcfg.every_images) > 0 else 0
  min_steps = -(-int(fcfg.min_images) // bs)
  real = source.arrays
  n_fid = min(int(fcfg.images), len(real["image"])) if every else 0
  real_features = embed(real["image"][:n_fid]) if every else None
  cond = {"label": real["label"][:n_fid], "label_mask": real["label_mask"][:n_fid]}
  fid_path = os.path.join(workdir, FID_FILE)
  history = artifacts.read_json(fid_path)["history"] if os.path.exists(fid_path) else []
  stopper = EarlyStopping.from_history(int(fcfg.patience), min_steps, history)
  best = Checkpointer(os.path.join(workdir, "best"), 1)
  writer = create_writer(os.path.join(workdir, "tensorboard", "samples"), console=False)
  grid_y = np.repeat(np.asarray(grid_labels(spec, real["label"])), 8, axis=0)
  gen = GANGenerator(task, None)  # one jitted sampler; each evaluation swaps in the current parameters

  def write_grid(step: int) -> None:
    grid = make_grid(gen.generate({"label": grid_y}, seed=99), ncol=8)
    save_png(os.path.join(workdir, "samples.png"), grid)
    writer.write_images(step, {"samples": grid[None]})

  def fid_hook(step: int, state: Any) -> None:
    if not every or step % every or any(s == step for s, _ in stopper.history):
      return
    gen.params = jax.device_get(state.ema_params["generator"])
    fid = frechet_distance(real_features, embed(gen.generate(cond, n_fid, seed=1234)))
    stop = stopper.update(step, fid)
    writer.write_scalars(step, {"fid": fid})
    write_grid(step)
    if stopper.improved:
      best.save(step, {"ema_params": state.ema_params})
      best.wait()
    artifacts.write_json(fid_path, {"history": stopper.history, "best_step": stopper.best_step,
                                    "images_per_fid": n_fid, "every_steps": every, "min_steps": min_steps})
    print(f"FID at step {step} ({step * bs:,} images): {fid:.2f} (best {stopper.best_value:.2f} at step "
          f"{stopper.best_step})", flush=True)
    if stop:
      raise StopTraining(f"FID did not improve for {stopper.patience} evaluations (best at step {stopper.best_step})")

  result = train(task, config, stream, workdir, hooks=[fid_hook], mesh=mesh)
  best.close()
  params = jax.device_get(result.state.ema_params["generator"])
  if every and stopper.best_step > 0:
    tree, _ = read_checkpoint(os.path.join(workdir, "best"))
    params = tree["ema_params"]["generator"]
  gen.params = params
  write_grid(int(result.state.step))
  writer.flush()
  metrics = {"world": spec.name, "model": str(config.model.name), "steps": int(result.state.step),
             "images_seen": int(result.state.step) * bs, "train_examples": len(train_split),
             "fid": {"history": stopper.history, "best_step": stopper.best_step,
                     "best": None if stopper.best_step < 0 else stopper.best_value,
                     "stopped_early": int(result.state.step) < int(config.train.steps)},
             "params": int(sum(x.size for x in jax.tree.leaves(params))),
             "wall_time_s": time.time() - t0}
  artifacts.write_json(os.path.join(workdir, "metrics.json"), metrics)
  artifacts.mark_done(workdir)
  print(f"GAN stage finished in {metrics['wall_time_s']:.0f} s ({metrics['steps']} steps)", flush=True)
  return metrics


def grid_labels(spec: Any, labels: np.ndarray, rows: int = 8) -> np.ndarray:
  """Label rows of the sample grid: the most frequent label vectors of the training data."""
  keys, counts = np.unique((np.asarray(labels) > 0.5).astype(np.float32), axis=0, return_counts=True)
  return keys[np.argsort(-counts, kind="stable")[:rows]]
