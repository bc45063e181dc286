"""Per-modality heuristic augmentations of 002 App. E.1 as jittable functions.

Each takes float images in [0, 1], shape [B, H, W, C], and a PRNG key, and is
vmapped per example. Geometry (flips, rotation, crop-and-resize) is one affine
resampling with `map_coordinates`; colour ops are linear maps.

- skin: h/v flips, brightness +-0.1, saturation x[0.8, 1.2], hue +-0.02,
  contrast x[0.8, 1.2], rotation within +-150 deg, Gaussian blur with std drawn
  from {0.001, 0.01, 0.1, 1, 3, 5, 7} px at 256 px (scaled to the image size).
- chest: h flip, random crop to 202/224 of the side resized back, rotation
  +-15 deg, luminance shift +-0.1, contrast x[0.8, 1.2], clipped to [0, 1].
- tissue ("colour augmentation"): brightness +-0.1, contrast x[0.75, 1.25],
  saturation x[0.75, 1.25], hue +-0.05 (magnitudes are our choice; the paper
  gives none).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from synth_med.errors import SynthMedError

AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]
BLUR_STDS_AT_256 = (0.001, 0.01, 0.1, 1.0, 3.0, 5.0, 7.0)


def _affine(img: jax.Array, angle: jax.Array, scale: jax.Array, flip_h: jax.Array,
            flip_v: jax.Array, shift: jax.Array) -> jax.Array:
  """Samples img [H, W, C] at rotated/scaled/flipped/shifted coordinates (bilinear, reflect)."""
  h, w, c = img.shape
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  y, x = yy - cy, xx - cx
  x = jnp.where(flip_h, -x, x)
  y = jnp.where(flip_v, -y, y)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  sx = (cos * x - sin * y) * scale + cx + shift[1]
  sy = (sin * x + cos * y) * scale + cy + shift[0]
  chans = [jax.scipy.ndimage.map_coordinates(img[..., k], [sy, sx], order=1, mode="reflect")
           for k in range(c)]
  return jnp.stack(chans, axis=-1)


def _gray(img: jax.Array) -> jax.Array:
  if img.shape[-1] == 1:
    return img
  return jnp.sum(img * jnp.array([0.299, 0.587, 0.114]), axis=-1, keepdims=True)


def _saturation(img: jax.Array, factor: jax.Array) -> jax.Array:
  g = _gray(img)
  return g + (img - g) * factor


def _contrast(img: jax.Array, factor: jax.Array) -> jax.Array:
  m = jnp.mean(_gray(img))
  return m + (img - m) * factor


def _hue(img: jax.Array, delta: jax.Array) -> jax.Array:
  """Rotates hue by delta (fraction of a turn) in YIQ space; identity for grey images."""
  if img.shape[-1] == 1:
    return img
  to_yiq = jnp.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
  to_rgb = jnp.linalg.inv(to_yiq)
  th = 2.0 * jnp.pi * delta
  rot = jnp.array([[1.0, 0.0, 0.0], [0.0, jnp.cos(th), -jnp.sin(th)], [0.0, jnp.sin(th), jnp.cos(th)]])
  m = to_rgb @ rot @ to_yiq
  return img @ m.T


def _blur(img: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
  """Separable Gaussian blur with a traced sigma (kernel of fixed radius)."""
  t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  k = jnp.exp(-0.5 * (t / jnp.maximum(sigma, 1e-3)) ** 2)
  k = k / k.sum()
  pad = jnp.pad(img, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
  h, w, _ = img.shape
  rows = sum(k[i] * pad[i:i + h, :, :] for i in range(2 * radius + 1))
  return sum(k[i] * rows[:, i:i + w, :] for i in range(2 * radius + 1))


def _skin_one(img: jax.Array, key: jax.Array) -> jax.Array:
  ks = jax.random.split(key, 9)
  size = img.shape[0]
  angle = jnp.deg2rad(jax.random.uniform(ks[0], (), minval=-150.0, maxval=150.0))
  img = _affine(img, angle, 1.0, jax.random.bernoulli(ks[1]), jax.random.bernoulli(ks[2]), jnp.zeros(2))
  img = img + jax.random.uniform(ks[3], (), minval=-0.1, maxval=0.1)
  img = _saturation(img, jax.random.uniform(ks[4], (), minval=0.8, maxval=1.2))
  img = _hue(img, jax.random.uniform(ks[5], (), minval=-0.02, maxval=0.02))
  img = _contrast(img, jax.random.uniform(ks[6], (), minval=0.8, maxval=1.2))
  stds = jnp.array(BLUR_STDS_AT_256) * (size / 256.0)
  sigma = stds[jax.random.randint(ks[7], (), 0, len(BLUR_STDS_AT_256))]
  radius = max(1, min(int(3 * max(BLUR_STDS_AT_256) * size / 256.0 + 0.5), size // 2 - 1))
  img = _blur(img, sigma, radius)
  return jnp.clip(img, 0.0, 1.0)


def _chest_one(img: jax.Array, key: jax.Array) -> jax.Array:
  ks = jax.random.split(key, 6)
  size = img.shape[0]
  scale = 202.0 / 224.0  # crop 202 of 224 and resize back
  max_shift = (1.0 - scale) * size / 2.0
  shift = jax.random.uniform(ks[0], (2,), minval=-max_shift, maxval=max_shift)
  angle = jnp.deg2rad(jax.random.uniform(ks[1], (), minval=-15.0, maxval=15.0))
  img = _affine(img, angle, scale, jax.random.bernoulli(ks[2]), False, shift)
  img = img + jax.random.uniform(ks[3], (), minval=-0.1, maxval=0.1)
  img = img * jax.random.uniform(ks[4], (), minval=0.8, maxval=1.2)
  return jnp.clip(img, 0.0, 1.0)


def _tissue_one(img: jax.Array, key: jax.Array) -> jax.Array:
  ks = jax.random.split(key, 4)
  img = img + jax.random.uniform(ks[0], (), minval=-0.1, maxval=0.1)
  img = _contrast(img, jax.random.uniform(ks[1], (), minval=0.75, maxval=1.25))
  img = _saturation(img, jax.random.uniform(ks[2], (), minval=0.75, maxval=1.25))
  img = _hue(img, jax.random.uniform(ks[3], (), minval=-0.05, maxval=0.05))
  return jnp.clip(img, 0.0, 1.0)


def _warp(img: jax.Array, mat: jax.Array, shift: jax.Array) -> jax.Array:
  """Samples img [H, W, C] at mat @ (y, x) + shift about the centre (bilinear, edge-replicated)."""
  h, w, c = img.shape
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  y, x = yy - cy, xx - cx
  sy = mat[0, 0] * y + mat[0, 1] * x + cy + shift[0]
  sx = mat[1, 0] * y + mat[1, 1] * x + cx + shift[1]
  return jnp.stack([jax.scipy.ndimage.map_coordinates(img[..., k], [sy, sx], order=1, mode="nearest")
                    for k in range(c)], axis=-1)


def _imagenet_one(img: jax.Array, key: jax.Array) -> jax.Array:
  """'ImageNet-style' augmentation: a random square crop of 35-100 % of the area, resized back
  (bilinear), and a horizontal flip with p = 0.5 (our reading of 002 E.2; the paper gives no values)."""
  ks = jax.random.split(key, 3)
  size = img.shape[0]
  side = jnp.sqrt(jax.random.uniform(ks[0], (), minval=0.35, maxval=1.0))
  max_shift = (1.0 - side) * size / 2.0
  shift = jax.random.uniform(ks[1], (2,), minval=-1.0, maxval=1.0) * max_shift
  return jnp.clip(_affine(img, 0.0, side, jax.random.bernoulli(ks[2]), False, shift), 0.0, 1.0)


def _sharpness(img: jax.Array, factor: jax.Array) -> jax.Array:
  k = jnp.array([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
  pad = jnp.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
  h, w, _ = img.shape
  smooth = sum(k[i, j] * pad[i:i + h, j:j + w] for i in range(3) for j in range(3))
  return smooth + (img - smooth) * factor


def _equalize(img: jax.Array) -> jax.Array:
  """Per-channel histogram equalisation: each value -> its rank among the channel's pixels."""
  flat = img.reshape(-1, img.shape[-1])
  srt = jnp.sort(flat, axis=0)
  ranks = jax.vmap(lambda col, s: jnp.searchsorted(s, col, side="right"), in_axes=(1, 1), out_axes=1)(flat, srt)
  return (ranks / flat.shape[0]).reshape(img.shape).astype(img.dtype)


def _autocontrast(img: jax.Array) -> jax.Array:
  lo = jnp.min(img, axis=(0, 1), keepdims=True)
  hi = jnp.max(img, axis=(0, 1), keepdims=True)
  return jnp.where(hi > lo, (img - lo) / jnp.maximum(hi - lo, 1e-6), img)


def _randaugment_ops(size: int):
  """RandAugment's 14 operations as fn(img, m, sign) with m in [0, 1] (magnitude / 10)."""
  eye = jnp.eye(2)

  def rot(img, m, s):
    th = jnp.deg2rad(30.0 * m * s)
    return _warp(img, jnp.array([[jnp.cos(th), -jnp.sin(th)], [jnp.sin(th), jnp.cos(th)]]), jnp.zeros(2))

  return (
      lambda img, m, s: img,  # identity
      lambda img, m, s: _autocontrast(img),
      lambda img, m, s: _equalize(img),
      rot,
      lambda img, m, s: jnp.floor(img * 255.0 / 2 ** jnp.round(4.0 * m)) * 2 ** jnp.round(4.0 * m) / 255.0,
      lambda img, m, s: jnp.where(img >= 1.0 - m, 1.0 - img, img),  # solarize
      lambda img, m, s: _saturation(img, 1.0 + 0.9 * m * s),  # colour
      lambda img, m, s: _contrast(img, 1.0 + 0.9 * m * s),
      lambda img, m, s: img * (1.0 + 0.9 * m * s),  # brightness
      lambda img, m, s: _sharpness(img, 1.0 + 0.9 * m * s),
      lambda img, m, s: _warp(img, eye.at[1, 0].set(0.3 * m * s), jnp.zeros(2)),  # shear x
      lambda img, m, s: _warp(img, eye.at[0, 1].set(0.3 * m * s), jnp.zeros(2)),  # shear y
      lambda img, m, s: _warp(img, eye, jnp.array([0.0, 0.3 * size * m * s])),  # translate x
      lambda img, m, s: _warp(img, eye, jnp.array([0.3 * size * m * s, 0.0])),  # translate y
  )


def make_randaugment_one(num_ops: int = 2, magnitude: float = 9.0):
  """RandAugment (Cubuk et al. 2020): `num_ops` ops drawn uniformly from 14, each at
  `magnitude` on the 0-10 scale with a random sign (our defaults: N=2, M=9)."""
  def one(img: jax.Array, key: jax.Array) -> jax.Array:
    ops = _randaugment_ops(img.shape[0])
    m = jnp.float32(magnitude / 10.0)
    for k in jax.random.split(key, num_ops):
      ka, kb = jax.random.split(k)
      sign = jnp.where(jax.random.bernoulli(kb), 1.0, -1.0)
      img = jnp.clip(jax.lax.switch(jax.random.randint(ka, (), 0, len(ops)), ops, img, m, sign), 0.0, 1.0)
    return img
  return one


_PER_MODALITY = {"skin": _skin_one, "chest": _chest_one, "tissue": _tissue_one}
# standard: 002 App. E.1 per modality (colour augmentation for tissue); the E.2 baselines add
# RandAugment, ImageNet-style crops + flips, and both.
AUGMENTS = ("none", "standard", "randaugment", "imagenet", "randaugment_imagenet")


def make_augment(modality: str, kind: str) -> AugmentFn | None:
  """Batch augmentation fn(images [B,H,W,C] in [0,1], key) or None for 'none'."""
  if kind not in AUGMENTS:
    raise SynthMedError(f"data.augment={kind!r}; choose one of {list(AUGMENTS)}.")
  if kind == "none":
    return None
  if kind == "standard":
    if modality not in _PER_MODALITY:
      raise SynthMedError(f"no standard augmentations for modality {modality!r}; choose from "
                          f"{list(_PER_MODALITY)} or data.augment='randaugment'/'imagenet'.")
    one = _PER_MODALITY[modality]
  elif kind == "randaugment":
    one = make_randaugment_one()
  elif kind == "imagenet":
    one = _imagenet_one
  else:
    one = make_randaugment_one()

  def augment(images: jax.Array, key: jax.Array) -> jax.Array:
    keys = jax.random.split(key, images.shape[0])
    if kind == "randaugment_imagenet":  # the crop + flip first, then RandAugment
      images = jax.vmap(_imagenet_one)(images, jax.random.split(jax.random.fold_in(key, 1), images.shape[0]))
    if kind.startswith("randaugment"):
      # One image at a time, so lax.switch runs only the drawn ops; vmapped, every one of the
      # 14 branches would run for every image.
      return jax.lax.map(lambda ik: one(*ik), (images, keys))
    return jax.vmap(one)(images, keys)

  augment.cache_name = f"{modality}:{kind}"  # what it does, for sharing jitted steps (train.jit_cache)
  return augment
