"""Does the generator follow its conditions? Two judges trained on real images, applied to synthetic ones.

For the property (e.g. sex) a gradient-boosted probe on simple image features
(colour means on a 4x4 grid, channel statistics, edge energy) is trained on
real labelled images and scored twice: on held-out real images (how visible the
property is at this resolution at all) and on synthetic images against the
property they were *asked* for (how well the generator renders it). The same is
done for the label (the probe's class: top-1, or label >= 0.5 when binary). A synthetic score far below the real
one means the generator ignores that part of the condition, so fair sampling
over it cannot help the classifier.

The second judge is the study's real-data classifier itself (`classifier_fidelity`): its agreement
with the requested label on synthetic images (top-1 for a softmax head, mean AUC against the requested
findings for multi-label, accuracy for binary), next to the same metric on the real ID test images,
overall and per requested property value.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Mapping

import numpy as np

from synth_med.errors import SynthMedError
from synth_med.evaluation.paired import load_predictions, metric_values
from synth_med.infra import artifacts


def image_features(images: np.ndarray) -> np.ndarray:
  """float32[N, F]: 4x4-grid colour means, per-channel mean/std, and mean |gradient| and its spread."""
  x = np.asarray(images, np.float32) / 255.0
  n, h, w, c = x.shape
  if h % 4 or w % 4:
    raise SynthMedError(f"image_features needs sides divisible by 4, got {h}x{w}.")
  grid = x.reshape(n, 4, h // 4, 4, w // 4, c).mean(axis=(2, 4)).reshape(n, -1)
  stats = np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)
  gy, gx = np.abs(np.diff(x, axis=1)), np.abs(np.diff(x, axis=2))
  edges = np.concatenate([gy.mean(axis=(1, 2)), gx.mean(axis=(1, 2)),
                          np.quantile(gy.reshape(n, -1, c), 0.95, axis=1),
                          np.quantile(gx.reshape(n, -1, c), 0.95, axis=1)], axis=1)
  return np.concatenate([grid, stats, edges], axis=1).astype(np.float32)


def _probe(features: np.ndarray, target: np.ndarray, seed: int):
  from sklearn.ensemble import HistGradientBoostingClassifier
  return HistGradientBoostingClassifier(max_iter=60, learning_rate=0.2, random_state=seed).fit(features, target)


def label_classes(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """(int class per row, bool scored) for the label probe: label >= 0.5 for a single binary column, else
  the argmax of a one-hot, soft or multi-hot label (the leading finding), scored only where the label has
  some mass (a multi-hot row with no finding has no leading one). Rows with `labelled` False are not scored."""
  label = np.asarray(arrays["label"], np.float32)
  labelled = np.asarray(arrays["labelled"], bool) if "labelled" in arrays else np.ones(len(label), bool)
  if label.ndim == 2 and label.shape[-1] == 1:
    return (label[:, 0] >= 0.5).astype(np.int64), labelled
  return np.argmax(label, -1), labelled & (label.sum(-1) > 0)


def fit_probes(real: Mapping[str, np.ndarray], attribute: str, seed: int = 0,
               holdout: float = 0.25) -> dict[str, dict[str, Any]]:
  """Label (`label_classes`) and `attribute` probes fitted on real images; each with its real held-out accuracy."""
  rng = np.random.default_rng(seed)
  feats = image_features(real["image"])
  test = rng.random(len(feats)) < holdout
  targets = {"label": label_classes(real)}
  if f"attrs/{attribute}" in real:
    targets[attribute] = (real[f"attrs/{attribute}"], real[f"attrs/{attribute}"] >= 0)
  probes = {}
  for name, (y, ok) in targets.items():
    fit = ~test & ok
    if len(np.unique(y[fit])) < 2 or not (test & ok).any():  # nothing to fit on, or to score it on
      continue
    probe = _probe(feats[fit], y[fit], seed)
    counts = np.bincount(y[fit])
    probes[name] = {"probe": probe, "real_heldout": float(np.mean(probe.predict(feats[test & ok]) == y[test & ok])),
                    "majority_baseline": float(counts.max() / counts.sum()), "n_real_train": int(fit.sum())}
  return probes


def fidelity(probes: Mapping[str, dict[str, Any]], synthetic: Mapping[str, np.ndarray],
             attribute: str) -> dict[str, Any]:
  """Probe accuracy on synthetic images against what they were asked for, next to the real held-out one.

  Synthetic rows whose requested value is unknown (-1: the label-only mode's null property) are not
  scored for the attribute.
  """
  feats = image_features(synthetic["image"])
  out: dict[str, Any] = {"n_synthetic": int(len(feats))}
  for name, p in probes.items():
    if name == "label":
      y, ok = label_classes(synthetic)
    else:
      y = synthetic[f"attrs/{attribute}"]
      ok = y >= 0
    entry = {k: v for k, v in p.items() if k != "probe"}
    entry["n_synthetic_scored"] = int(ok.sum())
    entry["synthetic_as_requested"] = None
    if ok.any():
      pred = p["probe"].predict(feats[ok])
      entry["synthetic_as_requested"] = float(np.mean(pred == y[ok]))
      if name != "label":  # per requested value: does each group come out right?
        entry["synthetic_per_value"] = {int(v): float(np.mean(pred[y[ok] == v] == v)) for v in np.unique(y[ok])}
    out[name] = entry
  return out


AGREEMENT = {"softmax": "top1", "multilabel": "mean_auc", "binary": "accuracy"}


def classifier_fidelity(run_dirs: list[str], attribute: str, value_names: tuple[str, ...] = ()) -> dict[str, Any]:
  """{store: {metric, synthetic_as_requested, real_heldout, ratio, synthetic_per_value}} averaged over the
  real-data runs in `run_dirs` (each with predictions.npz and synthetic_predictions.npz)."""
  runs = [d for d in run_dirs if os.path.exists(os.path.join(d, "synthetic_predictions.npz"))]
  if not runs:
    return {}
  kind = artifacts.read_json(os.path.join(runs[0], "metrics.json")).get("label_kind", "softmax")
  metric = AGREEMENT[kind]
  per_store: dict[str, dict[str, list[float]]] = {}
  real = []
  for d in runs:
    real_p = load_predictions(os.path.join(d, "predictions.npz"))["id"]
    real.append(float(metric_values(metric, real_p, np.ones((1, len(real_p.label))), kind)[0]))
    for store, p in load_predictions(os.path.join(d, "synthetic_predictions.npz")).items():
      entry = per_store.setdefault(store, {"all": []})
      entry["all"].append(float(metric_values(metric, p, np.ones((1, len(p.label))), kind)[0]))
      codes = p.attrs.get(attribute)
      for v in ([] if codes is None else np.unique(codes[codes >= 0])):
        name = value_names[int(v)] if int(v) < len(value_names) else str(int(v))
        entry.setdefault(name, []).append(float(metric_values(metric, p, (codes == v)[None].astype(float), kind)[0]))
  finite = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731 - undefined (e.g. one class) -> None
  with np.errstate(invalid="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN mean is an undefined metric
    real_mean = finite(np.nanmean(real))
    out = {}
    for store, entry in per_store.items():
      synth = finite(np.nanmean(entry.pop("all")))
      out[store] = {"metric": metric, "synthetic_as_requested": synth, "real_heldout": real_mean,
                    "ratio": synth / real_mean if synth is not None and real_mean else None, "runs": len(runs),
                    "synthetic_per_value": {k: v for k, v in ((k, finite(np.nanmean(v))) for k, v in entry.items())
                                            if v is not None}}
  return out
