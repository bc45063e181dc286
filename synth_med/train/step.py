"""The pure train step shared by every model (used by `loop.train` and the benchmarks)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from synth_med.train import state as state_lib

TrainState = state_lib.TrainState


def ema_decay_at(step: jax.Array, ema_decay: float) -> jax.Array:
  """The EMA decay used at `step` (0-based): min(ema_decay, (1 + step) / (10 + step))."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(ema_decay), (1.0 + step) / (10.0 + step))


def make_train_step(task: Any, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    ema_decay: float) -> Callable[[TrainState, Mapping[str, jax.Array]],
                                                  tuple[TrainState, dict[str, jax.Array]]]:
  """(state, batch) -> (state, metrics): loss and grads of `task.loss`, optax update, EMA.

  The step's rng is the state's key folded with the step number, so a resumed
  run draws exactly what an uninterrupted one would. The EMA decay warms up as
  min(ema_decay, (1 + step) / (10 + step)): without it, a short run's EMA keeps a
  large share of the random initial weights (0.995^300 = 22 %), and that blend of
  two far-apart networks is not a working network (our 300-step upsampler's EMA
  sampled pure noise while its raw weights upsampled well).
  """

  needs_step = bool(getattr(task, "needs_step", False))  # e.g. a progressive GAN's growth schedule
  # A task with running statistics (`init_statistics`) reads them from the batch ('statistics') and returns
  # the updated ones in its metrics ('statistics'); they are state, not gradients.
  has_statistics = hasattr(task, "init_statistics")

  def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if needs_step:
      batch = {**batch, "step": state.step}
    if has_statistics:
      batch = {**batch, "statistics": state.statistics}
    (loss, metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    statistics = metrics.pop("statistics") if has_statistics else state.statistics
    metrics.update(loss=loss, grad_norm=optax.global_norm(grads), lr=schedule(state.step))
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, statistics=statistics,
                        ema_params=state_lib.ema_update(state.ema_params, params,
                                                        ema_decay_at(state.step, ema_decay)))
    return new, metrics

  return train_step
