"""Uncertain-label policies for multi-label chest findings (CheXpert-style 1 / 0 / -1 / blank).

- 'drop_uncertain' (the default; what paper 002, Ktena et al., does): blank and 0 are negative,
  and an image with any uncertain finding is left out of classifier training (it still trains the
  generator, with a null label);
- 'mask_uncertain' (what paper 000, synthetic supplementation of chest X-rays, does): uncertain
  findings are masked out of the loss and metrics;
- 'ones' / 'zeros' (CheXpert's U-Ones / U-Zeros): uncertain counts as positive / negative.
"""
from __future__ import annotations

import numpy as np

from synth_med.errors import SynthMedError

LABEL_POLICIES = ("drop_uncertain", "mask_uncertain", "ones", "zeros")
UNCERTAIN = -1


def apply_label_policy(raw: np.ndarray, policy: str) -> tuple[np.ndarray, np.ndarray]:
  """raw int[B, K] in {1, 0, -1 (uncertain)} (blank already mapped to 0) -> (label, mask) float32[B, K]."""
  raw = np.asarray(raw)
  if policy == "drop_uncertain" or policy == "zeros":
    return (raw == 1).astype(np.float32), np.ones(raw.shape, np.float32)
  if policy == "mask_uncertain":
    return (raw == 1).astype(np.float32), (raw != UNCERTAIN).astype(np.float32)
  if policy == "ones":
    return (raw != 0).astype(np.float32), np.ones(raw.shape, np.float32)
  raise SynthMedError(f"data.label_policy={policy!r} is unknown; choose one of {list(LABEL_POLICIES)}.")


def usable_for_classifier(raw: np.ndarray, policy: str) -> np.ndarray:
  """bool[B]: under 'drop_uncertain' an image with any uncertain finding does not train the classifier."""
  raw = np.asarray(raw)
  if policy == "drop_uncertain":
    return ~(raw == UNCERTAIN).any(axis=1)
  return np.ones(raw.shape[0], bool)
