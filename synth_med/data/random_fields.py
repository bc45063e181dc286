"""Counter-based, vectorised randomness: example i of a world depends only on (seed, i).

A splitmix64 hash of (seed, stream, index, counter) gives uniform numbers without
any generator state, so a batch of examples is drawn in a few numpy operations and
any single example can be regenerated alone.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
  return x ^ (x >> np.uint64(31))


def _base(seed: int, stream: int, index: np.ndarray) -> np.ndarray:
  index = np.asarray(index).astype(np.uint64)
  with np.errstate(over="ignore"):
    s = _mix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _GOLDEN + np.uint64(stream))
    return _mix(s ^ (index * _GOLDEN + np.uint64(0x632BE59BD9B4E019)))


def uniform(seed: int, stream: int, index: np.ndarray, n: int = 1) -> np.ndarray:
  """float32[len(index), n] uniform in [0, 1), a pure function of its arguments."""
  base = _base(seed, stream, index)
  with np.errstate(over="ignore"):
    ctr = base[:, None] + np.arange(1, n + 1, dtype=np.uint64)[None, :] * _GOLDEN
  return ((_mix(ctr) >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24)))


def categorical(u: np.ndarray, probs: np.ndarray) -> np.ndarray:
  """Inverse-CDF draw: u float[B], probs float[B, K] or [K] -> int32[B]."""
  probs = np.broadcast_to(np.asarray(probs, np.float64), (len(u),) + np.shape(probs)[-1:])
  cdf = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1)
  out = (u[:, None] >= cdf).sum(axis=1)
  return np.minimum(out, probs.shape[1] - 1).astype(np.int32)


def smooth_noise(seed: int, stream: int, index: np.ndarray, size: int, cells: int,
                 channels: int = 1) -> np.ndarray:
  """float32[B, size, size, channels] in ~[-1, 1]: bilinear upsampled value noise."""
  b = len(index)
  u = uniform(seed, stream, index, cells * cells * channels).reshape(b, cells, cells, channels)
  u = 2.0 * u - 1.0
  m = interpolation_matrix(cells, size)
  return np.einsum("hc,bcdk,wd->bhwk", m, u, m, optimize=True).astype(np.float32)


_INTERP_CACHE: dict[tuple[int, int], np.ndarray] = {}


def interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
  """float32[n_out, n_in] bilinear (half-pixel centred) resampling matrix."""
  key = (n_in, n_out)
  if key not in _INTERP_CACHE:
    x = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    x = np.clip(x, 0, n_in - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (x - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), lo] += 1 - w
    m[np.arange(n_out), hi] += w
    _INTERP_CACHE[key] = m
  return _INTERP_CACHE[key]


_BLUR_CACHE: dict[tuple[int, float], np.ndarray] = {}


def blur_matrix(n: int, sigma: float) -> np.ndarray:
  """float32[n, n] Gaussian blur along one axis, edges renormalised (rows sum to 1)."""
  key = (n, round(float(sigma), 4))
  if key not in _BLUR_CACHE:
    t = np.arange(n, dtype=np.float64)
    m = np.exp(-0.5 * ((t[:, None] - t[None, :]) / max(sigma, 1e-6)) ** 2)
    m[np.abs(t[:, None] - t[None, :]) > 2.5 * sigma + 0.5] = 0.0
    _BLUR_CACHE[key] = (m / m.sum(axis=1, keepdims=True)).astype(np.float32)
  return _BLUR_CACHE[key]


def jsoft_step(z):
  """A cheap logistic-like edge for the jitted renderers: smoothstep of clip(0.5 + z / 4),
  slope 1/4 at 0 like sigmoid(z)."""
  t = jnp.clip(0.5 + 0.25 * z, 0.0, 1.0)
  return t * t * (3.0 - 2.0 * t)


def jfast_atan2(y, x):
  """atan2 to ~1e-5 rad with a minimax polynomial; fuses in XLA, unlike the libm call."""
  ax, ay = jnp.abs(x), jnp.abs(y)
  a = jnp.minimum(ax, ay) / (jnp.maximum(ax, ay) + 1e-12)
  s = a * a
  r = (((-0.0464964749 * s + 0.15931422) * s - 0.327622764) * s) * a + a
  r = jnp.where(ay > ax, jnp.pi / 2 - r, r)
  r = jnp.where(x < 0, jnp.pi - r, r)
  return jnp.where(y < 0, -r, r)


def jfast_sin(z):
  """sin to ~1e-3 with range reduction and a short polynomial (for procedural shapes)."""
  t = z * (1.0 / (2.0 * jnp.pi))
  t = t - jnp.floor(t + 0.5)  # [-0.5, 0.5) turns
  u = 2.0 * jnp.pi * t  # [-pi, pi)
  # Bhaskara-style parabola with a correction term.
  p = (4.0 / jnp.pi) * u - (4.0 / (jnp.pi * jnp.pi)) * u * jnp.abs(u)
  return 0.225 * (p * jnp.abs(p) - p) + p


class FieldBank:
  """A fixed bank of random fields; each example draws one, flipped or not, by its id hash.

  Sensor noise and textures do not need a fresh field per example: picking one
  of `count` pre-drawn fields keeps examples deterministic and costs a copy
  instead of hashing and interpolating a new field.
  """

  def __init__(self, fields: np.ndarray):
    self.fields = np.ascontiguousarray(fields, np.float32)

  @classmethod
  def gaussian(cls, seed: int, size: int, channels: int, count: int = 128) -> "FieldBank":
    rng = np.random.default_rng([seed, size, channels, 77])
    return cls(rng.standard_normal((count, size, size, channels)))

  @classmethod
  def smooth(cls, seed: int, stream: int, size: int, cells: int, channels: int,
             count: int = 128) -> "FieldBank":
    return cls(smooth_noise(seed, stream, np.arange(count), size, cells, channels))

  def choice(self, seed: int, stream: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(field index int32[B], horizontal flip bool[B]) per id."""
    u = uniform(seed, stream, ids, 2)
    idx = np.minimum((u[:, 0] * len(self.fields)).astype(np.int32), len(self.fields) - 1)
    return idx, u[:, 1] < 0.5

  def draw(self, seed: int, stream: int, ids: np.ndarray) -> np.ndarray:
    """float32[B, H, W, C]: one field per id (a pure function of seed, stream and id)."""
    idx, flip = self.choice(seed, stream, ids)
    out = self.fields[idx]
    out[flip] = out[flip, :, ::-1]
    return out

  def device_fields(self):
    """The bank as a jax array (uploaded once), for jitted renderers."""
    if getattr(self, "_device", None) is None:
          self._device = jnp.asarray(self.fields)
    return self._device


def take_fields(fields, idx, flip):
  """jnp: fields[idx] with a horizontal flip where `flip` (inside jit)."""
  out = jnp.take(fields, idx, axis=0)
  return jnp.where(flip[:, None, None, None], out[:, :, ::-1], out)
