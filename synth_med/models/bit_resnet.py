"""BiT-ResNet (ResNet-v2 with GroupNorm and weight-standardised convolutions).

Kolesnikov et al., "Big Transfer (BiT)". Pre-activation bottleneck units; the
module names mirror BiT's released `.npz` checkpoints
(`resnet/block1/unit01/a/standardized_conv2d/kernel`, ...), so `load` is a
rename. Depths 50/101/152 and width x1-x3 as published; `block_units` and a
fractional `width` give CPU-scale variants of the same architecture.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synth_med.errors import SynthMedError

DEPTHS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
HEADS = ("softmax", "multilabel", "binary")


def _groups(channels: int, max_groups: int = 32) -> int:
  g = min(max_groups, channels)
  while channels % g:
    g -= 1
  return g


class StdConv(nn.Conv):
  """Conv with weight standardisation (zero mean, unit variance per output)."""

  def param(self, name: str, *args, **kwargs):
    p = super().param(name, *args, **kwargs)
    if name == "kernel":
      mean = jnp.mean(p, axis=(0, 1, 2), keepdims=True)
      var = jnp.var(p, axis=(0, 1, 2), keepdims=True)
      p = (p - mean) * jax.lax.rsqrt(var + 1e-10)
    return p


class _NormConv(nn.Module):
  """GroupNorm -> ReLU -> StdConv, named like BiT's 'a' / 'b' / 'c' sub-units."""
  features: int
  kernel: int
  strides: int = 1
  proj_features: int = 0
  proj_strides: int = 1

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.GroupNorm(num_groups=_groups(x.shape[-1]), epsilon=1e-5, name="group_norm")(x))
    proj = None
    if self.proj_features:
      proj = _ProjConv(self.proj_features, self.proj_strides, name="proj")(x)
    y = StdConv(self.features, (self.kernel, self.kernel), (self.strides, self.strides),
                padding="SAME", use_bias=False, name="standardized_conv2d")(x)
    return y, proj


class _ProjConv(nn.Module):
  features: int
  strides: int

  @nn.compact
  def __call__(self, x):
    return StdConv(self.features, (1, 1), (self.strides, self.strides), use_bias=False,
                   name="standardized_conv2d")(x)


class _Unit(nn.Module):
  """Pre-activation bottleneck unit."""
  features: int  # output channels (4x the bottleneck width)
  strides: int

  @nn.compact
  def __call__(self, x):
    mid = self.features // 4
    need_proj = self.strides != 1 or x.shape[-1] != self.features
    y, proj = _NormConv(mid, 1, proj_features=self.features if need_proj else 0,
                        proj_strides=self.strides, name="a")(x)
    residual = proj if need_proj else x
    y, _ = _NormConv(mid, 3, strides=self.strides, name="b")(y)
    y, _ = _NormConv(self.features, 1, name="c")(y)
    return y + residual


class Model(nn.Module):
  """BiT-ResNet-v2. Returns (logits, pre-logit features)."""
  num_outputs: int
  depth: int = 50
  width: float = 1.0
  block_units: Sequence[int] = ()
  root_pool: bool = True

  @property
  def units(self) -> tuple[int, ...]:
    if self.block_units:
      return tuple(self.block_units)
    if self.depth not in DEPTHS:
      raise SynthMedError(f"model.depth={self.depth} is not a BiT depth; choose from {sorted(DEPTHS)} "
                          "or set model.block_units.")
    return DEPTHS[self.depth]

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False):
    del train  # no dropout or batch statistics in BiT
    root = max(int(64 * self.width), 8)
    x = _Root(root, self.root_pool, name="root_block")(images)
    for b, n in enumerate(self.units, start=1):
      x = _Block(root * 4 * 2 ** (b - 1), n, 1 if b == 1 else 2, name=f"block{b}")(x)
    x = nn.relu(nn.GroupNorm(num_groups=_groups(x.shape[-1]), epsilon=1e-5, name="group_norm")(x))
    features = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_outputs, kernel_init=nn.initializers.zeros, name="head")(features)
    return logits, features


class _Root(nn.Module):
  features: int
  pool: bool

  @nn.compact
  def __call__(self, x):
    x = StdConv(self.features, (7, 7), (2, 2), padding="SAME", use_bias=False,
                name="standardized_conv2d")(x)
    if self.pool:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    return x


class _Block(nn.Module):
  features: int
  units: int
  strides: int

  @nn.compact
  def __call__(self, x):
    for u in range(1, self.units + 1):
      x = _Unit(self.features, self.strides if u == 1 else 1, name=f"unit{u:02d}")(x)
    return x


def num_outputs(label_kind: str, num_classes: int) -> int:
  """Head size: one logit per class (softmax / multilabel) or one for binary."""
  if label_kind not in HEADS:
    raise SynthMedError(f"label kind {label_kind!r} has no head; choose from {list(HEADS)}.")
  return 1 if label_kind == "binary" else num_classes


# --- checkpoints ---------------------------------------------------------------
def load(params: Mapping[str, Any], npz_path: str, prefix: str = "resnet/") -> dict[str, Any]:
  """Loads a BiT `.npz` (public release naming) into `params`; the head stays new.

  Every backbone parameter of `params` must be found in the file with the same
  shape (a 1-channel root conv takes the sum of BiT's RGB kernel). Errors name
  the file, the parameter and the fix.
  """
  if not os.path.isfile(npz_path):
    raise SynthMedError(f"BiT checkpoint {npz_path!r} does not exist; set model.pretrained_npz to a "
                        "local BiT .npz file (e.g. BiT-M-R50x1.npz) or to '' to train from scratch.")
  try:
    weights = dict(np.load(npz_path))
  except Exception as e:  # noqa: BLE001 - any unreadable file
    raise SynthMedError(f"cannot read BiT checkpoint {npz_path!r}: {e}") from e
  flat = _flatten(params)
  out = {}
  for path, value in flat.items():
    if path[0] == "head":
      out[path] = value
      continue
    name = prefix + "/".join(_GN_RENAME_INV.get(p, p) for p in path)
    if name not in weights:
      raise SynthMedError(f"{npz_path!r} has no parameter {name!r}; the model config (depth, width, "
                          "block_units) must match the checkpoint's architecture.")
    w = np.asarray(weights[name], np.float32)
    if path[0] == "root_block" and w.ndim == 4 and w.shape[2] == 3 and value.shape[2] == 1:
      w = w.sum(axis=2, keepdims=True)
    if w.shape != tuple(value.shape):
      raise SynthMedError(f"{npz_path!r}: {name!r} has shape {w.shape}, the model expects "
                          f"{tuple(value.shape)}; check model.depth/width against the checkpoint.")
    out[path] = jnp.asarray(w, value.dtype)
  return _unflatten(out)


_GN_RENAME_INV = {"scale": "gamma", "bias": "beta"}


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, v in flat.items():
    d = out
    for p in path[:-1]:
      d = d.setdefault(p, {})
    d[path[-1]] = v
  return out
