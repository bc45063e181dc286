"""The procedural tissue world: tumour vs normal patches from 5 hospitals.

H&E-like patches built in optical density: nuclei (haematoxylin) on stroma
(eosin). Tumour patches have dense, large, irregular nuclei; normal ones sparse,
small, regular nuclei. Each hospital has its own stain vectors, blur and
brightness (the CAMELYON17 shift). Domains follow WILDS: train hospitals 0, 3, 4
(ID); hospital 1 is the OOD validation centre and hospital 2 the OOD test centre.
The attribute `hospital` is the index into the ID hospitals (h0, h3, h4).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from synth_med.data import random_fields as rf
from synth_med.data.schema import UNKNOWN, AttributeSpec, DatasetSpec
from synth_med.data.worlds.base import Capture, World, unpack_ids

HOSPITALS = ("h0", "h1", "h2", "h3", "h4")
ID_HOSPITALS = ("h0", "h3", "h4")
# Optical density of haematoxylin and eosin per hospital (R, G, B).
_STAIN_H = {"h0": (0.65, 0.70, 0.29), "h1": (0.50, 0.80, 0.25), "h2": (0.75, 0.62, 0.40),
            "h3": (0.45, 0.85, 0.40), "h4": (0.80, 0.55, 0.20)}
_STAIN_E = {"h0": (0.07, 0.99, 0.11), "h1": (0.10, 0.90, 0.25), "h2": (0.05, 0.85, 0.05),
            "h3": (0.20, 0.95, 0.10), "h4": (0.02, 0.80, 0.30)}
_STRENGTH = {"h0": 1.0, "h1": 0.7, "h2": 1.35, "h3": 1.35, "h4": 0.7}
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

  def render(self, ids: np.ndarray, meta: Mapping[str, np.ndarray]) -> np.ndarray:
    b, n = len(ids), self.image_size
    tumour = meta["label"][:, 0] > 0.5
    cell = 4
    g = n // cell
    u = self.uniform(_S_NUC, ids, 4 * g * g).reshape(b, 4, g, g)
    density = np.where(tumour, 0.6, 0.4)[:, None, None]
    present = u[:, 0] < density
    # Tumour nuclei are large and irregular; normal nuclei small and uniform.
    size = np.where(tumour[:, None, None], 0.5 + 0.6 * u[:, 1], 0.3 + 0.35 * u[:, 1])
    small = np.zeros((b, n, n), np.float32)
    large = np.zeros((b, n, n), np.float32)
    jy = (u[:, 2] * cell).astype(int)
    jx = (u[:, 3] * cell).astype(int)
    rows = np.arange(g)[None, :, None] * cell + jy
    cols = np.arange(g)[None, None, :] * cell + jx
    bb = np.broadcast_to(np.arange(b)[:, None, None], present.shape)
    is_large = size > 0.6
    small[bb[present & ~is_large], rows[present & ~is_large], cols[present & ~is_large]] = 6.0
    large[bb[present & is_large], rows[present & is_large], cols[present & is_large]] = (
        14.0 * size[present & is_large])
    scale = n / 64.0
    h_map = rf.blur(small, 0.8 * scale) + rf.blur(large, 1.5 * scale)
    stroma = 0.35 + 0.15 * self.bank("stroma", 1, max(n // 8, 2)).draw(self.seed, _S_STROMA, ids)[..., 0]
    h_map = np.minimum(h_map, 1.6)
    out = np.empty((b, n, n, 3), np.float32)
    domain = meta["domain"]
    for d in np.unique(domain):
      sel = domain == d
      hname = HOSPITALS[d]
      sh = np.asarray(_STAIN_H[hname], np.float32) * _STRENGTH[hname]
      se = np.asarray(_STAIN_E[hname], np.float32)
      od = h_map[sel, :, :, None] * sh + stroma[sel, :, :, None] * se
      out[sel] = np.exp(-od)
    return out
