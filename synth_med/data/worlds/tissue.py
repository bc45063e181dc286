"""The procedural tissue world: tumour vs normal patches from 5 hospitals.

H&E-like patches built in optical density: nuclei (haematoxylin) on stroma
(eosin). Tumour patches have dense, large, irregular nuclei; normal ones sparse,
small, regular nuclei. Each hospital has its own stain vectors, blur and
brightness (the CAMELYON17 shift). Domains follow WILDS: train hospitals 0, 3, 4
(ID); hospital 1 is the OOD validation centre and hospital 2 the OOD test centre.
The attribute `hospital` is the index into the ID hospitals (h0, h3, h4).
"""
from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from synth_med.data import random_fields as rf
from synth_med.data.schema import UNKNOWN, AttributeSpec, DatasetSpec
from synth_med.data.worlds.base import Capture, World, unpack_ids

HOSPITALS = ("h0", "h1", "h2", "h3", "h4")
ID_HOSPITALS = ("h0", "h3", "h4")
# Optical density of haematoxylin and eosin per hospital (R, G, B).
_STAIN_H = {"h0": (0.65, 0.70, 0.29), "h1": (0.50, 0.80, 0.25), "h2": (0.75, 0.62, 0.40),
            "h3": (0.20, 0.75, 0.75), "h4": (0.85, 0.25, 0.55)}
_STAIN_E = {"h0": (0.07, 0.99, 0.11), "h1": (0.10, 0.90, 0.25), "h2": (0.05, 0.85, 0.05),
            "h3": (0.20, 0.95, 0.10), "h4": (0.02, 0.80, 0.30)}
_STRENGTH = {"h0": 1.0, "h1": 0.8, "h2": 1.3, "h3": 1.2, "h4": 0.8}
_CAPTURES = {
    "h0": Capture(noise=0.01), "h1": Capture(blur=0.6, noise=0.02, brightness=0.03),
    "h2": Capture(blur=1.0, noise=0.015, contrast=0.9), "h3": Capture(blur=0.5, noise=0.02, gamma=1.15),
    "h4": Capture(noise=0.03, contrast=1.1, brightness=-0.03),
}
_P_TUMOUR = {"h0": 0.5, "h1": 0.5, "h2": 0.5, "h3": 0.5, "h4": 0.5}
_S_LABEL, _S_NUC, _S_STROMA = 41, 42, 43


class TissueWorld(World):
  """Histopathology-like world (see module docstring)."""

  captures = _CAPTURES

  def __init__(self, data_config):
    super().__init__(data_config)
    self.spec = DatasetSpec(
        name="tissue", class_names=("tumour",), label_kind="binary",
        attributes=(AttributeSpec("hospital", ID_HOSPITALS),), domains=HOSPITALS, channels=3)
    self._prevalence = self.prevalence({h: (p,) for h, p in _P_TUMOUR.items()},
                                       "the probability of a tumour patch")

  def metadata(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    domain, _, _ = unpack_ids(ids)
    u = self.uniform(_S_LABEL, ids, 1)[:, 0]
    p = np.array([self._prevalence[h][0] for h in HOSPITALS])[domain]
    tumour = (u < p).astype(np.float32)
    hosp = np.array([ID_HOSPITALS.index(h) if h in ID_HOSPITALS else UNKNOWN for h in HOSPITALS])
    return {"label": tumour[:, None], "label_mask": np.ones((len(ids), 1), np.float32),
            "domain": domain, "attrs/hospital": hosp[domain].astype(np.int32)}

  def render(self, ids: np.ndarray, meta: Mapping[str, np.ndarray]):
    """Per-example parameters in numpy, pixels in one jitted XLA kernel (`_tissue_pixels`)."""
    n, cell = self.image_size, 4
    g = n // cell
    u = self.uniform(_S_NUC, ids, 4 * g * g).reshape(len(ids), 4, g, g)
    stroma = self.bank("stroma", 1, max(n // 8, 2))
    s_idx, s_flip = stroma.choice(self.seed, _S_STROMA, ids)
    names = [HOSPITALS[d] for d in meta["domain"]]
    stain_h = np.asarray([np.asarray(_STAIN_H[h]) * _STRENGTH[h] for h in names], np.float32)
    stain_e = np.asarray([_STAIN_E[h] for h in names], np.float32)
    scale = n / 64.0
    return _tissue_pixels(n, cell, u, (meta["label"][:, 0] > 0.5), rf.blur_matrix(n, 0.8 * scale),
                          rf.blur_matrix(n, 1.5 * scale), stroma.device_fields(), s_idx, s_flip,
                          stain_h, stain_e)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _tissue_pixels(n, cell, u, tumour, blur_small, blur_large, stroma_fields, s_idx, s_flip, stain_h, stain_e):
  """float32[B, n, n, 3] H&E-like patches in [0, 1] (before capture effects)."""
  b, g = u.shape[0], n // cell
  density = jnp.where(tumour, 0.6, 0.4)[:, None, None]
  present = u[:, 0] < density
  # Tumour nuclei are large and irregular; normal nuclei small and uniform.
  size = jnp.where(tumour[:, None, None], 0.5 + 0.6 * u[:, 1], 0.3 + 0.35 * u[:, 1])
  is_large = size > 0.6
  rows = jnp.broadcast_to(jnp.arange(g)[None, :, None] * cell + (u[:, 2] * cell).astype(jnp.int32), u[:, 0].shape)
  cols = jnp.broadcast_to(jnp.arange(g)[None, None, :] * cell + (u[:, 3] * cell).astype(jnp.int32), u[:, 0].shape)
  bb = jnp.broadcast_to(jnp.arange(b)[:, None, None], u[:, 0].shape)
  zeros = jnp.zeros((b, n, n), jnp.float32)
  small = zeros.at[bb, rows, cols].set(jnp.where(present & ~is_large, 6.0, 0.0))
  large = zeros.at[bb, rows, cols].set(jnp.where(present & is_large, 14.0 * size, 0.0))
  h_map = (jnp.matmul(jnp.matmul(blur_small, small), blur_small.T)
           + jnp.matmul(jnp.matmul(blur_large, large), blur_large.T))
  h_map = jnp.minimum(h_map, 1.6)
  stroma = 0.35 + 0.15 * rf.take_fields(stroma_fields, s_idx, s_flip)[..., 0]
  od = h_map[..., None] * stain_h[:, None, None, :] + stroma[..., None] * stain_e[:, None, None, :]
  return jnp.exp(-od)
