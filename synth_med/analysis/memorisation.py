"""Does the generator copy its training images? (002 §3.3 and Fig. 9; paper 001's cosine on features.)

For each synthetic image, the nearest training image in pixel ℓ2 and, where classifier features are
given, in feature cosine distance. Real test images give the reference: how close does an image the
generator never saw come to the training set? A synthetic image closer to a training image than
every test image is (below the smallest test-to-train distance) is flagged as a likely copy.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def _pixels(images: np.ndarray) -> np.ndarray:
  return np.asarray(images, np.float32).reshape(len(images), -1) / 255.0


def nearest(queries: np.ndarray, keys: np.ndarray, metric: str, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
  """(distance, index) of each query's nearest key: metric 'l2' (Euclidean) or 'cosine' (1 − cos)."""
  q, k = np.asarray(queries, np.float32), np.asarray(keys, np.float32)
  if metric == "cosine":
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    k = k / np.maximum(np.linalg.norm(k, axis=1, keepdims=True), 1e-12)
  elif metric != "l2":
    raise ValueError(f"metric {metric!r}; choose 'l2' or 'cosine'")
  k_sq = (k * k).sum(1)
  dist, idx = np.empty(len(q), np.float32), np.empty(len(q), np.int64)
  for s in range(0, len(q), chunk):
    block = q[s:s + chunk]
    if metric == "cosine":
      d = 1.0 - block @ k.T
    else:
      d = np.sqrt(np.maximum((block * block).sum(1)[:, None] + k_sq[None] - 2.0 * block @ k.T, 0.0))
    idx[s:s + chunk] = d.argmin(1)
    dist[s:s + chunk] = d[np.arange(len(block)), idx[s:s + chunk]]
  return dist, idx


def _rows(x: np.ndarray, metric: str) -> np.ndarray:
  """Images as pixel rows in [0, 1] for 'l2'; features as they are for 'cosine'."""
  return _pixels(x) if metric == "l2" else np.asarray(x, np.float32)


def reference_distances(test: np.ndarray, train: np.ndarray, metric: str = "l2") -> np.ndarray:
  """Each test row's distance to its nearest training row: the reference every store is held to."""
  return nearest(_rows(test, metric), _rows(train, metric), metric)[0]


def copy_check(synthetic: np.ndarray, train: np.ndarray, test: np.ndarray | None = None, metric: str = "l2",
               reference: np.ndarray | None = None) -> dict[str, Any]:
  """Nearest-training distances of synthetic and of test rows (images, or features with 'cosine').

  `reference` is `reference_distances(test, train, metric)` when already computed (several stores against one
  training set). Returns the two distance distributions' quantiles, the threshold (the smallest
  test-to-train distance), the flagged fraction and the indices of the closest synthetic / training pairs."""
  s_dist, s_idx = nearest(_rows(synthetic, metric), _rows(train, metric), metric)
  t_dist = reference_distances(test, train, metric) if reference is None else reference
  threshold = float(t_dist.min())
  flagged = s_dist < threshold
  order = np.argsort(s_dist)
  qs = (0.0, 0.01, 0.05, 0.5)
  return {
      "metric": metric, "n_synthetic": int(len(s_dist)), "n_test": int(len(t_dist)),
      "threshold": threshold, "flagged_fraction": float(flagged.mean()), "flagged": int(flagged.sum()),
      "synthetic_quantiles": {f"{q:g}": float(np.quantile(s_dist, q)) for q in qs},
      "test_quantiles": {f"{q:g}": float(np.quantile(t_dist, q)) for q in qs},
      "closest_pairs": [[int(i), int(s_idx[i]), float(s_dist[i])] for i in order[:8]],
      "synthetic_distances": s_dist, "test_distances": t_dist,
  }
