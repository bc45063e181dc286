"""Hyper-parameter tuning on the baseline's ID validation split (002 App. E), held fixed for every method.

The study's `tune` stage trains the `tune.method` recipe (the real-data baseline)
once per point of `tune.grid`, scores each on `tune.split` (the ID validation
split) with `tune.metric`, and writes the best point to `<workdir>/tune/best.json`.
The classifiers stage then applies those values to every method and seed, so no
method is tuned on its own results or on the test splits.

`tune.grid` is a string, so it can be overridden on the command line:

    --config.tune.grid="train.optimizer.lr=0.01|0.03|0.1;train.steps=150|300"

(';' between keys, '|' between values; keys are paths in the classifier stage
config). An empty grid turns the stage off.
"""
from __future__ import annotations

import ast
import itertools
import os
from typing import Any

from synth_med.errors import SynthMedError
from synth_med.experiments import artifacts


def parse_grid(grid: str) -> list[tuple[str, list[Any]]]:
  """'a.b=1|2;c=x' -> [('a.b', [1, 2]), ('c', ['x'])]; values are Python literals or plain strings."""
  out = []
  for part in (p.strip() for p in str(grid).split(";")):
    if not part:
      continue
    if "=" not in part:
      raise SynthMedError(f"tune.grid part {part!r} has no '='; write key=value|value;key=value, e.g. "
                          "'train.optimizer.lr=0.01|0.03|0.1'.")
    key, values = (s.strip() for s in part.split("=", 1))
    vals = [_literal(v.strip()) for v in values.split("|") if v.strip()]
    if not key or not vals:
      raise SynthMedError(f"tune.grid part {part!r} needs a key and at least one value.")
    out.append((key, vals))
  return out


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def grid_points(grid: str) -> list[dict[str, Any]]:
  """Every combination of the grid's values, in order."""
  axes = parse_grid(grid)
  if not axes:
    return []
  keys = [k for k, _ in axes]
  return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in axes))]


def apply_overrides(config: Any, overrides: dict[str, Any]) -> None:
  """Sets dotted keys of an (unlocked) ConfigDict, refusing unknown keys and changed types."""
  for path, value in overrides.items():
    node = config
    parts = path.split(".")
    for p in parts[:-1]:
      if p not in node:
        raise SynthMedError(f"tune.grid key {path!r}: the classifier config has no {p!r}; "
                            f"choose from {sorted(node.keys())}.")
      node = node[p]
    leaf = parts[-1]
    if not hasattr(node, "keys") or leaf not in node:
      raise SynthMedError(f"tune.grid key {path!r} is not in the classifier config"
                          + (f"; {'.'.join(parts[:-1]) or 'it'} has {sorted(node.keys())}." if hasattr(node, "keys")
                             else "."))
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise SynthMedError(f"tune.grid key {path!r}: {value!r} does not fit the current value {old!r} "
                          f"({type(old).__name__}).") from e


def point_name(i: int, point: dict[str, Any]) -> str:
  slug = "_".join(f"{k.split('.')[-1]}{v}" for k, v in point.items())
  return f"p{i}_" + "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in slug)


def best_path(workdir: str) -> str:
  return os.path.join(workdir, "tune", "best.json")


def read_best(workdir: str) -> dict[str, Any] | None:
  """The tuned overrides written by the tune stage, or None if it has not finished."""
  path = best_path(workdir)
  return artifacts.read_json(path)["overrides"] if os.path.exists(path) else None


AUTO_METRICS = ("top1", "mean_auc", "accuracy")  # tune.metric='auto': the first the label kind reports


def score(metrics: dict[str, Any], split: str, metric: str) -> float | None:
  if metric == "auto":
    overall = metrics.get("splits", {}).get(split, {}).get("overall", {})
    metric = next((m for m in AUTO_METRICS if m in overall), metric)
  try:
    value = metrics["splits"][split]["overall"][metric]
  except KeyError as e:
    have = sorted(metrics.get("splits", {}).get(split, {}).get("overall", {}))
    raise SynthMedError(f"tune.metric={metric!r} on split {split!r} is not in the classifier's metrics "
                        f"({have or 'no such split'}); choose one of those.") from e
  return None if value is None else float(value)


def curve_of(metrics: dict[str, Any], metric: str) -> list[tuple[int, float]]:
  """[(step, value)] of a run's validation curve (metrics.json `val_curve`), undefined points left out."""
  out = []
  for point in metrics.get("val_curve", []):
    value = score({"splits": {"val": {"overall": point}}}, "val", metric)
    if value is not None:
      out.append((int(point["step"]), value))
  return out


def plateau_step(curve: list[tuple[int, float]], tolerance: float) -> int:
  """The first step whose value is within `tolerance` of the curve's best."""
  best = max(v for _, v in curve)
  return next(step for step, v in curve if v >= best - tolerance)


def widened(points: list[dict[str, Any]], best: dict[str, Any]) -> dict[str, Any] | None:
  """A new grid point one geometric step past the edge when `best` sits on the edge of a numeric axis
  with >= 2 values (e.g. lr 0.01|0.03|0.1 and 0.1 wins -> 0.3); None when it is inside on every axis."""
  for key, value in best.items():
    vals = sorted({p[key] for p in points if isinstance(p.get(key), (int, float)) and not isinstance(p[key], bool)})
    if len(vals) < 2 or value not in (vals[0], vals[-1]) or min(vals) <= 0:
      continue
    if value == vals[-1]:
      new = vals[-1] * (vals[-1] / vals[-2])
    else:
      new = vals[0] / (vals[1] / vals[0])
    new = int(round(new)) if isinstance(value, int) else float(f"{new:.4g}")
    return {**best, key: new}
  return None


def run_tuning(config: Any, workdir: str, classifier_config) -> bool:
  """The tune stage; `classifier_config(method, seed)` builds a method's stage config. Returns True if
  it was already finished (skipped).

  Every grid point trains `tune.seeds` seeds. With `tune.curve_every` > 0 each run also records its
  validation curve (every that many steps up to the classifier's train.steps); the point whose mean
  curve peaks highest wins, and `train.steps` becomes the first step at which that mean curve is within
  `tune.plateau` of its peak. A winner on the edge of a numeric axis adds the next value past it, up to
  `tune.widen` times; `best.json` says if it still sits on an edge.
  """
  from synth_med.experiments.classifier import run_classifier
  tune = config.tune
  points = grid_points(tune.grid)
  if not points:
    print("tune.grid is empty: no tuning; every method uses the classifier config as written", flush=True)
    return True
  if os.path.exists(best_path(workdir)):
    print(f"tuning finished earlier: {read_best(workdir)} ({best_path(workdir)})", flush=True)
    return True
  seeds, every = int(tune.seeds), int(tune.get("curve_every", 0))
  rows: list[dict[str, Any]] = []

  def run_point(i: int, point: dict[str, Any]) -> dict[str, Any]:
    scores, curves = [], []
    for s in range(seeds):
      c = classifier_config(str(tune.method), int(config.seed) + s)
      with c.unlocked():
        apply_overrides(c, point)
        if every > 0:
          c.train.eval_every = every
      folder = os.path.join(workdir, "tune", point_name(i, point), f"seed{s}")
      print(f"--- tuning point {i + 1}, seed {s}: {point} ---", flush=True)
      metrics = run_classifier(c, folder)
      scores.append(score(metrics, str(tune.split), str(tune.metric)))
      curves.append(dict(curve_of(metrics, str(tune.metric))) if every > 0 else {})
    defined = [v for v in scores if v is not None]
    row: dict[str, Any] = {"overrides": point, "scores": scores,
                           "mean": sum(defined) / len(defined) if defined else None}
    if every > 0:
      steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
      row["curve"] = [[st, sum(c[st] for c in curves) / len(curves)] for st in steps]
      row["peak"] = max((v for _, v in row["curve"]), default=None)
    return row

  for i, point in enumerate(points):
    rows.append(run_point(i, point))
  key = "peak" if every > 0 else "mean"
  widenings = 0
  while True:
    ok = [j for j in range(len(rows)) if rows[j][key] is not None]
    if not ok:
      raise SynthMedError(f"tuning: {tune.metric} on {tune.split} is undefined for every grid point "
                          "(e.g. a class missing from the split); choose another tune.metric.")
    best = max(ok, key=lambda j: rows[j][key])
    nxt = widened([r["overrides"] for r in rows], rows[best]["overrides"])
    if nxt is None or widenings >= int(tune.get("widen", 0)):
      break
    widenings += 1
    print(f"tuning: the best point {rows[best]['overrides']} is on the grid's edge; adding {nxt}", flush=True)
    rows.append(run_point(len(rows), nxt))
  overrides = dict(rows[best]["overrides"])
  summary: dict[str, Any] = {"method": str(tune.method), "split": str(tune.split), "metric": str(tune.metric),
                             "points": rows, "best": best, "widenings": widenings,
                             "on_grid_edge": nxt is not None}
  if every > 0:
    max_steps = int(classifier_config(str(tune.method), int(config.seed)).train.steps)
    steps = plateau_step([tuple(p) for p in rows[best]["curve"]], float(tune.plateau))
    overrides["train.steps"] = steps
    summary["steps_on_grid_edge"] = steps >= max_steps
    summary["max_steps"] = max_steps
  summary["overrides"] = overrides
  artifacts.write_json(best_path(workdir), summary)
  print(f"tuned on {tune.method}/{tune.split} {tune.metric}: " +
        ", ".join(f"{r['overrides']} {r[key]}" for r in rows) + f" -> {overrides}", flush=True)
  if summary["on_grid_edge"] or summary.get("steps_on_grid_edge"):
    print("tuning: WARNING the tuned values sit on the edge of the grid "
          f"({'steps' if summary.get('steps_on_grid_edge') else 'grid'}); widen tune.grid or raise "
          "classifier.train.steps", flush=True)
  return False
