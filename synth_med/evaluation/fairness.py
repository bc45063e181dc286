"""Per-group metrics, fairness gaps, bootstrap CIs and the Beta posterior (002 App. F.2).

Disaggregation goes through fairlearn's `MetricFrame`: the metrics here take row indices, so
MetricFrame hands each subgroup's rows to the same functions that compute the overall value, and
its bootstrap gives the per-group CIs.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import numpy as np
from fairlearn.metrics import MetricFrame

from synth_med.evaluation.metrics import Metric


def _nan_to_none(v: Any) -> float | None:
  return None if v is None or not np.isfinite(v) else float(v)


def _defined(metrics: Mapping[str, Metric]) -> dict[str, Any]:
  """The metrics as MetricFrame functions of (row indices, row indices): NaN where undefined."""
  return {name: (lambda yt, yp, f=fn: np.nan if f(np.asarray(yt)) is None else f(np.asarray(yt)))
          for name, fn in metrics.items()}


def per_group(metrics: Mapping[str, Metric], attr: np.ndarray, value_names: Sequence[str],
              min_group_size: int, bootstrap: int, seed: int, level: float = 0.95) -> dict[str, Any]:
  """{value name: {'n', 'small', metric: {'value', 'ci'}}} for the known values of attr.

  The CIs are fairlearn's bootstrap (`MetricFrame(n_boot=bootstrap, ci_quantiles=...)`): the rows are
  resampled with replacement `bootstrap` times and each group's metric recomputed; a CI is None where
  the metric is undefined in the data or in any resample (e.g. a group's AUC with one class).
  """
  known = attr >= 0
  rows = np.nonzero(known)[0]
  if len(rows) == 0:
    return {}
  a = (1.0 - level) / 2.0
  boot = {"n_boot": int(bootstrap), "ci_quantiles": [a, 1.0 - a], "random_state": int(seed)} if bootstrap > 0 else {}
  with warnings.catch_warnings():  # an undefined metric is NaN in every resample: its CI is None below
    warnings.simplefilter("ignore", RuntimeWarning)
    mf = MetricFrame(metrics=_defined(metrics), y_true=rows, y_pred=rows, sensitive_features={"g": attr[rows]},
                     **boot)
  lo, hi = mf.by_group_ci if bootstrap > 0 else (None, None)
  out: dict[str, Any] = {}
  for code in sorted(np.unique(attr[rows])):
    n = int(np.sum(attr[rows] == code))
    entry: dict[str, Any] = {"n": n, "small": bool(n < min_group_size)}
    for name in metrics:
      value = _nan_to_none(mf.by_group.loc[code, name])
      ci = None
      if lo is not None and value is not None:
        bounds = [_nan_to_none(lo.loc[code, name]), _nan_to_none(hi.loc[code, name])]
        ci = bounds if None not in bounds else None
      entry[name] = {"value": value, "ci": ci}
    out[value_names[int(code)]] = entry
  return out


def gaps(metrics: Mapping[str, Metric], attr: np.ndarray, value_names: Sequence[str],
         min_group_size: int) -> dict[str, Any]:
  """Best minus worst group per metric (fairlearn's `MetricFrame.difference()` between groups) over
  the known groups of attr with at least `min_group_size` rows where the metric is defined.

  Binary attributes also get the signed difference second-minus-first value
  (e.g. male - female), as 002 G10 reports the sex gap.
  """
  known = np.nonzero(attr >= 0)[0]
  codes, counts = np.unique(attr[known], return_counts=True)
  big = [int(c) for c, n in zip(codes, counts) if n >= min_group_size]
  rows = known[np.isin(attr[known], big)]
  by_group, difference = None, None
  if len(rows):
    mf = MetricFrame(metrics=_defined(metrics), y_true=rows, y_pred=rows, sensitive_features={"g": attr[rows]})
    by_group, difference = mf.by_group, mf.difference(method="between_groups")
  out = {}
  for m in metrics:
    vals = {} if by_group is None else {value_names[int(c)]: float(v) for c, v in by_group[m].items() if np.isfinite(v)}
    two = len(vals) >= 2
    entry: dict[str, Any] = {"gap": float(difference[m]) if two else None,
                             "best": max(vals, key=vals.get) if two else None,
                             "worst": min(vals, key=vals.get) if two else None}
    if len(codes) == 2 and len(vals) == 2:
      first, second = (value_names[int(c)] for c in codes)
      entry["diff"] = {"of": f"{second}-{first}", "value": vals[second] - vals[first]}
    out[m] = entry
  return out


def beta_posterior(hits: np.ndarray, attr: np.ndarray, value_names: Sequence[str],
                   samples: int = 100_000, seed: int = 0) -> dict[str, Any]:
  """002 App. F.2: group (A=a) vs outgroup (A!=a) performance difference.

  Each side's hit rate gets a Beta(1, 1) prior and a Beta(1+k, 1+n-k)
  posterior; `samples` draws of the difference give its mean (the central best
  estimate), std and a 95 % interval.
  """
  rng = np.random.default_rng(seed)
  known = attr >= 0
  out = {}
  for code in sorted(np.unique(attr[known])):
    g = known & (attr == code)
    o = known & (attr != code)
    kg, ng, ko, no = int(hits[g].sum()), int(g.sum()), int(hits[o].sum()), int(o.sum())
    if ng == 0 or no == 0:
      continue
    d = rng.beta(1 + kg, 1 + ng - kg, samples) - rng.beta(1 + ko, 1 + no - ko, samples)
    out[value_names[int(code)]] = {"mean": float(d.mean()), "std": float(d.std()),
                                   "ci": [float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))],
                                   "n_group": ng, "n_outgroup": no}
  return out
