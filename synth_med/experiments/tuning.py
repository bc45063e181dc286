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

from synth_med.experiments.classifier import run_classifier
from synth_med.errors import SynthMedError
from synth_med.infra import artifacts


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

  Every grid point trains `tune.seeds` seeds and scores their mean. A winner on the edge of a numeric
  axis adds the next value past it, up to `tune.widen` times. Then, with `tune.converge`, the winner's
  train.steps doubles while the mean validation score still gains at least `tune.plateau` (up to
  `tune.widen` doublings): the classifiers train to where more steps stop helping, whatever the
  learning-rate schedule. `best.json` records every point and whether the result sits on an edge.
  """
  tune = config.tune
  points = grid_points(tune.grid)
  if not points:
    print("tune.grid is empty: no tuning; every method uses the classifier config as written", flush=True)
    return True
  if os.path.exists(best_path(workdir)):
    print(f"tuning finished earlier: {read_best(workdir)} ({best_path(workdir)})", flush=True)
    return True
  seeds = int(tune.seeds)
  rows: list[dict[str, Any]] = []

  def run_point(point: dict[str, Any]) -> dict[str, Any]:
    i = len(rows)
    scores = []
    for s in range(seeds):
      c = classifier_config(str(tune.method), int(config.seed) + s)
      with c.unlocked():
        apply_overrides(c, point)
      folder = os.path.join(workdir, "tune", point_name(i, point), f"seed{s}")
      print(f"--- tuning point {i + 1}, seed {s}: {point} ---", flush=True)
      scores.append(score(run_classifier(c, folder), str(tune.split), str(tune.metric)))
    defined = [v for v in scores if v is not None]
    row = {"overrides": point, "scores": scores, "mean": sum(defined) / len(defined) if defined else None}
    rows.append(row)
    return row

  def best_row(candidates: list[int]) -> int:
    ok = [j for j in candidates if rows[j]["mean"] is not None]
    if not ok:
      raise SynthMedError(f"tuning: {tune.metric} on {tune.split} is undefined for every grid point "
                          "(e.g. a class missing from the split); choose another tune.metric.")
    return max(ok, key=lambda j: rows[j]["mean"])

  for point in points:
    run_point(point)
  widenings, limit = 0, int(tune.get("widen", 0))
  while True:
    best = best_row(list(range(len(rows))))
    nxt = widened([r["overrides"] for r in rows], rows[best]["overrides"])
    if nxt is None or widenings >= limit:
      break
    widenings += 1
    print(f"tuning: the best point {rows[best]['overrides']} is on the grid's edge; adding {nxt}", flush=True)
    run_point(nxt)
  summary: dict[str, Any] = {"method": str(tune.method), "split": str(tune.split), "metric": str(tune.metric),
                             "widenings": widenings, "on_grid_edge": nxt is not None}
  if bool(tune.get("converge", False)):
    steps = int(classifier_config(str(tune.method), int(config.seed)).train.steps)
    steps = int(rows[best]["overrides"].get("train.steps", steps))
    current, doublings, gained = best, 0, True
    while doublings < limit:
      longer = run_point({**rows[current]["overrides"], "train.steps": 2 * steps})
      doublings += 1
      gained = (longer["mean"] or 0.0) - (rows[current]["mean"] or 0.0) >= float(tune.plateau)
      print(f"tuning: {2 * steps} steps score {longer['mean']} against {rows[current]['mean']} at {steps}"
            f" ({'still gaining' if gained else 'converged'})", flush=True)
      if not gained:
        break
      current, steps = len(rows) - 1, 2 * steps
    best = current
    summary.update(steps=steps, doublings=doublings, steps_on_grid_edge=gained)
  overrides = dict(rows[best]["overrides"])
  if "steps" in summary:
    overrides["train.steps"] = summary["steps"]
  summary.update(points=rows, best=best, overrides=overrides)
  artifacts.write_json(best_path(workdir), summary)
  print(f"tuned on {tune.method}/{tune.split} {tune.metric}: " +
        ", ".join(f"{r['overrides']} {r['mean']}" for r in rows) + f" -> {overrides}", flush=True)
  if summary["on_grid_edge"] or summary.get("steps_on_grid_edge"):
    print("tuning: WARNING the tuned values sit on the edge of the grid; widen tune.grid, raise tune.widen "
          "or classifier.train.steps", flush=True)
  return False
