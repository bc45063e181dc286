"""The one training loop: every model plugs in as a `Task`.

A task supplies pure functions; the loop owns the rest: the mesh and shardings
(regex rules from the config), the optax optimizer, EMA, the jitted and donated
train step, orbax checkpoints with automatic resume, clu metric writers,
progress with ETA, periodic hooks (evaluation) and the NaN guard.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from synth_med.data.pipeline import TrainStream
from synth_med.errors import SynthMedError
from synth_med.infra.artifacts import ensure_writable_dir
from synth_med.infra import checkpoint as ckpt_lib
from synth_med.infra import sharding
from synth_med.train import jit_cache, state as state_lib
from synth_med.train.metric_writers import create_writer, periodic_actions
from synth_med.train.optimizers import make_optimizer
from synth_med.infra.progress import Progress
from synth_med.train.step import make_train_step

TrainState = state_lib.TrainState


class Task(Protocol):
  """What a model supplies to the loop."""

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> Any:
    """Fresh parameters (traced under jit; shapes come from `batch`)."""

  def loss(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array
           ) -> tuple[jax.Array, Mapping[str, jax.Array]]:
    """Scalar loss and scalar metrics for one global batch."""

  # Optional: `param_groups` {top-level parameter key: train.<optimizer key>} gives each part its own
  # optimizer (a GAN's generator and critic); `needs_step` puts the step number in the batch ('step');
  # `init_statistics(batch)` gives the task running statistics in the train state (see train.step).


class StopTraining(Exception):
  """Raised by a hook to end training early at the current step (e.g. FID early stopping): the loop
  checkpoints that step and returns."""


Hook = Callable[[int, TrainState], None]


@dataclasses.dataclass(frozen=True)
class LoopResult:
  state: TrainState
  mesh: jax.sharding.Mesh
  start_step: int  # where this run started (> 0 after a resume)


def _finite(x: Any) -> bool:
  return bool(np.all(np.isfinite(np.asarray(x))))


def train(task: Task, config: Any, stream: TrainStream, workdir: str,
          hooks: Sequence[Hook] = (), mesh: jax.sharding.Mesh | None = None) -> LoopResult:
  """Trains `task` for `config.train.steps` steps, resuming from `workdir/checkpoints`.

  `config` needs: train.{steps, batch_size, optimizer, ema_decay, log_every,
  checkpoint_every, keep_checkpoints}, mesh, sharding_rules and seed.
  """
  tcfg = config.train
  total = int(tcfg.steps)
  mesh = mesh or sharding.make_mesh(config.mesh)
  sharding.check_batch_size(int(tcfg.batch_size), mesh)
  ensure_writable_dir(workdir)

  tx, schedule = task_optimizer(task, tcfg, total)
  ema_decay = float(tcfg.ema_decay)
  rules = [tuple(r) for r in config.sharding_rules]
  root_rng = jax.random.key(int(config.seed))

  first = sharding.to_global(stream.batch(0), mesh)
  batch_shardings = {k: v.sharding for k, v in first.items()}

  def init_state(rng, batch):
    params = task.init(rng, batch)
    statistics = task.init_statistics(batch) if hasattr(task, "init_statistics") else None
    return state_lib.create(params, tx, jax.random.fold_in(rng, 1), statistics)

  # Runs of equal tasks and optimizers in one process share their jitted functions (jit_cache).
  tkey = jit_cache.task_key(task)
  run_key = None if tkey is None else (tkey, jit_cache.config_key(tcfg.optimizer), total, ema_decay,
                                       mesh, json.dumps(rules, default=str),
                                       jit_cache.tree_key(jax.eval_shape(lambda: first)),
                                       jit_cache.tree_key(batch_shardings))
  abstract = jit_cache.shared(run_key and ("abstract",) + run_key,
                              lambda: jax.eval_shape(init_state, root_rng, first))
  state_shardings = sharding.tree_shardings(abstract, mesh, rules)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), int(tcfg.keep_checkpoints))
  start = ckpt.latest_step()
  if start is not None:
    print(f"resuming from checkpoint step {start} in {ckpt.directory}", flush=True)
    state = ckpt.restore(ckpt_lib.abstract_with_shardings(abstract, state_shardings))
  else:
    start = 0
    init_fn = jit_cache.shared(run_key and ("init",) + run_key,
                               lambda: jax.jit(init_state, out_shardings=state_shardings))
    state = init_fn(root_rng, first)
    load = getattr(task, "load_pretrained", None)
    if load is not None:
      params = load(jax.device_get(state.params))
      if params is not None:
        params = jax.device_put(params, state_shardings.params)
        state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params),
                              opt_state=jax.jit(tx.init, out_shardings=state_shardings.opt_state)(params))

  step_fn = jit_cache.shared(
      run_key and ("step",) + run_key,
      lambda: jax.jit(make_train_step(task, tx, schedule, ema_decay),
                      in_shardings=(state_shardings, batch_shardings),
                      out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,)))

  writer = create_writer(os.path.join(workdir, "tensorboard"))
  if start == 0:
    writer.write_hparams({k: str(v) for k, v in _flat_config(config).items()})
  progress = Progress("train", total, start=start)
  pending: list[tuple[int, Any]] = []
  last_saved = start if start > 0 else None

  def check_pending() -> dict[str, float]:
    """Host-syncs the metrics since the last check; stops on a NaN/Inf loss."""
    host = [(s, jax.device_get(m)) for s, m in pending]
    pending.clear()
    for s, m in host:
      if not _finite(m["loss"]):
        where = (f"the last good checkpoint is step {last_saved} in {ckpt.directory}"
                 if last_saved is not None else "no checkpoint was written before it")
        raise SynthMedError(f"loss became {float(np.asarray(m['loss']))} at step {s}; training stopped "
                            f"and {where}. Lower train.optimizer.lr, set train.optimizer.grad_clip, "
                            "or check the data for NaNs.")
    if not host:
      return {}
    return {k: float(np.mean([np.asarray(m[k]) for _, m in host])) for k in host[0][1]}

  def log(step: int, t: float) -> None:
    del t
    means = check_pending()
    means["steps_per_s"] = progress.rate if progress.rate > 0 else 0.0
    writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
    progress.update(step, extra=f"loss {means['loss']:.4f}")

  def save(step: int, t: float) -> None:
    nonlocal last_saved
    del t
    check_pending()
    ckpt.save(step, state)
    last_saved = step

  # clu's periodic actions, called after every step: every N steps and on the last one.
  actions = [periodic_actions.PeriodicCallback(every_steps=max(int(every), 1), on_steps=[total], callback_fn=fn)
             for every, fn in ((tcfg.log_every, log), (tcfg.checkpoint_every, save))]
  batches = stream.iterate(start)
  try:
    for step in range(start, total):
      batch = sharding.to_global(next(batches), mesh)
      state, metrics = step_fn(state, batch)
      pending.append((step + 1, metrics))
      done = step + 1
      for action in actions:
        action(done)
      try:
        for hook in hooks:
          hook(done, state)
      except StopTraining as stop:
        print(f"training stopped at step {done}: {stop}", flush=True)
        if last_saved != done:
          save(done, 0.0)
        break
    ckpt.wait()
  finally:
    writer.flush()
    ckpt.close()
  return LoopResult(state=state, mesh=mesh, start_step=start)


def task_optimizer(task: Task, tcfg: Any, total: int) -> tuple[Any, Any]:
  """(optimizer, schedule of the first group): `train.optimizer`, or one optimizer per parameter group
  for a task with `param_groups` (optax.multi_transform over the top-level parameter keys)."""
  groups = getattr(task, "param_groups", None)
  if not groups:
    return make_optimizer(tcfg.optimizer, total)
  missing = [key for key in groups.values() if tcfg.get(key) is None]
  if missing:
    raise SynthMedError(f"this task trains {list(groups)} with their own optimizers; the config lacks "
                        f"{['train.' + k for k in missing]}.")
  made = {part: make_optimizer(tcfg[key], total) for part, key in groups.items()}
  tx = optax.multi_transform({part: m[0] for part, m in made.items()},
                             lambda params: {k: k for k in params})
  return tx, next(iter(made.values()))[1]


def _flat_config(config: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in config.items():
    if hasattr(v, "items"):
      out.update(_flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
