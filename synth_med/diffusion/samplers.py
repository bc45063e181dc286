"""Samplers: DDPM ancestral and DDIM (any step count, `eta`), with classifier-free guidance.

Every sampler runs the whole time loop inside one jitted `lax.scan`, sharded
over the mesh's 'data' axis, and is seeded per image: image k of a job uses the
key fold_in(key(seed), k) for its initial noise and fold_in(that key, step) for
the noise of each step, so it depends only on (seed, k), never on the batch
size or the device count.

Guidance convention (Ho & Salimans 2021, also Imagen's "w+1" form):
  ε̃ = (1 + w) ε(x_t, c) - w ε(x_t, ∅),
with ∅ the all-null condition. w = 0 is plain conditional sampling; w > 0
strengthens the condition. Respacing follows guided-diffusion: a subset of S
timesteps of 0..T-1 with ᾱ taken at those steps (DDPM on the respaced chain,
or DDIM). With S = T and eta = 1 DDIM equals DDPM with the small variance.

Truncated start (upsampler only, `start` < 1): the chain begins at
t0 = round(start * T) - 1 from the bilinearly upsampled low-resolution image
noised to t0 by q(x_t0 | x_0), not from pure noise (SDEdit, Meng et al. 2022).
The low-resolution image already fixes the coarse content, so the S steps are
spent on the low-noise end where the fine detail is made; with few steps this
avoids the residual speckle that a 10-step chain from t = T leaves.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from synth_med.diffusion.schedules import Schedule, respaced_timesteps
from synth_med.errors import SynthMedError

SAMPLERS = ("ddpm", "ddim")
_INIT_NOISE = 2 ** 30  # the fold_in index of an image's initial noise (steps use 0..S-1)

# apply(params, x_t, t, cond, low_res) -> ε
ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array | None], jax.Array]


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  name: str = "ddim"
  steps: int = 50  # respaced steps (DDPM uses all T when steps == T)
  eta: float = 0.0  # DDIM only: 0 deterministic, 1 DDPM-like
  guidance: float = 0.0  # w, see the module docstring
  clip_denoised: bool = True  # clip the x_0 prediction to [-1, 1]
  start: float = 1.0  # fraction of the chain run; < 1 starts from the noised low-res image (upsampler)

  def __post_init__(self):
    if not 0.0 < self.start <= 1.0:
      raise SynthMedError(f"sampler start={self.start} must be in (0, 1]: the fraction of the T timesteps "
                          "the chain runs through (1 = from pure noise).")
    if self.name not in SAMPLERS:
      raise SynthMedError(f"sampler {self.name!r} is not valid; choose one of {list(SAMPLERS)}.")
    if self.eta < 0:
      raise SynthMedError(f"sampler eta={self.eta} must be >= 0.")


def guided_eps(apply: ApplyFn, params: Any, x: jax.Array, t: jax.Array, cond: jax.Array,
               low_res: jax.Array | None, w: jax.Array | None) -> jax.Array:
  """ε, or the guided ε̃ = (1 + w) ε(c) - w ε(∅) when `w` is given (one batched model call)."""
  if w is None:
    return apply(params, x, t, cond, low_res)
  two = lambda a: None if a is None else jnp.concatenate([a, a], axis=0)  # noqa: E731
  eps = apply(params, two(x), two(t), jnp.concatenate([cond, jnp.zeros_like(cond)], axis=0), two(low_res))
  e_c, e_u = jnp.split(eps, 2, axis=0)
  return (1.0 + w) * e_c - w * e_u


def per_image_normal(keys: jax.Array, i: jax.Array | int, shape: tuple[int, ...]) -> jax.Array:
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), shape))(keys)


def image_keys(seed: jax.Array, indices: jax.Array) -> jax.Array:
  """The key of image k of a job: fold_in(key(seed), k)."""
  root = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(root, i))(indices)


def sample_loop(apply: ApplyFn, schedule: Schedule, cfg: SamplerConfig, params: Any, keys: jax.Array,
                cond: jax.Array, low_res: jax.Array | None, w: jax.Array | None,
                image_shape: tuple[int, ...]) -> jax.Array:
  """Samples x_0 in [-1, 1] (float32 [B, *image_shape]); traceable, the loop is a lax.scan."""
  last = max(int(round(cfg.start * schedule.num_steps)) - 1, 0)
  ts = respaced_timesteps(schedule.num_steps, cfg.steps, last)
  ac = schedule.alphas_cumprod.astype(np.float64)[ts]
  ac_prev = np.append(1.0, ac[:-1])
  beta = 1.0 - ac / ac_prev
  if cfg.name == "ddpm":
    var = beta * (1.0 - ac_prev) / (1.0 - ac) if schedule.variance == "small" else beta
    coef_x0 = beta * np.sqrt(ac_prev) / (1.0 - ac)
    coef_xt = (1.0 - ac_prev) * np.sqrt(1.0 - beta) / (1.0 - ac)
  else:
    var = cfg.eta ** 2 * (1.0 - ac_prev) / (1.0 - ac) * beta
    coef_x0 = np.sqrt(ac_prev)
    coef_xt = np.zeros_like(ac)
  f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))  # noqa: E731
  c = dict(t=jnp.asarray(ts, jnp.int32), a=f32(ac), ap=f32(ac_prev), sd=f32(np.sqrt(var)),
           cx0=f32(coef_x0), cxt=f32(coef_xt), dir=f32(np.sqrt(np.maximum(1.0 - ac_prev - var, 0.0))))
  deterministic = bool(np.all(var[1:] == 0))
  b = keys.shape[0]
  x = per_image_normal(keys, _INIT_NOISE, image_shape)
  if last < schedule.num_steps - 1:
    if low_res is None:
      raise SynthMedError(f"sampler start={cfg.start} < 1 starts from the upsampled low-resolution image, "
                          "so it works only for the upsampler; set sampler.start=1.0 for a base model.")
    x = float(np.sqrt(ac[-1])) * low_res.astype(jnp.float32) + float(np.sqrt(1.0 - ac[-1])) * x

  def body(x, i):
    t = jnp.full((b,), c["t"][i], jnp.int32)
    a = c["a"][i]
    eps = guided_eps(apply, params, x, t, cond, low_res, w)
    x0 = (x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
    if cfg.clip_denoised:
      x0 = jnp.clip(x0, -1.0, 1.0)
    if cfg.name == "ddpm":
      mean = c["cx0"][i] * x0 + c["cxt"][i] * x
    else:
      eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
      mean = c["cx0"][i] * x0 + c["dir"][i] * eps
    if deterministic:  # DDIM with eta = 0: no per-step noise to draw
      return mean, None
    noise = per_image_normal(keys, i, image_shape)
    return mean + jnp.where(i > 0, c["sd"][i], 0.0) * noise, None

  x, _ = jax.lax.scan(body, x, jnp.arange(len(ts) - 1, -1, -1))
  return x


def to_uint8(x: jax.Array) -> jax.Array:
  """[-1, 1] -> uint8 0..255."""
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
