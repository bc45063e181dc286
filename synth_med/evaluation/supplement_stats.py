"""Paper 000's statistics ("conditional DDPM supplementation of chest X-rays", Khosravi et al.):
per-finding AUROC with 1,000-fold bootstrap CIs, paired t-tests between models over the same
bootstrap resamples with a Bonferroni correction over the findings, and the Pearson correlation
between the findings' co-occurrence matrices of two label sets.

The paired t-test over bootstrap replicates is 000's choice; replicates are not independent
samples, so its p-values are smaller than a test over seeds would give (`evaluation.paired`
gives that one).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import stats

from synth_med.evaluation.metrics import Predictions
from synth_med.evaluation.paired import resample_counts, weighted_auc


def cooccurrence(labels: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  """000 Figs. E1-E3: M[r, c] = the share of examples with finding r that also have finding c (NaN
  for a finding no example has). Unknown labels (mask 0) count as absent."""
  y = np.asarray(labels) > 0.5
  if mask is not None:
    y &= np.asarray(mask) > 0
  y = y.astype(np.float64)
  joint = y.T @ y
  totals = np.diag(joint)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(totals[:, None] > 0, joint / np.where(totals[:, None] > 0, totals[:, None], 1.0), np.nan)


def cooccurrence_correlation(a: np.ndarray, b: np.ndarray) -> float | None:
  """Pearson's r between two co-occurrence matrices over the entries both define."""
  ok = np.isfinite(a) & np.isfinite(b)
  if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
    return None
  return float(stats.pearsonr(a[ok], b[ok])[0])


def bonferroni(p_values: Sequence[float | None]) -> list[float | None]:
  """Each p times the number of tests made (None entries are not tests), capped at 1."""
  m = sum(p is not None for p in p_values)
  return [None if p is None else min(1.0, float(p) * m) for p in p_values]


def _known(p: Predictions, column: int) -> tuple[np.ndarray, np.ndarray]:
  keep = p.label_mask[:, column] > 0
  return keep, p.label[:, column] > 0.5


def finding_aucs(p: Predictions, names: Sequence[str], n_boot: int = 1000, seed: int = 0, level: float = 0.95
                 ) -> dict[str, Any]:
  """{finding: {auc, ci, prevalence}} and 'macro' (the mean of the defined findings' AUROCs, with its CI
  from the same resamples): 000's 1,000 bootstrap resamples of the test set (n_boot = 0: no CIs)."""
  rng = np.random.default_rng(seed)
  counts = resample_counts(len(p.label), n_boot, rng)
  a = (1.0 - level) / 2.0
  out: dict[str, Any] = {}
  boots = []
  for c, name in enumerate(names):
    keep, y = _known(p, c)
    point = weighted_auc(p.probs[keep, c], y[keep], np.ones((1, int(keep.sum()))))[0]
    boot = weighted_auc(p.probs[keep, c], y[keep], counts[:, keep])
    ok = np.isfinite(boot)
    has_ci = n_boot > 0 and ok.sum() > n_boot // 2
    out[name] = {"auc": None if not np.isfinite(point) else float(point),
                 "ci": [float(np.quantile(boot[ok], a)), float(np.quantile(boot[ok], 1 - a))] if has_ci else None,
                 "prevalence": float(y[keep].mean()) if keep.any() else None}
    if np.isfinite(point):
      boots.append(boot)
  out["macro"] = {"auc": None, "ci": None}  # no finding defined (one class only in every column)
  if boots:
    points = [e["auc"] for name, e in out.items() if name != "macro" and e["auc"] is not None]
    out["macro"] = {"auc": float(np.mean(points)), "ci": None}
    if n_boot > 0:
      macro = np.nanmean(np.stack(boots), 0)
      out["macro"]["ci"] = [float(np.quantile(macro, a)), float(np.quantile(macro, 1 - a))]
  return out


def paired_finding_tests(method: Predictions, reference: Predictions, names: Sequence[str], n_boot: int = 1000,
                         seed: int = 0) -> dict[str, Any]:
  """Per finding: AUROC(method) − AUROC(reference) and the paired t-test between their AUROCs over the same
  n_boot resamples of the test set (000), with Bonferroni-corrected p-values over the findings tested."""
  if len(method.label) != len(reference.label) or not np.array_equal(method.label, reference.label):
    raise ValueError("paired tests need both models' outputs on the same test images in the same order")
  rng = np.random.default_rng(seed)
  counts = resample_counts(len(reference.label), n_boot, rng)
  rows: dict[str, Any] = {}
  for c, name in enumerate(names):
    keep, y = _known(reference, c)
    am = weighted_auc(method.probs[keep, c], y[keep], counts[:, keep])
    ar = weighted_auc(reference.probs[keep, c], y[keep], counts[:, keep])
    ok = np.isfinite(am) & np.isfinite(ar)
    if ok.sum() < 2 or np.all(am[ok] == ar[ok]):
      rows[name] = {"diff": None, "p": None}
      continue
    rows[name] = {"diff": float(np.mean(am[ok] - ar[ok])), "p": float(stats.ttest_rel(am[ok], ar[ok]).pvalue)}
  for name, p_adj in zip(rows, bonferroni([r["p"] for r in rows.values()])):
    rows[name]["p_bonferroni"] = p_adj
  return rows
