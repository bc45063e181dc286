"""Closed-form forward process, posterior and the denoising MSE loss (ε- or v-prediction)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from synth_med.diffusion.schedules import Schedule
from synth_med.errors import SynthMedError

PREDICTIONS = ("eps", "v")


def check_prediction(prediction: str) -> str:
  if prediction not in PREDICTIONS:
    raise SynthMedError(f"diffusion.prediction={prediction!r} is not valid; choose one of {list(PREDICTIONS)}.")
  return prediction


def _at(values, t: jax.Array, ndim: int) -> jax.Array:
  """values[t] broadcast to a batch of rank `ndim`."""
  v = jnp.asarray(values)[t]
  return v.reshape(v.shape + (1,) * (ndim - 1))


def q_sample(s: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε."""
  return _at(s.sqrt_alphas_cumprod, t, x0.ndim) * x0 + _at(s.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise


def q_posterior(s: Schedule, x0: jax.Array, xt: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
  mean = _at(s.posterior_mean_coef1, t, xt.ndim) * x0 + _at(s.posterior_mean_coef2, t, xt.ndim) * xt
  return mean, _at(s.posterior_variance, t, xt.ndim), _at(s.posterior_log_variance_clipped, t, xt.ndim)


def predict_x0(s: Schedule, xt: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """x_0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t)."""
  return (xt - _at(s.sqrt_one_minus_alphas_cumprod, t, xt.ndim) * eps) / _at(s.sqrt_alphas_cumprod, t, xt.ndim)


def v_target(s: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (Salimans & Ho 2022)."""
  return _at(s.sqrt_alphas_cumprod, t, x0.ndim) * noise - _at(s.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0


def eps_from_v(s: Schedule, xt: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
  """ε = sqrt(ᾱ_t) v + sqrt(1 - ᾱ_t) x_t."""
  return _at(s.sqrt_alphas_cumprod, t, xt.ndim) * v + _at(s.sqrt_one_minus_alphas_cumprod, t, xt.ndim) * xt


def eps_loss(s: Schedule, model_fn: Callable[[jax.Array, jax.Array], jax.Array], x0: jax.Array,
             rng: jax.Array, prediction: str = "eps") -> tuple[jax.Array, jax.Array]:
  """Per-example MSE between the target (ε, or v) and model_fn(x_t, t) for t ~ U{0..T-1}; returns (losses, t)."""
  t_rng, n_rng = jax.random.split(rng)
  t = jax.random.randint(t_rng, (x0.shape[0],), 0, s.num_steps)
  noise = jax.random.normal(n_rng, x0.shape, x0.dtype)
  out = model_fn(q_sample(s, x0, t, noise), t)
  target = noise if check_prediction(prediction) == "eps" else v_target(s, x0, t, noise)
  return jnp.mean(jnp.square(out - target), axis=tuple(range(1, x0.ndim))), t
