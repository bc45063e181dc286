"""Distances between sets of classifier features: MMD (002 F.3, G.3.2), PCA compression (G.3.3),
FID and precision / recall (Kynkäänniemi et al. 2019)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import linalg, stats
from sklearn.decomposition import PCA

VARIANCE_FRACTIONS = (0.6, 0.7, 0.8, 0.9, 0.95)  # Fig. G8


def _cubic_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """K(u, z) = (uᵀz / d + 1)³: the cubic polynomial kernel (F.3), scaled by the feature dimension d."""
  return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2(u: np.ndarray, z: np.ndarray) -> float:
  """002 Eq. 7: the unbiased MMD² estimate between samples u [N, d] and z [M, d] (cubic kernel)."""
  u, z = np.asarray(u, np.float64), np.asarray(z, np.float64)
  n, m = len(u), len(z)
  kuu, kzz, kuz = _cubic_kernel(u, u), _cubic_kernel(z, z), _cubic_kernel(u, z)
  return float((kuu.sum() - np.trace(kuu)) / (n * (n - 1)) + (kzz.sum() - np.trace(kzz)) / (m * (m - 1))
               - 2.0 * kuz.mean())


def mmd_estimates(a: np.ndarray, b: np.ndarray, subsets: int = 30, size: int = 300, seed: int = 0) -> np.ndarray:
  """S MMD² estimates between random subsets of N rows of a and of b (F.3: S = 30, N = 300); N shrinks
  to the smaller set's size when a set is smaller (disjoint halves when a is b)."""
  rng = np.random.default_rng(seed)
  same = a is b
  n = min(size, len(a) // 2 if same else len(a), len(b) // 2 if same else len(b))
  if n < 2:
    return np.zeros(0)
  out = []
  for _ in range(subsets):
    if same:
      idx = rng.permutation(len(a))
      out.append(mmd2(a[idx[:n]], a[idx[n:2 * n]]))
    else:
      out.append(mmd2(a[rng.choice(len(a), n, replace=False)], b[rng.choice(len(b), n, replace=False)]))
  return np.array(out)


def mmd_test(reference: np.ndarray, heldout: np.ndarray, other: np.ndarray, subsets: int = 30, size: int = 300,
             seed: int = 0) -> dict[str, Any]:
  """Is `other` further from `reference` than held-out samples of the same distribution are?

  S MMD² estimates of reference vs heldout against S of reference vs other, and the two-sided
  Mann-Whitney U test between the two sets (F.3); `ratio` is mean(other) / mean(heldout)."""
  same = mmd_estimates(reference, heldout, subsets, size, seed)
  diff = mmd_estimates(reference, other, subsets, size, seed + 1)
  if len(same) == 0 or len(diff) == 0:
    return {"mmd_heldout": None, "mmd_other": None, "p_mann_whitney": None, "n": 0}
  p = float(stats.mannwhitneyu(diff, same, alternative="two-sided").pvalue)
  n = min(size, len(reference), len(heldout), len(other))
  return {"mmd_heldout": float(same.mean()), "mmd_other": float(diff.mean()),
          "ratio": float(diff.mean() / same.mean()) if same.mean() > 0 else None, "p_mann_whitney": p, "n": n}


def components_for_variance(features: np.ndarray, fractions: Sequence[float] = VARIANCE_FRACTIONS,
                            max_rows: int = 2000, seed: int = 0) -> dict[str, int]:
  """G.3.3: the number of principal components that explain each fraction of the variance."""
  rng = np.random.default_rng(seed)
  x = np.asarray(features, np.float64)
  if len(x) > max_rows:
    x = x[rng.choice(len(x), max_rows, replace=False)]
  explained = np.cumsum(PCA(random_state=seed).fit(x).explained_variance_ratio_)
  return {f"{f:g}": int(np.searchsorted(explained, f - 1e-12) + 1) for f in fractions}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """FID's Fréchet distance between Gaussians fitted to feature sets a and b."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  mu_a, mu_b = a.mean(0), b.mean(0)
  ridge = 1e-6 * np.eye(a.shape[1])  # fewer samples than dimensions leave a covariance singular
  ca, cb = np.cov(a, rowvar=False) + ridge, np.cov(b, rowvar=False) + ridge
  covmean, _ = linalg.sqrtm(ca @ cb, disp=False)
  if np.iscomplexobj(covmean):
    covmean = covmean.real
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(ca) + np.trace(cb) - 2.0 * np.trace(covmean))


def _radii(x: np.ndarray, k: int) -> np.ndarray:
  """Distance of each row of x to its k-th nearest other row."""
  d = _sq_dists(x, x)
  np.fill_diagonal(d, np.inf)
  return np.sqrt(np.sort(d, axis=1)[:, k - 1])


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2.0 * a @ b.T, 0.0)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, max_rows: int = 2000, seed: int = 0
                     ) -> dict[str, float]:
  """Kynkäänniemi et al. (2019): precision = share of fake samples inside the real manifold (the union
  of balls to each real sample's k-th neighbour), recall = share of real samples inside the fake one."""
  rng = np.random.default_rng(seed)
  real, fake = (np.asarray(x, np.float64) for x in (real, fake))
  real = real[rng.choice(len(real), min(max_rows, len(real)), replace=False)]
  fake = fake[rng.choice(len(fake), min(max_rows, len(fake)), replace=False)]
  r_real, r_fake = _radii(real, k), _radii(fake, k)
  d = np.sqrt(_sq_dists(fake, real))  # [fake, real]
  precision = float(np.mean((d <= r_real[None]).any(1)))
  recall = float(np.mean((d.T <= r_fake[None]).any(1)))
  return {"precision": precision, "recall": recall}
