"""Uncertain-label policies for multi-label chest findings (CheXpert-style 1 / 0 / -1 / blank).

- '002' (paper 002, default): blank and 0 are negative; an image with any
  uncertain finding is left out of classifier training (it still trains the
  generator, with a null label);
- '000' (paper 000): uncertain findings are masked out of the loss and metrics;
- 'ones' / 'zeros' (CheXpert's U-Ones / U-Zeros): uncertain counts as positive / negative.
"""
from __future__ import annotations

import numpy as np

from synth_med.errors import SynthMedError

LABEL_POLICIES = ("002", "000", "ones", "zeros")
UNCERTAIN = -1


def apply_label_policy(raw: np.ndarray, policy: str) -> tuple[np.ndarray, np.ndarray]:
  """raw int[B, K] in {1, 0, -1 (uncertain)} (blank already mapped to 0) -> (label, mask) float32[B, K]."""
  raw = np.asarray(raw)
  if policy == "002" or policy == "zeros":
    return (raw == 1).astype(np.float32), np.ones(raw.shape, np.float32)
  if policy == "000":
    return (raw == 1).astype(np.float32), (raw != UNCERTAIN).astype(np.float32)
  if policy == "ones":
    return (raw != 0).astype(np.float32), np.ones(raw.shape, np.float32)
  raise SynthMedError(f"data.label_policy={policy!r} is unknown; choose one of {list(LABEL_POLICIES)}.")


def usable_for_classifier(raw: np.ndarray, policy: str) -> np.ndarray:
  """bool[B]: under '002' an image with any uncertain finding does not train the classifier."""
  raw = np.asarray(raw)
  if policy == "002":
    return ~(raw == UNCERTAIN).any(axis=1)
  return np.ones(raw.shape[0], bool)
