"""Aggregates a study's classifier runs: mean +- std over seeds of the headline metrics and gaps."""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from synth_med.evaluation.paired import PREDICTIONS_FILE, compare, load_predictions
from synth_med.infra import artifacts

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


def comparisons(workdir: str, res: dict[str, Any], reference: str, methods: Sequence[str], seeds: int,
                min_group_size: int, n_boot: int, seed: int = 0) -> dict[str, Any]:
  """Every method against `reference` (the real-data baseline), per split, paired over the seeds both
  finished (`evaluation.paired.compare`): {method: {split: {metric or 'gap': {...}}}}."""
  def run_dir(m: str, s: int) -> str:
    return os.path.join(workdir, "classifiers", m, f"seed{s}")

  def finished(m: str, s: int) -> bool:
    return all(os.path.exists(os.path.join(run_dir(m, s), f)) for f in ("metrics.json", PREDICTIONS_FILE))

  ref_seeds = [s for s in range(seeds) if finished(reference, s)]
  if not ref_seeds:
    return {}
  info = artifacts.read_json(os.path.join(run_dir(reference, ref_seeds[0]), "metrics.json"))
  kind = info.get("label_kind", "softmax")
  high_risk = [info["classes"].index(c) for c in info.get("high_risk", [])]
  cache: dict[tuple[str, int], Any] = {}

  def preds(m: str, s: int):
    if (m, s) not in cache:
      cache[(m, s)] = load_predictions(os.path.join(run_dir(m, s), PREDICTIONS_FILE))
    return cache[(m, s)]

  out: dict[str, Any] = {}
  for m in methods:
    if m == reference:
      continue
    shared = [s for s in ref_seeds if finished(m, s)]
    if not shared:
      continue
    out[m] = {"seeds": len(shared)}
    for split in res["splits"]:
      out[m][split] = compare([preds(m, s)[split] for s in shared], [preds(reference, s)[split] for s in shared],
                              res["metrics"], res["gap_metric"], res["attribute"], kind, high_risk,
                              min_group_size, n_boot, seed)
  return out


def comparison_row_name(name: str, entry: dict[str, Any]) -> str:
  """A comparison's row: the method, and '(vs X)' when it is compared with X rather than the reference (a row
  named '<method> vs X' says so already)."""
  other = entry.get("against")
  return f"{name} (vs {other})" if other and not name.endswith(f" vs {other}") else name


def comparison_table(res: dict[str, Any]) -> str:
  """Plain text: per method and split, the paired difference to the reference with its CI and verdict."""
  comps = res.get("comparisons", {})
  if not comps:
    return ""
  lines = [f"paired differences to {res.get('reference', 'real')!r} (mean over seeds, 95 % bootstrap CI over "
           "seeds and test images; Mann-Whitney U p over seeds):"]
  for m, entry in comps.items():
    for split in res["splits"]:
      cells = []
      for name, c in entry.get(split, {}).items():
        if c["diff"] is None:
          continue
        ci = "n/a" if c["ci"] is None else f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]"
        pu = "n/a" if c["p_mann_whitney"] is None else f"{c['p_mann_whitney']:.2g}"
        cells.append(f"{name} {c['diff']:+.3f} {ci} p={pu} {c['verdict']}")
      lines.append(f"  {comparison_row_name(m, entry)} [{split}]: " + "; ".join(cells))
  return "\n".join(lines)
