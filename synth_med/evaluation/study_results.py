"""Aggregates a study's classifier runs: mean +- std over seeds of the headline metrics and gaps."""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from synth_med.experiments import artifacts

# Headline metrics per world (002 App. F) and the metric whose best-worst gap is the fairness gap.
HEADLINE = {"skin": ("top3", "high_risk_sensitivity", "balanced_top3"), "chest": ("mean_auc",),
            "tissue": ("accuracy",)}
GAP_METRIC = {"skin": "top3", "chest": "mean_auc", "tissue": "accuracy"}


def headline_metrics(workdir: str, methods: Sequence[str], seeds: int, world: str) -> tuple[list[str], str]:
  """The modality's headline metrics that the runs report; for a real or CSV data set whose label kind
  differs from the modality's (e.g. a binary skin set), the first of top1 / mean_auc / accuracy present."""
  present: set[str] = set()
  num_classes = None
  for m in methods:
    for s in range(seeds):
      path = os.path.join(workdir, "classifiers", m, f"seed{s}", "metrics.json")
      if os.path.exists(path):
        run = artifacts.read_json(path)
        present |= set(next(iter(v for k, v in run["splits"].items() if k != "val"), {}).get("overall", {}))
        num_classes = len(run.get("classes", []))
        break
    if present:
      break
  if not present:
    return list(HEADLINE[world]), GAP_METRIC[world]
  headline = list(HEADLINE[world])
  if num_classes is not None and num_classes <= 3:  # top-3 of <= 3 classes is always right
    headline = [h.replace("top3", "top1") for h in headline]
  metrics = [m for m in headline if m in present]
  if not metrics:
    metrics = [next((m for m in ("top1", "mean_auc", "accuracy") if m in present), sorted(present)[0])]
  gap = GAP_METRIC[world].replace("top3", "top1") if "top1" in metrics and "top3" not in metrics else GAP_METRIC[world]
  return metrics, gap if gap in metrics else metrics[0]


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
  vals = [float(v) for v in values if v is not None]
  if not vals:
    return {"mean": None, "std": None, "n": 0, "values": []}
  return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
          "n": len(vals), "values": vals}


def aggregate(config: Any, workdir: str, methods: Sequence[str], seeds: int) -> dict[str, Any]:
  """results.json: per method and split, mean/std/values over seeds of each headline metric and of
  the fairness gap (best - worst group of `generate.attribute`) of the gap metric."""
  world = str(config.data.world)
  attr = str(config.generate.attribute)
  metrics, gap_metric = headline_metrics(workdir, methods, seeds, world)
  out: dict[str, Any] = {"world": world, "attribute": attr, "metrics": list(metrics), "gap_metric": gap_metric,
                         "seeds": seeds, "splits": [], "methods": {}, "missing": []}
  for m in methods:
    runs = []
    for s in range(seeds):
      path = os.path.join(workdir, "classifiers", m, f"seed{s}", "metrics.json")
      if os.path.exists(path):
        runs.append(artifacts.read_json(path))
      else:
        out["missing"].append(f"{m}/seed{s}")
    if not runs:
      continue
    splits = [s for s in runs[0]["splits"] if s != "val"]
    out["splits"] = out["splits"] or splits
    entry: dict[str, Any] = {"mix": runs[0].get("mix", {})}
    for split in splits:
      per = {}
      for metric in metrics:
        per[metric] = _stats([r["splits"][split]["overall"].get(metric) for r in runs])
      per["gap"] = _stats([r["splits"][split].get("gaps", {}).get(attr, {}).get(gap_metric, {}).get("gap")
                           for r in runs])
      entry[split] = per
    entry["wall_time_s"] = _stats([r.get("wall_time_s", {}).get("total") for r in runs])
    out["methods"][m] = entry
  return out


def fmt(stat: dict[str, Any]) -> str:
  if stat.get("mean") is None:
    return "n/a"
  return f"{stat['mean']:.3f}±{stat['std']:.3f}"


def results_table(res: dict[str, Any]) -> str:
  """A plain-text table: one row per method, mean±std per split and metric (and the gap)."""
  cols = [(s, m) for s in res["splits"] for m in list(res["metrics"]) + ["gap"]]
  head = ["method"] + [f"{s}:{m}" for s, m in cols]
  rows = [[name] + [fmt(entry[s][m]) for s, m in cols] for name, entry in res["methods"].items()]
  widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
  line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
  text = [f"{res['world']}: mean±std over {res['seeds']} seeds; gap = best-worst {res['attribute']} "
          f"group on {res['gap_metric']}", line(head)] + [line(r) for r in rows]
  if res.get("missing"):
    text.append(f"missing runs: {res['missing']}")
  return "\n".join(text)
