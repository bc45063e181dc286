"""The cascade upsampler's low-resolution input, exactly as 002 App. E lists it.

Training (`training_low_res`), from a high-resolution batch x (0-255):
  0. make the low-resolution image: bilinear resize of x to `low_size`;
  1. bilinear upsampling back to the high resolution, **with antialias at
     p=0.5**. Antialiasing only changes a *down*-sampling resize, so the
     per-example coin selects an antialiased or a plain bilinear resize for the
     down step of this round trip (the up step is bilinear either way);
  2. Gaussian noise at p=0.2, σ=4 on the 0-255 scale;
  3. 7×7 Gaussian blur with σ = |N(0, 0.2)| at p=`blur_prob` (our choice: 0.5;
     the paper gives none);
  4. quantisation to 256 levels (round, clip to 0..255);
  5. scaling to [-1, 1].
Sampling (`sampling_low_res`): the base model's uint8 sample, bilinearly
upsampled, quantised and scaled (steps 1, 4, 5 with no augmentation).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LowResAugment:
  low_size: int
  antialias_prob: float = 0.5
  noise_prob: float = 0.2
  noise_std: float = 4.0  # on the 0-255 scale
  blur_prob: float = 0.5  # our choice; 002 gives no probability
  blur_sigma_scale: float = 0.2  # σ = |N(0, 0.2)|
  blur_size: int = 7


def _resize(x: jax.Array, size: tuple[int, int], antialias: bool) -> jax.Array:
  return jax.image.resize(x, (x.shape[0], size[0], size[1], x.shape[-1]), "linear", antialias=antialias)


def gaussian_blur(x: jax.Array, sigma: jax.Array, size: int = 7) -> jax.Array:
  """Separable size×size Gaussian blur of [B, H, W, C] with a σ per example (reflect padding)."""
  r = size // 2
  offs = jnp.arange(-r, r + 1, dtype=jnp.float32)
  s = jnp.maximum(sigma, 1e-4)[:, None]
  w = jnp.exp(-0.5 * jnp.square(offs[None] / s))
  w = w / jnp.sum(w, axis=1, keepdims=True)  # [B, size]
  h, wd = x.shape[1], x.shape[2]
  xp = jnp.pad(x, ((0, 0), (r, r), (0, 0), (0, 0)), mode="reflect")
  x = sum(w[:, i, None, None, None] * xp[:, i:i + h] for i in range(size))
  xp = jnp.pad(x, ((0, 0), (0, 0), (r, r), (0, 0)), mode="reflect")
  return sum(w[:, i, None, None, None] * xp[:, :, i:i + wd] for i in range(size))


def training_low_res(images: jax.Array, rng: jax.Array, aug: LowResAugment
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(conditioning image in [-1, 1] at the high resolution, per-example flags of what was applied)."""
  x = jnp.asarray(images, jnp.float32)
  b, h, w, _ = x.shape
  ka, kn, kz, kb, ks = jax.random.split(rng, 5)
  aa = jax.random.bernoulli(ka, aug.antialias_prob, (b,))
  low = jnp.where(aa[:, None, None, None], _resize(x, (aug.low_size,) * 2, True),
                  _resize(x, (aug.low_size,) * 2, False))
  up = _resize(low, (h, w), False)
  noisy = jax.random.bernoulli(kn, aug.noise_prob, (b,))
  up = up + jnp.where(noisy[:, None, None, None], aug.noise_std * jax.random.normal(kz, up.shape), 0.0)
  blurred = jax.random.bernoulli(kb, aug.blur_prob, (b,))
  sigma = jnp.abs(aug.blur_sigma_scale * jax.random.normal(ks, (b,)))
  up = jnp.where(blurred[:, None, None, None], gaussian_blur(up, sigma, aug.blur_size), up)
  q = jnp.round(jnp.clip(up, 0.0, 255.0))
  return q / 127.5 - 1.0, {"antialias": aa, "noise": noisy, "blur": blurred, "blur_sigma": sigma}


def sampling_low_res(low: jax.Array, size: tuple[int, int]) -> jax.Array:
  """A uint8/0-255 low-resolution batch -> the upsampler's conditioning image in [-1, 1]."""
  up = _resize(jnp.asarray(low, jnp.float32), size, False)
  return jnp.round(jnp.clip(up, 0.0, 255.0)) / 127.5 - 1.0
