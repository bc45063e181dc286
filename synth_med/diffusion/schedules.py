"""Noise schedules and every derived constant of a fixed-variance DDPM (Ho et al. 2020).

All constants are computed once in float64 numpy and kept as float32 arrays of
length T (index t = 0..T-1 is the t+1-th noising step, as in guided-diffusion).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from synth_med.errors import SynthMedError

SCHEDULES = ("linear", "cosine")
VARIANCES = ("small", "large")  # fixed posterior variance β̃_t, or β_t


def linear_betas(num_steps: int) -> np.ndarray:
  """Ho et al.'s linear β from 1e-4 to 0.02, rescaled so any T gives the same curve."""
  scale = 1000.0 / num_steps
  return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal's cosine schedule: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2)."""
  f = lambda t: math.cos((t / num_steps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
  return np.asarray([min(1 - f(i + 1) / f(i), max_beta) for i in range(num_steps)], np.float64)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The per-timestep constants; arrays have length T."""
  betas: np.ndarray
  alphas_cumprod: np.ndarray
  alphas_cumprod_prev: np.ndarray
  posterior_variance: np.ndarray
  posterior_log_variance_clipped: np.ndarray
  posterior_mean_coef1: np.ndarray  # multiplies x_0
  posterior_mean_coef2: np.ndarray  # multiplies x_t
  variance: str = "small"

  @property
  def num_steps(self) -> int:
    return len(self.betas)

  @property
  def sqrt_alphas_cumprod(self) -> np.ndarray:
    return np.sqrt(self.alphas_cumprod)

  @property
  def sqrt_one_minus_alphas_cumprod(self) -> np.ndarray:
    return np.sqrt(1.0 - self.alphas_cumprod)

  def model_log_variance(self) -> np.ndarray:
    """log of the fixed reverse-process variance: β̃_t ('small') or β_t ('large')."""
    if self.variance == "small":
      return self.posterior_log_variance_clipped
    return np.log(np.append(self.posterior_variance[1], self.betas[1:])).astype(np.float32)


def from_betas(betas: np.ndarray, variance: str = "small") -> Schedule:
  """All derived constants of a β sequence."""
  betas = np.asarray(betas, np.float64)
  if betas.ndim != 1 or np.any(betas <= 0) or np.any(betas >= 1):
    raise SynthMedError("β values must be a 1-D sequence in (0, 1).")
  if variance not in VARIANCES:
    raise SynthMedError(f"diffusion variance {variance!r} is not valid; choose one of {list(VARIANCES)}.")
  ac = np.cumprod(1.0 - betas)
  ac_prev = np.append(1.0, ac[:-1])
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
  return Schedule(
      betas=f32(betas), alphas_cumprod=f32(ac), alphas_cumprod_prev=f32(ac_prev),
      posterior_variance=f32(post_var),
      # β̃_0 = 0; guided-diffusion clips the log with β̃_1.
      posterior_log_variance_clipped=f32(np.log(np.append(post_var[1], post_var[1:]))),
      posterior_mean_coef1=f32(betas * np.sqrt(ac_prev) / (1.0 - ac)),
      posterior_mean_coef2=f32((1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac)),
      variance=variance)


def make_schedule(name: str, num_steps: int = 1000, variance: str = "small") -> Schedule:
  """'linear' or 'cosine' with T = num_steps."""
  if name not in SCHEDULES:
    raise SynthMedError(f"noise schedule {name!r} is not valid; choose one of {list(SCHEDULES)}.")
  if num_steps < 2:
    raise SynthMedError(f"diffusion.num_steps={num_steps} must be >= 2 (002 uses T=1000).")
  betas = linear_betas(num_steps) if name == "linear" else cosine_betas(num_steps)
  return from_betas(betas, variance)


def respaced_timesteps(num_steps: int, sample_steps: int, last: int | None = None) -> np.ndarray:
  """`sample_steps` evenly spaced timesteps of 0..last (default T-1), ascending, always ending at last."""
  last = num_steps - 1 if last is None else int(last)
  if not 1 <= sample_steps <= last + 1:
    raise SynthMedError(f"sampler steps {sample_steps} must be in 1..{last + 1} (the timesteps 0..{last} "
                        "the sampler runs through).")
  ts = np.round(np.linspace(0, last, sample_steps)).astype(np.int32)
  return np.unique(ts)
