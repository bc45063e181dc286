"""Paired comparisons of a method against the real-data baseline: mean difference, bootstrap CI, U test.

Every classifier run of a study is evaluated on the same test images, and
method and baseline share seeds, so the comparison is paired twice:

- the point estimate is the mean over seeds s of metric(method, s) -
  metric(baseline, s) on all test images;
- the 95 % CI is a percentile bootstrap that resamples, in each replicate, the
  seeds (one index list for both sides) and the test images (one multiset for
  every run and both sides), and recomputes every metric on that resample;
- the Mann-Whitney U p-value (scipy) compares the per-seed values of the two
  sides, as papers 000 (Khosravi et al.) and 001 (DuMont Schütte et al.) report.

Image resamples are count vectors W[b, i] (how often image i is drawn in
replicate b), so each metric is computed for all replicates at once as a
weighted statistic; with W = 1 it equals `evaluation.metrics` on the whole
split (tested). A fairness gap is best minus worst group over the groups of
the attribute that have at least `min_group_size` images in the split.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats

from synth_med.evaluation.metrics import Predictions, topk_hits
from synth_med.infra import artifacts

LOWER_IS_BETTER = ("gap",)
PREDICTIONS_FILE = "predictions.npz"  # a classifier run's per-example outputs of every split


def resample_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
  """float64[n_boot, n]: multiplicities of n images drawn with replacement, per replicate."""
  idx = rng.integers(0, n, (n_boot, n))
  counts = np.zeros((n_boot, n), np.float64)
  np.add.at(counts, (np.arange(n_boot)[:, None], idx), 1.0)
  return counts


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def weighted_auc(scores: np.ndarray, positive: np.ndarray, w: np.ndarray) -> np.ndarray:
  """ROC-AUC per row of weights w[B, N] (ties count one half); NaN where a class has no weight."""
  order = np.argsort(scores, kind="stable")
  s, pos, w = scores[order], positive[order], w[:, order]
  wp, wn = w * pos, w * ~pos
  # Negatives strictly below each image, and negatives tied with it, via the runs of equal scores.
  starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
  run = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(s)]))
  neg_run = np.add.reduceat(wn, starts, axis=1) if len(s) else np.zeros((len(w), 0))
  below = np.cumsum(neg_run, axis=1) - neg_run
  num = (wp * (below[:, run] + 0.5 * neg_run[:, run])).sum(1)
  return _ratio(num, wp.sum(1) * wn.sum(1))


def metric_values(name: str, p: Predictions, w: np.ndarray, label_kind: str,
                  high_risk: Sequence[int] = ()) -> np.ndarray:
  """The headline metric `name` for each row of image weights w[B, N] (NaN where undefined)."""
  if name.startswith("top") and name[3:].isdigit():
    hits = topk_hits(p, int(name[3:])).astype(np.float64)
    return _ratio(w @ hits, w.sum(1))
  if name.startswith("balanced_top"):
    hits = topk_hits(p, int(name[len("balanced_top"):])).astype(np.float64)
    y = p.true_class
    per = np.stack([_ratio(w[:, y == c] @ hits[y == c], w[:, y == c].sum(1)) for c in np.unique(y)], 1)
    with np.errstate(invalid="ignore"):
      return np.nanmean(per, axis=1) if per.size else np.full(len(w), np.nan)
  if name == "high_risk_sensitivity":
    hits = topk_hits(p, 3).astype(np.float64)
    hr = np.isin(p.true_class, np.asarray(high_risk, int)).astype(np.float64)
    return _ratio(w @ (hits * hr), w @ hr)
  if name == "accuracy":
    hits = ((p.probs[:, 0] > 0.5) == (p.label[:, 0] > 0.5)).astype(np.float64)
    return _ratio(w @ hits, w.sum(1))
  if name == "auc":
    known = p.label_mask[:, 0] > 0
    return weighted_auc(p.probs[:, 0], p.label[:, 0] > 0.5, w * known)
  if name == "mean_auc":
    cols = [weighted_auc(p.probs[:, c], p.label[:, c] > 0.5, w * (p.label_mask[:, c] > 0))
            for c in range(p.label.shape[1])]
    per = np.stack(cols, 1)
    with np.errstate(invalid="ignore"):
      out = np.nanmean(per, axis=1)
    return out
  raise ValueError(f"no paired statistic for metric {name!r}")


def gap_values(metric: str, p: Predictions, w: np.ndarray, attr: np.ndarray, min_group_size: int,
               label_kind: str, high_risk: Sequence[int] = ()) -> np.ndarray:
  """Best minus worst group of `metric` per row of w, over the groups with >= min_group_size images."""
  groups = [g for g in np.unique(attr[attr >= 0]) if (attr == g).sum() >= min_group_size]
  if len(groups) < 2:
    return np.full(len(w), np.nan)
  per = np.stack([metric_values(metric, p, w * (attr == g), label_kind, high_risk) for g in groups], 1)
  with np.errstate(invalid="ignore"):
    return np.nanmax(per, 1) - np.nanmin(per, 1)


def verdict(ci: Sequence[float] | None, lower_is_better: bool) -> str:
  """'better' / 'worse' when the CI excludes 0, else 'no detectable difference'."""
  if ci is None or not np.all(np.isfinite(ci)):
    return "undefined"
  lo, hi = ci
  if lo > 0:
    return "worse" if lower_is_better else "better"
  if hi < 0:
    return "better" if lower_is_better else "worse"
  return "no detectable difference"


def compare(method: Sequence[Predictions], reference: Sequence[Predictions], metrics: Sequence[str],
            gap_metric: str, attribute: str, label_kind: str, high_risk: Sequence[int] = (),
            min_group_size: int = 20, n_boot: int = 1000, seed: int = 0, level: float = 0.95
            ) -> dict[str, Any]:
  """Paired comparison of per-seed runs (method[s] and reference[s] share seed s and the test images).

  Returns {metric or 'gap': {'diff', 'ci', 'p_mann_whitney', 'verdict', 'method', 'reference'}}.
  """
  if len(method) != len(reference) or not method:
    raise ValueError(f"paired comparison needs the same seeds on both sides ({len(method)} vs {len(reference)})")
  n = len(reference[0].label)
  for p in list(method) + list(reference):
    if len(p.label) != n or not np.array_equal(p.label, reference[0].label):
      raise ValueError("paired comparison needs every run evaluated on the same test images in the same order")
  rng = np.random.default_rng(seed)
  counts = resample_counts(n, n_boot, rng)
  seed_idx = rng.integers(0, len(method), (n_boot, len(method)))
  full = np.ones((1, n))
  attr = reference[0].attrs.get(attribute)
  out: dict[str, Any] = {}
  for name in list(metrics) + ["gap"]:
    if name == "gap":
      if attr is None:
        continue
      fn = lambda p, w: gap_values(gap_metric, p, w, attr, min_group_size, label_kind, high_risk)  # noqa: E731
    else:
      fn = lambda p, w, m=name: metric_values(m, p, w, label_kind, high_risk)  # noqa: E731
    point_m = np.array([fn(p, full)[0] for p in method])
    point_r = np.array([fn(p, full)[0] for p in reference])
    boot_m = np.stack([fn(p, counts) for p in method], 1)  # [B, seeds]
    boot_r = np.stack([fn(p, counts) for p in reference], 1)
    rows = np.arange(n_boot)[:, None]
    with warnings.catch_warnings():  # a gap undefined on a split (one group) is all-NaN: no CI
      warnings.simplefilter("ignore", RuntimeWarning)
      diffs = np.nanmean(boot_m[rows, seed_idx] - boot_r[rows, seed_idx], axis=1)
    diffs = diffs[np.isfinite(diffs)]
    a = (1.0 - level) / 2.0
    ci = [float(np.quantile(diffs, a)), float(np.quantile(diffs, 1 - a))] if len(diffs) >= n_boot // 2 else None
    ok = np.isfinite(point_m) & np.isfinite(point_r)
    diff = float(np.mean(point_m[ok] - point_r[ok])) if ok.any() else None
    p_u = None
    if np.isfinite(point_m).sum() >= 2 and np.isfinite(point_r).sum() >= 2:
      p_u = float(stats.mannwhitneyu(point_m[np.isfinite(point_m)], point_r[np.isfinite(point_r)],
                                     alternative="two-sided").pvalue)
    out[name] = {"diff": diff, "ci": ci, "p_mann_whitney": p_u,
                 "verdict": verdict(ci, name in LOWER_IS_BETTER),
                 "method": _mean_or_none(point_m), "reference": _mean_or_none(point_r)}
  return out


def _mean_or_none(v: np.ndarray) -> float | None:
  v = v[np.isfinite(v)]
  return float(v.mean()) if len(v) else None


def save_predictions(path: str, splits: Mapping[str, Predictions]) -> None:
  """Per-example predictions of one run, every split, in one npz ('{split}/probs', '{split}/attrs/{a}', ...)."""
  arrays = {}
  for split, p in splits.items():
    arrays[f"{split}/probs"] = np.asarray(p.probs, np.float32)
    arrays[f"{split}/label"] = np.asarray(p.label, np.float32)
    arrays[f"{split}/label_mask"] = np.asarray(p.label_mask, np.float32)
    for a, v in p.attrs.items():
      arrays[f"{split}/attrs/{a}"] = np.asarray(v, np.int32)
  artifacts.atomic_write(path, lambda f: np.savez_compressed(f, **arrays), mode="wb", suffix=".npz")


def load_predictions(path: str) -> dict[str, Predictions]:
  """The inverse of `save_predictions`."""
  with np.load(path) as z:
    data = {k: z[k] for k in z.files}
  out = {}
  for split in sorted({k.split("/", 1)[0] for k in data}):
    attrs = {k.split("/", 2)[2]: v for k, v in data.items() if k.startswith(f"{split}/attrs/")}
    out[split] = Predictions(label=data[f"{split}/label"], label_mask=data[f"{split}/label_mask"],
                             probs=data[f"{split}/probs"], attrs=attrs)
  return out
