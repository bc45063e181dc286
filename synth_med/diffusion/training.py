"""`DiffusionTask`: the base model or the cascade upsampler as a task of the one training loop.

The loss is the ε-prediction MSE (fixed variance, 002 Table E1) at t ~ U{0..T-1},
or the v-prediction MSE with `prediction='v'`.
Images are scaled to [-1, 1]; the condition vector is built from the batch
(label part null for unlabelled examples) and each part is dropped with
`drop_prob` for classifier-free guidance. The upsampler's low-resolution input
is made from the batch itself with App. E's preprocessing.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from synth_med.diffusion import gaussian, superres_preprocess
from synth_med.diffusion.conditioning import ConditioningSpec
from synth_med.diffusion.schedules import Schedule
from synth_med.errors import SynthMedError


def to_model_range(images: jax.Array) -> jax.Array:
  """uint8 0..255 -> float32 [-1, 1]."""
  return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


class DiffusionTask:
  """init/loss for the loop (see synth_med.train.loop.Task)."""

  def __init__(self, model: Any, schedule: Schedule, cond_spec: ConditioningSpec, drop_prob: float = 0.1,
               low_res: superres_preprocess.LowResAugment | None = None, min_snr_gamma: float = 0.0,
               prediction: str = "eps"):
    self.model, self.schedule, self.cond_spec = model, schedule, cond_spec
    self.drop_prob, self.low_res = float(drop_prob), low_res
    self.prediction = gaussian.check_prediction(prediction)
    # Min-SNR-γ (Hang et al. 2023): weight min(SNR_t, γ) on the x_0-MSE, i.e. min(SNR_t, γ) / SNR_t on
    # the ε-MSE and min(SNR_t, γ) / (SNR_t + 1) on the v-MSE; 0 = plain MSE.
    if min_snr_gamma < 0:
      raise SynthMedError(f"diffusion.min_snr_gamma={min_snr_gamma} must be >= 0 (0 turns the weighting off).")
    snr = schedule.alphas_cumprod / (1.0 - schedule.alphas_cumprod)
    scale = np.maximum(snr, 1e-20) if self.prediction == "eps" else snr + 1.0
    self._weight = (jnp.asarray(np.minimum(snr, min_snr_gamma) / scale, jnp.float32)
                    if min_snr_gamma > 0 else None)

  def _low(self, batch: Mapping[str, jax.Array], rng: jax.Array) -> jax.Array | None:
    if self.low_res is None:
      return None
    return superres_preprocess.training_low_res(batch["image"], rng, self.low_res)[0]

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> Any:
    x = to_model_range(batch["image"])
    t = jnp.zeros((x.shape[0],), jnp.int32)
    return self.model.init({"params": rng}, x, t, self.cond_spec.encode(batch), self._low(batch, rng),
                           train=False)["params"]

  def loss(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array
           ) -> tuple[jax.Array, Mapping[str, jax.Array]]:
    c_rng, l_rng, d_rng, n_rng = jax.random.split(rng, 4)
    x0 = to_model_range(batch["image"])
    cond = self.cond_spec.encode(batch, c_rng, self.drop_prob)
    low = self._low(batch, l_rng)

    def model_fn(xt, t):
      return self.model.apply({"params": params}, xt, t, cond, low, train=True, rngs={"dropout": d_rng})

    losses, t = gaussian.eps_loss(self.schedule, model_fn, x0, n_rng, self.prediction)
    loss = jnp.mean(losses if self._weight is None else losses * self._weight[t])
    # Loss by quarter of the time range: shows which noise levels are learnt.
    quarter = (4 * t) // self.schedule.num_steps
    metrics = {f"loss_q{q}": jnp.sum(jnp.where(quarter == q, losses, 0.0)) /
               jnp.maximum(jnp.sum(quarter == q), 1) for q in range(4)}
    return loss, metrics
