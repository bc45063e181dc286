"""The train state: step, params, optimizer state, EMA params and rng (vdm style), and a task's running
statistics (an empty dict for most tasks; paper 004's centroid sums and Q(Z|Y) for the IDS task)."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array  # raw uint32[2] key data, so orbax can store it
  statistics: Any = flax.struct.field(default_factory=dict)  # not trained by gradients; updated by the step


def create(params: Any, tx: optax.GradientTransformation, rng: jax.Array, statistics: Any = None) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params), rng=jax.random.key_data(rng),
                    statistics={} if statistics is None else statistics)


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
