"""Closed-form forward process, posterior and the ε-prediction MSE loss."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from synth_med.diffusion.schedules import Schedule


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


def eps_loss(s: Schedule, eps_fn: Callable[[jax.Array, jax.Array], jax.Array], x0: jax.Array,
             rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-example MSE between ε and eps_fn(x_t, t) for t ~ U{0..T-1}; returns (losses, t)."""
  t_rng, n_rng = jax.random.split(rng)
  t = jax.random.randint(t_rng, (x0.shape[0],), 0, s.num_steps)
  noise = jax.random.normal(n_rng, x0.shape, x0.dtype)
  eps = eps_fn(q_sample(s, x0, t, noise), t)
  return jnp.mean(jnp.square(eps - noise), axis=tuple(range(1, x0.ndim))), t
