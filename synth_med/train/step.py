"""The pure train step shared by every model (used by `loop.train` and the benchmarks)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import optax

from synth_med.train import state as state_lib

TrainState = state_lib.TrainState


def make_train_step(task: Any, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    ema_decay: float) -> Callable[[TrainState, Mapping[str, jax.Array]],
                                                  tuple[TrainState, dict[str, jax.Array]]]:
  """(state, batch) -> (state, metrics): loss and grads of `task.loss`, optax update, EMA.

  The step's rng is the state's key folded with the step number, so a resumed
  run draws exactly what an uninterrupted one would.
  """

  def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (loss, metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    metrics.update(loss=loss, grad_norm=optax.global_norm(grads), lr=schedule(state.step))
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                        ema_params=state_lib.ema_update(state.ema_params, params, ema_decay))
    return new, metrics

  return train_step
