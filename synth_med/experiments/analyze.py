"""The study's `analyze` stage: analyses of whatever stages have finished, from their saved outputs.

Each analysis writes an entry under `analyses` in results.json (and, where it has one, a figure under
`<workdir>/analyses/`, with a caption the report prints under it). An analysis whose inputs are
missing records why (`skipped`) instead of failing, so `--config.stages=generate,analyze` runs the
memorisation check on a store alone.

- memorisation (002 §3.3, Fig. 9): each synthetic image's nearest generator-training image, in pixels
  and in the real-data classifier's features, against test images' nearest training images.
- mmd (002 F.3, G.3.2, Table G1): real vs held-out real against real vs synthetic, per store and per
  attribute value; and each method's ID-vs-OOD discrepancy in its own features against the baseline's.
- pca (G.3.3, Fig. G8): principal components for 60-95 % of the variance, per method over seeds.
- generation_quality: FID and precision / recall per requested attribute value, with the generator's
  condition fidelity and the mix's change in that group.
- underserved (G.3.4, Fig. G9): at-risk test examples that every seed of a method gets wrong.
- beta_posterior (F.2, Fig. G6): the spread of the group-vs-outgroup posteriors over seeds.
- improvement (Figs. G4-G7): each method's paired change over the baseline per group and split.
- group_metrics (MEDFAIR): worst group, equalised odds / equal opportunity, calibration per group,
  intersectional groups.
- learnt_weights (paper 004, IDS and MW-Net): the learnt weights per requested class and property value,
  the images with the highest and lowest weights, and whether the weight follows the real-data
  classifier's verdict on the image (does the weighting down-weight images that ignore their condition?).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable

import numpy as np
from scipy import stats

from synth_med.analysis import distributions, group_metrics, memorisation, plots
from synth_med.data.pipeline import WorldSource, materialise
from synth_med.data.shards import read_shards
from synth_med.data.sources import make_world
from synth_med.evaluation import fairness
from synth_med.evaluation import supplement_stats as st
from synth_med.evaluation.metrics import Predictions, metric_suite
from synth_med.evaluation.paired import PREDICTIONS_FILE, compare, load_predictions
from synth_med.experiments.classifier import (FEATURES_FILE, LEARNT_WEIGHTS_FILE, SYNTHETIC_PREDICTIONS_FILE,
                                              load_features)
from synth_med.experiments.diffusion import training_source
from synth_med.diffusion.fair_sampler import held_out
from synth_med.experiments.synthetic_store import FILTER_REPORT
from synth_med.infra import artifacts
from synth_med.infra.image_grid import make_grid, save_png

FIGURES = "analyses"  # the folder under the workdir


class MissingInput(Exception):
  """An analysis's inputs are not there (the message says which stage makes them)."""


class NotApplicable(Exception):
  """The analysis does not apply to this study (no such methods, another label kind): left out."""


@dataclasses.dataclass(eq=False)  # hashed by identity: its loaders are cached per instance
class StudyRuns:
  """What the analyses read: the study's folders and choices (built by the study)."""
  workdir: str
  methods: list[str]
  seeds: int
  reference: str
  attribute: str
  stores: dict[str, str]  # finished synthetic stores: {mode: folder}
  store_method: dict[str, str]  # {store: the synthetic mix method that trains on it}
  filtered: dict[str, tuple[str, str]]  # {quality-filtered method: (its unfiltered mix, its store folder)}
  # paper 000: {method: ('real+synthetic', 'synthetic only' or 'two sites', percent)}
  supplement: dict[str, tuple[str, int]]
  cfg_matrix: dict[str, str]  # paper 000's Table 2: {method trained on one guidance's store: that store}
  classifier_config: Any  # a complete classifier stage config (its world and eval settings)
  generator_config: Any  # the stage config whose images the stores match (upsampler, else base)
  results_path: str
  n_boot: int
  seed: int = 0
  # the 0 % point each kind of supplementation is compared with (absent kinds: `reference`); paper 000's
  # two sites: the external site's real data alone
  supplement_baselines: dict[str, str] = dataclasses.field(default_factory=dict)
  learnt_weights: dict[str, str] = dataclasses.field(default_factory=dict)  # {learnt-weights method: its store}

  def run_dir(self, method: str, seed: int) -> str:
    return os.path.join(self.workdir, "classifiers", method, f"seed{seed}")

  def finished(self, method: str, seed: int) -> bool:
    return all(os.path.exists(os.path.join(self.run_dir(method, seed), f)) for f in ("metrics.json", PREDICTIONS_FILE))

  def runs(self, method: str) -> list[int]:
    return [s for s in range(self.seeds) if self.finished(method, s)]

  @functools.lru_cache(maxsize=None)
  def predictions(self, method: str, seed: int) -> dict[str, Predictions]:
    return load_predictions(os.path.join(self.run_dir(method, seed), PREDICTIONS_FILE))

  @functools.lru_cache(maxsize=None)
  def metrics(self, method: str, seed: int) -> dict[str, Any]:
    return artifacts.read_json(os.path.join(self.run_dir(method, seed), "metrics.json"))

  @functools.lru_cache(maxsize=None)
  def features(self, method: str, seed: int) -> dict[str, np.ndarray]:
    path = os.path.join(self.run_dir(method, seed), FEATURES_FILE)
    if not os.path.exists(path):
      raise MissingInput(f"no {FEATURES_FILE} in {self.run_dir(method, seed)} (run the classifiers stage)")
    return load_features(path)

  def reference_features(self) -> dict[str, np.ndarray]:
    seeds = self.runs(self.reference)
    if not seeds:
      raise MissingInput(f"no finished run of the baseline {self.reference!r} (run the classifiers stage)")
    return self.features(self.reference, seeds[0])

  @functools.lru_cache(maxsize=None)
  def store(self, mode: str) -> dict[str, np.ndarray]:
    return read_shards(self.stores[mode]).arrays

  @functools.lru_cache(maxsize=None)
  def world(self) -> Any:
    """The classifier's world (its splits and attributes), made once."""
    return make_world(self.classifier_config.data)

  def spec(self) -> Any:
    return self.world().spec

  def value_names(self, attr: str) -> tuple[str, ...]:
    return tuple(self.spec().attribute(attr).values)

  def info(self) -> tuple[str, list[int]]:
    """(label kind, high-risk class indices) of the runs."""
    seeds = self.runs(self.reference)
    if not seeds:
      raise MissingInput(f"no finished run of the baseline {self.reference!r} (run the classifiers stage)")
    m = self.metrics(self.reference, seeds[0])
    return m.get("label_kind", "softmax"), [m["classes"].index(c) for c in m.get("high_risk", [])]

  def figure(self, name: str, png: bytes) -> str:
    rel = os.path.join(FIGURES, f"{name}.png")
    artifacts.atomic_write(os.path.join(self.workdir, rel), lambda f: f.write(png), "wb", ".png")
    return rel


def _rows(arrays: dict[str, np.ndarray], key: str, value: int) -> np.ndarray:
  return np.nonzero(np.asarray(arrays[key]) == value)[0]


def _public(check: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in check.items() if not isinstance(v, np.ndarray)}


def analyse_memorisation(r: StudyRuns) -> dict[str, Any]:
  if not r.stores:
    raise MissingInput("no finished synthetic store (run the generate stage)")
  world = make_world(r.generator_config.data)
  train = training_source(world, r.generator_config)[0].arrays["image"]
  test = materialise(WorldSource(world, world.split("id")), "ID test split").arrays["image"]
  try:
    feats = r.reference_features()
  except MissingInput:
    feats = {}
  out: dict[str, Any] = {"stores": {}}
  rows = []
  # the test images' nearest training images: one reference for every store
  pixel_ref = memorisation.reference_distances(test, train, "l2")
  feature_ref = memorisation.reference_distances(feats["id"], feats["train"], "cosine") if feats else None
  for mode in r.stores:
    synth = r.store(mode)["image"]
    if synth.shape[1:] != train.shape[1:]:
      raise MissingInput(f"store {mode!r} images are {synth.shape[1:]}, the generator's training images "
                         f"{train.shape[1:]}")
    entry = {"pixel": memorisation.copy_check(synth, train, metric="l2", reference=pixel_ref)}
    if f"synthetic/{mode}" in feats:
      entry["feature"] = memorisation.copy_check(feats[f"synthetic/{mode}"], feats["train"], metric="cosine",
                                                 reference=feature_ref)
    out["figure"] = r.figure(f"memorisation_{mode}", plots.memorisation_figure(entry["pixel"], synth, train))
    out["stores"][mode] = {k: _public(v) for k, v in entry.items()}
    for space, v in entry.items():
      rows.append([mode, space, v["n_synthetic"], f"{v['threshold']:.4f}", f"{v['synthetic_quantiles']['0.5']:.4f}",
                   f"{v['test_quantiles']['0.5']:.4f}", f"{100 * v['flagged_fraction']:.2f} %"])
  out["caption"] = ("Each synthetic image's nearest training image (pixel ℓ2; classifier-feature cosine) against "
                    "each real test image's: a synthetic image nearer than every test image is flagged as a "
                    "likely copy. The histogram and the closest pairs are for the last store.")
  out["table"] = {"header": ["store", "space", "synthetic", "threshold", "median synthetic", "median test", "flagged"],
                  "rows": rows}
  return out


def analyse_mmd(r: StudyRuns) -> dict[str, Any]:
  feats = r.reference_features()
  ref_preds = r.predictions(r.reference, r.runs(r.reference)[0])
  out: dict[str, Any] = {"stores": {}, "domains": {}}
  rows = []
  names = r.value_names(r.attribute)
  for mode in r.stores:
    key = f"synthetic/{mode}"
    if key not in feats:
      continue
    entry = {"all": distributions.mmd_test(feats["train"], feats["id"], feats[key], seed=r.seed)}
    store = r.store(mode)
    if f"attrs/{r.attribute}" in store and f"attrs/train/{r.attribute}" in feats:
      for v in np.unique(store[f"attrs/{r.attribute}"]):
        if v < 0:
          continue
        tr, te = _rows(feats, f"attrs/train/{r.attribute}", v), _rows(ref_preds["id"].attrs, r.attribute, v)
        sy = _rows(store, f"attrs/{r.attribute}", v)
        if min(len(tr), len(te), len(sy)) >= 20:
          entry[names[int(v)]] = distributions.mmd_test(feats["train"][tr], feats["id"][te], feats[key][sy], seed=r.seed)
    out["stores"][mode] = entry
    for group, e in entry.items():
      if e["mmd_other"] is not None:
        rows.append([f"{mode} / {group}", f"{e['mmd_heldout']:.4g}", f"{e['mmd_other']:.4g}",
                     f"{e['ratio']:.2f}" if e.get("ratio") else "n/a", f"{e['p_mann_whitney']:.2g}"])
  # 002 G.3.2: each method's ID-vs-OOD discrepancy in its own features (seed 0), against the baseline's
  splits = [s for s in ref_preds if s not in ("val", "id")]
  base = {}
  for i, m in enumerate(r.methods):
    seeds = r.runs(m)
    if not seeds:
      continue
    f = r.features(m, seeds[0])
    for split in splits:  # each method its own subsets, so the U test compares independent estimates
      est = distributions.mmd_estimates(f["id"], f[split], seed=r.seed + 1000 * (i + 1))
      if m == r.reference:
        base[split] = est
      out["domains"].setdefault(m, {})[f"id-{split}"] = {"mean": float(est.mean()), "estimates": est}
  for m, pairs in out["domains"].items():
    for pair, e in pairs.items():
      ref = base.get(pair.split("-", 1)[1])
      e["p_vs_reference"] = (None if m == r.reference or ref is None
                             else float(stats.mannwhitneyu(e["estimates"], ref).pvalue))
      e.pop("estimates")
  if out["domains"]:
    values = {m: {pair: e["mean"] for pair, e in pairs.items()} for m, pairs in out["domains"].items()}
    out["figure"] = r.figure("mmd_domains", plots.bars_figure(values, "MMD² (cubic kernel), ID vs OOD"))
  out["caption"] = ("Table: MMD² (002 Eq. 7, cubic kernel, 30 subsets of up to 300) on the baseline's features, "
                    "real training vs held-out real test images against real training vs synthetic images, with "
                    "the Mann-Whitney U p between the two sets of estimates. Figure: each method's MMD² between "
                    "the ID test split and each OOD split in its own features (lower: better aligned domains).")
  out["table"] = {"header": ["store / group", "real vs held-out", "real vs synthetic", "ratio", "U p"], "rows": rows}
  return out


def analyse_pca(r: StudyRuns) -> dict[str, Any]:
  out: dict[str, Any] = {"methods": {}}
  for m in r.methods:
    per_seed = [distributions.components_for_variance(r.features(m, s)["id"], seed=r.seed) for s in r.runs(m)
                if os.path.exists(os.path.join(r.run_dir(m, s), FEATURES_FILE))]
    if per_seed:
      out["methods"][m] = {f: float(np.mean([p[f] for p in per_seed])) for f in per_seed[0]} | {"seeds": len(per_seed)}
  if not out["methods"]:
    raise MissingInput("no classifier features (run the classifiers stage)")
  feats = r.reference_features()
  out["synthetic"] = {mode: distributions.components_for_variance(feats[f"synthetic/{mode}"], seed=r.seed)
                      for mode in r.stores if f"synthetic/{mode}" in feats}
  fr = list(distributions.VARIANCE_FRACTIONS)
  series = {m: (fr, [v[f"{f:g}"] for f in fr]) for m, v in out["methods"].items()}
  out["figure"] = r.figure("pca", plots.lines_figure(series, "fraction of variance", "principal components (ID test)"))
  out["caption"] = ("Principal components of each method's ID test features needed for each fraction of the "
                    "variance, mean over seeds (002 G.3.3: fewer means a more compressed representation).")
  out["table"] = {"header": ["method"] + [f"{f:g}" for f in fr],
                  "rows": [[m] + [f"{v[f'{f:g}']:.1f}" for f in fr] for m, v in out["methods"].items()]}
  return out


def analyse_generation_quality(r: StudyRuns, results: dict[str, Any], improvement: dict[str, Any]) -> dict[str, Any]:
  feats = r.reference_features()
  names = r.value_names(r.attribute)
  out: dict[str, Any] = {"stores": {}}
  rows = []
  for mode in r.stores:
    key = f"synthetic/{mode}"
    if key not in feats:
      continue
    store = r.store(mode)
    groups = {"all": (np.arange(len(feats["train"])), np.arange(len(feats[key])))}
    if f"attrs/{r.attribute}" in store and f"attrs/train/{r.attribute}" in feats:
      for v in np.unique(store[f"attrs/{r.attribute}"]):
        if v >= 0:
          groups[names[int(v)]] = (_rows(feats, f"attrs/train/{r.attribute}", v), _rows(store, f"attrs/{r.attribute}", v))
    probe = (results.get("fidelity", {}).get(mode, {}).get(r.attribute) or {}).get("synthetic_per_value") or {}
    judge = (results.get("fidelity_classifier", {}).get(mode) or {}).get("synthetic_per_value") or {}
    change = improvement.get("methods", {}).get(r.store_method.get(mode, ""), {}).get("id", {})
    entry = {}
    for g, (tr, sy) in groups.items():
      if min(len(tr), len(sy)) < 10:
        continue
      e = {"fid": distributions.frechet_distance(feats["train"][tr], feats[key][sy]),
           **distributions.precision_recall(feats["train"][tr], feats[key][sy], seed=r.seed),
           "probe_fidelity": probe.get(g), "classifier_fidelity": judge.get(g),
           "mix_change_id": (change.get(g) or {}).get("diff")}
      entry[g] = e
      rows.append([mode, g, f"{e['fid']:.2f}", f"{e['precision']:.3f}", f"{e['recall']:.3f}",
                   *("n/a" if e[k] is None else f"{e[k]:+.3f}" if k == "mix_change_id" else f"{e[k]:.3f}"
                     for k in ("probe_fidelity", "classifier_fidelity", "mix_change_id"))])
    out["stores"][mode] = entry
  if not out["stores"]:
    raise MissingInput("the baseline has no features of the synthetic stores (run generate, then classifiers)")
  out["figure"] = r.figure("generation_quality", plots.bars_figure(
      {mode: {g: e["fid"] for g, e in entry.items()} for mode, entry in out["stores"].items()},
      "FID (baseline's features; lower is closer to real)"))
  out["caption"] = ("Per requested attribute value: FID and precision / recall (Kynkäänniemi et al. 2019, k = 3) "
                    "between real training and synthetic images in the baseline's features, the generator's "
                    "condition fidelity (probe; classifier judge) and the mix's paired change in that group on ID.")
  out["table"] = {"header": ["store", "group", "FID", "precision", "recall", "probe fidelity", "classifier fidelity",
                             "mix change (ID)"], "rows": rows}
  return out


def analyse_underserved(r: StudyRuns) -> dict[str, Any]:
  kind, high_risk = r.info()
  names = r.value_names(r.attribute)
  out: dict[str, Any] = {"methods": {}}
  masks = {}
  for m in r.methods:
    seeds = r.runs(m)
    if not seeds:
      continue
    for split in (s for s in r.predictions(m, seeds[0]) if s != "val"):
      res = group_metrics.underserved([r.predictions(m, s)[split] for s in seeds], kind, high_risk, r.attribute, names)
      masks[(m, split)] = res.pop("mask")
      out["methods"].setdefault(m, {})[split] = res | {"seeds": len(seeds)}
  for (m, split), mask in masks.items():
    ref = masks.get((r.reference, split))
    if ref is not None and m != r.reference:
      out["methods"][m][split]["helped"] = int((ref & ~mask).sum())  # the baseline always misses, this method not
      out["methods"][m][split]["hurt"] = int((mask & ~ref).sum())
  values = {f"{split}/{g}": {m: e[split]["groups"][g]["always_missed"] for m, e in out["methods"].items()
                             if split in e and g in e[split]["groups"]}
            for split in next(iter(out["methods"].values()), {}) for g in names}
  out["figure"] = r.figure("underserved", plots.bars_figure({k: v for k, v in values.items() if v},
                                                            "at-risk examples every seed misses"))
  out["caption"] = ("002 G.3.4: the at-risk test examples (high-risk classes; positives for binary and multi-label "
                    "tasks) that every seed of a method gets wrong, per split and group (lower is better). "
                    "'helped' counts those the baseline always misses and the method does not.")
  out["table"] = {"header": ["method", "split", "at risk", "always missed", "helped", "hurt"],
                  "rows": [[m, s, e["at_risk"], e["always_missed"], e.get("helped", ""), e.get("hurt", "")]
                           for m, splits in out["methods"].items() for s, e in splits.items()]}
  return out


def analyse_beta_posterior(r: StudyRuns) -> dict[str, Any]:
  out: dict[str, Any] = {"methods": {}}
  for m in r.methods:
    for s in r.runs(m):
      for split, res in r.metrics(m, s)["splits"].items():
        for attr, post in res.get("beta_posterior", {}).items():
          spread = group_metrics.beta_spread(post)
          if spread is None:
            continue
          e = out["methods"].setdefault(m, {}).setdefault(split, {}).setdefault(attr, {"spread": [], "groups": {}})
          e["spread"].append(spread)
          for g, v in post.items():
            e["groups"].setdefault(g, []).append(v["mean"])
  if not out["methods"]:
    if r.runs(r.reference) and r.info()[0] != "softmax":
      raise NotApplicable("the Beta posterior is of top-3 (softmax tasks)")
    raise MissingInput("no Beta posteriors in the runs (run the classifiers stage)")
  for m, splits in out["methods"].items():
    for split, attrs in splits.items():
      for attr, e in attrs.items():
        e["spread"] = {"mean": float(np.mean(e["spread"])), "std": float(np.std(e["spread"])), "seeds": len(e["spread"])}
        e["groups"] = {g: float(np.mean(v)) for g, v in e["groups"].items()}
  values = {f"{split}": {m: s[split][r.attribute]["spread"]["mean"] for m, s in out["methods"].items()
                         if r.attribute in s.get(split, {})}
            for split in next(iter(out["methods"].values()))}
  out["figure"] = r.figure("beta_posterior", plots.bars_figure(values, f"spread of top-3 posterior ({r.attribute})"))
  out["caption"] = ("002 F.2 / Fig. G6: for each group, the Beta(1, 1) posterior of top-3 (group) − top-3 (outgroup); "
                    "the spread is the standard deviation of the groups' posterior means, mean over seeds "
                    "(lower is fairer).")
  out["table"] = {"header": ["method", "split", "attribute", "spread (mean ± std over seeds)", "group means"],
                  "rows": [[m, s, a, f"{e['spread']['mean']:.4f} ± {e['spread']['std']:.4f}",
                            ", ".join(f"{g}: {v:+.3f}" for g, v in e["groups"].items())]
                           for m, splits in out["methods"].items() for s, attrs in splits.items()
                           for a, e in attrs.items()]}
  return out


def _subset(p: Predictions, rows: np.ndarray) -> Predictions:
  return Predictions(label=p.label[rows], label_mask=p.label_mask[rows], probs=p.probs[rows],
                     attrs={a: v[rows] for a, v in p.attrs.items()})


def analyse_improvement(r: StudyRuns, results: dict[str, Any]) -> dict[str, Any]:
  if not results.get("metrics"):
    raise MissingInput("no results.json metrics (run the evaluate stage)")
  kind, high_risk = r.info()
  names = r.value_names(r.attribute)
  metric = results["gap_metric"]
  ref_seeds = r.runs(r.reference)
  out: dict[str, Any] = {"metric": metric, "methods": {}}
  for m in r.methods:
    shared = [s for s in ref_seeds if r.finished(m, s)] if m != r.reference else []
    for split in results["splits"] if shared else []:
      codes = r.predictions(r.reference, shared[0])[split].attrs.get(r.attribute)
      if codes is None:
        continue
      for v in np.unique(codes[codes >= 0]):
        rows = np.nonzero(codes == v)[0]
        c = compare([_subset(r.predictions(m, s)[split], rows) for s in shared],
                    [_subset(r.predictions(r.reference, s)[split], rows) for s in shared],
                    [metric], metric, "", kind, high_risk, n_boot=r.n_boot, seed=r.seed)[metric]
        out["methods"].setdefault(m, {}).setdefault(split, {})[names[int(v)]] = c
  if not out["methods"]:
    raise MissingInput("no method shares finished seeds with the baseline (run the classifiers stage)")
  values = {f"{split}/{g}": {m: e[split][g]["diff"] for m, e in out["methods"].items() if g in e.get(split, {})}
            for split in results["splits"] for g in names}
  errors = {f"{split}/{g}": {m: e[split][g]["ci"] for m, e in out["methods"].items() if g in e.get(split, {})}
            for split in results["splits"] for g in names}
  out["figure"] = r.figure("improvement", plots.bars_figure({k: v for k, v in values.items() if v},
                                                            f"change in {metric} over {r.reference}", errors))
  out["caption"] = (f"Each method's paired change in {metric} over the baseline per split and {r.attribute} group "
                    "(002 Figs. G4-G7), with the 95 % bootstrap CI over seeds and test images.")
  out["table"] = {"header": ["method", "split", "group", "change", "95 % CI", "verdict"],
                  "rows": [[m, split, g, f"{c['diff']:+.3f}" if c["diff"] is not None else "n/a",
                            "n/a" if c["ci"] is None else f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]", c["verdict"]]
                           for m, splits in out["methods"].items() for split, groups in splits.items()
                           for g, c in groups.items()]}
  return out


def analyse_group_metrics(r: StudyRuns, results: dict[str, Any]) -> dict[str, Any]:
  kind, high_risk = r.info()
  min_size = int(r.classifier_config.eval.min_group_size)
  spec = r.spec()
  out: dict[str, Any] = {"methods": {}}
  rows = []
  for m in r.methods:
    seeds = r.runs(m)
    if not seeds:
      continue
    for split in (s for s in r.predictions(m, seeds[0]) if s != "val"):
      acc: dict[str, list] = {}
      for s in seeds:
        preds, res = r.predictions(m, s), r.metrics(m, s)["splits"].get(split, {})
        test = preds[split]
        for metric in results.get("metrics", []):
          w = group_metrics.worst_group(res.get("groups", {}).get(r.attribute, {}), metric)
          acc.setdefault(f"worst/{metric}", []).append(w["value"])
        eo = group_metrics.equalised_odds(preds["val"], test, kind, r.attribute, min_size)
        if eo is not None:
          acc.setdefault("equal_opportunity", []).append(eo["equal_opportunity"])
          acc.setdefault("equalised_odds", []).append(eo["equalised_odds"])
        if r.attribute in test.attrs:
          cal = group_metrics.ece_by_group(test, kind, r.attribute, r.value_names(r.attribute), min_size)
          acc.setdefault("ece", []).append(cal["overall"])
          acc.setdefault("ece_gap", []).append(cal["gap"])
        grouped = metric_suite(test, kind, spec.class_names, spec.high_risk)[1]
        gap_metric = results.get("gap_metric")
        for other in (a for a in test.attrs if a != r.attribute and r.attribute in test.attrs):
          codes, names = group_metrics.intersection(test.attrs[r.attribute], test.attrs[other],
                                                    r.value_names(r.attribute), r.value_names(other))
          if (codes >= 0).sum() == 0 or gap_metric not in grouped:
            continue
          groups = fairness.per_group({gap_metric: grouped[gap_metric]}, codes, names, min_size, 0, r.seed)
          g = group_metrics.worst_group(groups, gap_metric)
          acc.setdefault(f"worst/{gap_metric}/{r.attribute}×{other}", []).append(g["value"])
          small = sum(e["small"] for e in groups.values())
          acc.setdefault(f"small_groups/{r.attribute}×{other}", []).append(small)
      entry = {k: (float(np.mean([x for x in v if x is not None])) if any(x is not None for x in v) else None)
               for k, v in acc.items()}
      out["methods"].setdefault(m, {})[split] = entry
      rows.append([m, split] + [", ".join(f"{k}={v:.3f}" for k, v in entry.items() if v is not None)])
  if not out["methods"]:
    raise MissingInput("no finished classifier runs (run the classifiers stage)")
  worst = f"worst/{results.get('gap_metric')}"
  out["figure"] = r.figure("group_metrics", plots.bars_figure(
      {split: {m: e[split].get(worst) for m, e in out["methods"].items() if split in e}
       for split in next(iter(out["methods"].values()))}, f"worst {r.attribute} group's {results.get('gap_metric')}"))
  out["caption"] = (f"Figure: the worst {r.attribute} group's {results.get('gap_metric')} per method and split. Table: "
                    f"mean over seeds: the worst {r.attribute} group of each headline metric; equal opportunity and "
                    "equalised odds (best − worst group TPR, and the larger of the TPR and FPR differences, at the "
                    "Youden threshold chosen on validation; binary and multi-label tasks); expected calibration "
                    f"error overall and its {r.attribute} gap; the worst intersectional group "
                    f"({r.attribute} × each other attribute) and how many such groups are small.")
  out["table"] = {"header": ["method", "split", "values"], "rows": rows}
  return out


def analyse_quality_filter(r: StudyRuns, results: dict[str, Any]) -> dict[str, Any]:
  if not r.filtered:
    raise NotApplicable("no quality-filtered method in this study")
  kind, high_risk = r.info()
  out: dict[str, Any] = {"methods": {}}
  rows = []
  for m, (plain, folder) in r.filtered.items():
    path = os.path.join(folder, FILTER_REPORT)
    if not os.path.exists(path):
      raise MissingInput(f"{m!r} has no filtered store yet (run the classifiers stage)")
    entry: dict[str, Any] = {"filter": artifacts.read_json(path), "against": plain, "comparison": {}}
    shared = [s for s in r.runs(m) if plain and r.finished(plain, s)]
    for split in results.get("splits", []) if shared else []:
      entry["comparison"][split] = compare(
          [r.predictions(m, s)[split] for s in shared], [r.predictions(plain, s)[split] for s in shared],
          results["metrics"], results["gap_metric"], r.attribute, kind, high_risk,
          int(r.classifier_config.eval.min_group_size), r.n_boot, r.seed)
      for name, c in entry["comparison"][split].items():
        if c["diff"] is not None:
          rows.append([m, split, name, f"{c['diff']:+.3f}",
                       "n/a" if c["ci"] is None else f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]", c["verdict"]])
    out["methods"][m] = entry
  first = next(iter(out["methods"].values()))["filter"]
  out["figure"] = r.figure("quality_filter", plots.bars_figure(
      {"per class": first["per_class"], "per value": first["per_value"]}, "acceptance rate"))
  accept = ", ".join(f"{m}: kept {e['filter']['kept']} of {e['filter']['total']}" for m, e in out["methods"].items())
  out["caption"] = ("The quality filter keeps the synthetic images whose requested label the real-data classifier "
                    f"and whose requested property a real-image probe confirm ({accept}); the figure shows the "
                    "acceptance rate per class and per property value, the table the filtered mix's paired "
                    "difference to the unfiltered one.")
  out["table"] = {"header": ["method", "split", "metric", "filtered − unfiltered", "95 % CI", "verdict"], "rows": rows}
  return out


def requested_confirmed(label: np.ndarray, label_mask: np.ndarray, probs: np.ndarray, kind: str) -> np.ndarray:
  """Per (example, weight slot) [M, L]: does the real-data classifier confirm the requested label? Softmax:
  its top class is the requested one (one slot); sigmoid heads: each finding's probability is on the
  requested side of 1/2 (NaN where the finding is unknown)."""
  if kind == "softmax":
    return (np.argmax(probs, -1) == np.argmax(label, -1)).astype(np.float64)[:, None]
  agree = ((probs > 0.5) == (label > 0.5)).astype(np.float64)
  return np.where(np.asarray(label_mask) > 0, agree, np.nan)


def weight_confirmation(weights: np.ndarray, confirmed: np.ndarray) -> dict[str, Any]:
  """How a weight [M, L] follows the verdict [M, L] (1 confirmed, 0 not, NaN unknown): the mean weight of
  each side, the AUC of the weight for telling confirmed from unconfirmed pairs and Spearman's rho."""
  keep = np.isfinite(confirmed)
  w, c = np.asarray(weights, np.float64)[keep], confirmed[keep]
  out: dict[str, Any] = {"pairs": int(keep.sum()), "confirmed_share": float(c.mean()) if len(c) else None,
                         "mean_weight_confirmed": float(w[c == 1].mean()) if (c == 1).any() else None,
                         "mean_weight_unconfirmed": float(w[c == 0].mean()) if (c == 0).any() else None,
                         "auc": None, "spearman_rho": None, "spearman_p": None}
  if 0 < c.sum() < len(c):
    out["auc"] = float(stats.mannwhitneyu(w[c == 1], w[c == 0]).statistic / ((c == 1).sum() * (c == 0).sum()))
    rho, p = stats.spearmanr(w, c)
    out["spearman_rho"], out["spearman_p"] = float(rho), float(p)
  return out


def analyse_learnt_weights(r: StudyRuns) -> dict[str, Any]:
  if not r.learnt_weights:
    raise NotApplicable("no learnt-weights method in this study")
  kind, _ = r.info()
  classes = list(r.metrics(r.reference, r.runs(r.reference)[0])["classes"])
  ref_path = os.path.join(r.run_dir(r.reference, r.runs(r.reference)[0]), SYNTHETIC_PREDICTIONS_FILE)
  ref_preds = load_predictions(ref_path) if os.path.exists(ref_path) else {}  # the verdicts on each store
  out: dict[str, Any] = {"methods": {}}
  rows, bars, strips = [], {}, []  # bars: {method: {class or value: mean weight}}
  for m, store in r.learnt_weights.items():
    paths = [os.path.join(r.run_dir(m, s), LEARNT_WEIGHTS_FILE) for s in r.runs(m)]
    paths = [p for p in paths if os.path.exists(p)]
    if not paths or store not in r.stores:
      raise MissingInput(f"{m!r} has no finished run with {LEARNT_WEIGHTS_FILE} (run the classifiers stage)")
    w = np.mean([load_features(p)["weight"] for p in paths], 0)  # [M, L], averaged over seeds
    arrays = r.store(store)
    label, mask = np.asarray(arrays["label"]), np.asarray(arrays["label_mask"])
    entry: dict[str, Any] = {"store": store, "seeds": len(paths), "mean": float(w.mean()),
                             "quantiles": [float(q) for q in np.quantile(w, [0.1, 0.5, 0.9])]}
    if kind == "softmax":
      y = np.argmax(label, -1)
      entry["per_class"] = {classes[k]: float(w[y == k, 0].mean()) for k in range(len(classes)) if (y == k).any()}
    else:  # each finding's slot, over the images requested with it present and absent
      entry["per_class"] = {}
      for k in range(min(len(classes), w.shape[1])):
        for side, wanted in (("present", label[:, k] > 0.5), ("absent", label[:, k] <= 0.5)):
          rows_k = (mask[:, k] > 0) & wanted
          if rows_k.any():
            entry["per_class"][f"{classes[k]} {side}"] = float(w[rows_k, k].mean())
    attr = arrays.get(f"attrs/{r.attribute}")
    if attr is not None and (np.asarray(attr) >= 0).any():
      names = r.value_names(r.attribute)
      entry["per_value"] = {names[v]: float(w[np.asarray(attr) == v].mean()) for v in np.unique(attr) if v >= 0}
    if store in ref_preds:
      entry["confirmation"] = weight_confirmation(w, requested_confirmed(label, mask, ref_preds[store].probs, kind))
    out["methods"][m] = entry
    bars[m] = {**entry["per_class"], **{f"{r.attribute}={v}": x for v, x in entry.get("per_value", {}).items()}}
    conf = entry.get("confirmation", {})
    fmt = lambda v, f="{:.3f}": "n/a" if v is None else f.format(v)  # noqa: E731
    rows.append([m, store, len(paths), f"{entry['mean']:.3f}", fmt(conf.get("mean_weight_confirmed")),
                 fmt(conf.get("mean_weight_unconfirmed")), fmt(conf.get("auc")), fmt(conf.get("spearman_rho"), "{:+.3f}"),
                 fmt(conf.get("spearman_p"), "{:.2g}")])
    order = np.argsort(-w.mean(1), kind="stable")
    strips += [arrays["image"][order[:8]], arrays["image"][order[::-1][:8]]]
  out["figure"] = r.figure("learnt_weights", plots.table_heatmap_figure(bars, "mean learnt weight"))
  rel = os.path.join(FIGURES, "learnt_weights_images.png")
  save_png(os.path.join(r.workdir, rel), make_grid(np.concatenate(strips), ncol=8))
  out["images"] = rel
  out["caption"] = ("Learnt weights of the synthetic images (mean over seeds): per requested class (per finding, "
                    "requested present or absent, for sigmoid heads) and property value in the figure; in the image grid, per method, a row of the "
                    "8 highest-weighted images and a row of the 8 lowest (methods in table order). The table asks "
                    "whether the weight follows the real-data classifier's verdict on the image (it confirms the "
                    "requested label): the mean weight of confirmed and unconfirmed images, the AUC of the weight "
                    "for telling them apart (0.5 = unrelated) and Spearman's rho.")
  out["table"] = {"header": ["method", "store", "seeds", "mean weight", "confirmed", "unconfirmed", "AUC",
                             "Spearman rho", "p"], "rows": rows}
  return out


def cfg_matrix(r: StudyRuns, names: list[str], every: int = 10) -> dict[str, Any]:
  """Paper 000's Table 2: macro AUROC of the real-data model and of each model trained on one guidance's
  replica store, on the real ID test split and on each store's held-out rows (those of every 10th
  training example, which the store's own model did not train on), mean over seeds; with each store's
  FID to the real training images in the baseline's features."""
  stores = sorted((s for s in set(r.cfg_matrix.values()) if s in r.stores), key=lambda s: float(s[len("replica_w"):]))
  held = {s: held_out(r.store(s), every) for s in stores}
  table: dict[str, dict[str, Any]] = {}
  for m in [r.reference] + list(r.cfg_matrix):
    row: dict[str, list[float | None]] = {}
    for s in r.runs(m):
      row.setdefault("real id", []).append(st.finding_aucs(r.predictions(m, s)["id"], names, n_boot=0)["macro"]["auc"])
      path = os.path.join(r.run_dir(m, s), SYNTHETIC_PREDICTIONS_FILE)
      synth = load_predictions(path) if os.path.exists(path) else {}
      for store in (name for name in stores if name in synth):
        p = _subset(synth[store], np.nonzero(held[store])[0])
        row.setdefault(store, []).append(st.finding_aucs(p, names, n_boot=0)["macro"]["auc"])
    defined = {k: [v for v in vals if v is not None] for k, vals in row.items()}
    table[m] = {k: float(np.mean(v)) for k, v in defined.items() if v}
  fid = {}
  try:
    feats = r.reference_features()
    fid = {s: distributions.frechet_distance(feats["train"], feats[f"synthetic/{s}"]) for s in stores
           if f"synthetic/{s}" in feats}
  except MissingInput:
    pass
  return {"auroc": table, "fid": fid, "held_out_every": every}


def analyse_supplementation(r: StudyRuns, results: dict[str, Any]) -> dict[str, Any]:
  """Paper 000: macro AUROC against the synthetic share (Fig. 3), per-finding AUROC with paired t-tests and
  Bonferroni against real data (Tables E3-E9), and the findings' co-occurrence (Figs. E1-E3)."""
  if not r.supplement:
    raise NotApplicable("no supplementation methods in this study (configs/cxr_supplement.py)")
  kind, _ = r.info()
  if kind != "multilabel":
    raise NotApplicable("paper 000's statistics are per finding (multi-label tasks)")
  ref_seeds = r.runs(r.reference)
  names = list(r.spec().class_names)
  splits = results.get("splits", [])
  out: dict[str, Any] = {"curve": {}, "findings": {}, "cooccurrence": {}}
  # the curve: macro AUROC (mean over seeds) per share, for each kind, internal and external
  baseline = {how: r.supplement_baselines.get(how, r.reference) for how, _ in r.supplement.values()}
  for split in splits:
    macro = lambda m, s: st.finding_aucs(r.predictions(m, s)[split], names, n_boot=0)["macro"]["auc"]  # noqa: E731

    def mean_macro(m: str) -> float | None:
      vals = [v for v in (macro(m, s) for s in r.runs(m)) if v is not None]
      return float(np.mean(vals)) if vals else None
    curve: dict[str, Any] = {"real": mean_macro(r.reference)}
    for how, b in baseline.items():
      if b != r.reference:
        curve[f"{how} baseline"] = {"method": b, "mean": mean_macro(b)}
    for m, (how, pct) in sorted(r.supplement.items(), key=lambda kv: kv[1][1]):
      vals = [v for v in (macro(m, s) for s in r.runs(m)) if v is not None]
      if vals:
        curve.setdefault(how, {})[str(pct)] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "seeds": len(vals)}
    out["curve"][split] = curve
  # per finding (seed 0, as 000's single models): AUROC with its bootstrap CI, and the paired test against real
  rows = []
  for split in splits:
    table = {}
    for b in dict.fromkeys([r.reference, *baseline.values()]):
      if 0 in r.runs(b):
        table[b] = st.finding_aucs(r.predictions(b, 0)[split], names, n_boot=r.n_boot, seed=r.seed)
    for m, (how, _) in r.supplement.items():
      if 0 in r.runs(m) and 0 in r.runs(baseline[how]):
        p = r.predictions(m, 0)[split]
        table[m] = st.finding_aucs(p, names, n_boot=r.n_boot, seed=r.seed)
        tests = st.paired_finding_tests(p, r.predictions(baseline[how], 0)[split], names, n_boot=r.n_boot, seed=r.seed)
        for name, t in tests.items():
          table[m][name].update(t, against=baseline[how])
    out["findings"][split] = table
    for m, per in table.items():
      for name in names:
        e = per[name]
        rare = e["prevalence"] is not None and e["prevalence"] < 0.05
        against = f" (vs {e['against']})" if e.get("against") not in (None, r.reference) else ""
        rows.append([split, m + against, name + (" (<5 %)" if rare else ""), "n/a" if e["auc"] is None else f"{e['auc']:.3f}",
                     "n/a" if e.get("diff") is None else f"{e['diff']:+.3f}",
                     "n/a" if e.get("p_bonferroni") is None else f"{e['p_bonferroni']:.2g}"])
  # co-occurrence: the real training labels against the replica store's and each test split's
  store = r.store("replica") if "replica" in r.stores else None
  world = r.world()
  train = world.metadata(np.asarray(world.split("train").ids))
  mats = {"real train": st.cooccurrence(train["label"], train["label_mask"])}
  if store is not None:
    mats["synthetic replicas"] = st.cooccurrence(store["label"], store["label_mask"])
  for split in splits:
    p = r.predictions(r.reference, ref_seeds[0])[split]
    mats[f"real {split} test"] = st.cooccurrence(p.label, p.label_mask)
  out["cooccurrence"] = {k: {"pearson_vs_real_train": st.cooccurrence_correlation(mats["real train"], v),
                             "matrix": np.nan_to_num(v).tolist()} for k, v in mats.items()}
  panels, hlines = {}, {}
  for split, curve in out["curve"].items():
    series, lines = {}, {}
    for how in ("real+synthetic", "synthetic only", "two sites"):
      pts = sorted((int(k), v["mean"]) for k, v in curve.get(how, {}).items())
      zero = curve.get(f"{how} baseline", {}).get("mean") if how == "two sites" else curve["real"]
      if how != "synthetic only" and pts and zero is not None:
        pts = [(0, zero)] + pts
      if pts:
        series[how] = ([x for x, _ in pts], [y for _, y in pts])
    if curve["real"] is not None:
      lines[f"real only ({r.reference})"] = curve["real"]
    if curve.get("two sites baseline", {}).get("mean") is not None:
      lines[f"external site real only ({curve['two sites baseline']['method']})"] = curve["two sites baseline"]["mean"]
    title = f"{split} test"
    panels[title], hlines[title] = series, lines
  if any(s in r.stores for s in r.cfg_matrix.values()):
    out["cfg_matrix"] = cfg_matrix(r, names)
    cols = ["real id"] + sorted(out["cfg_matrix"]["fid"] or set(r.cfg_matrix.values()))
    out["tables"] = [{"header": ["trained on", *[f"{c} (FID {out['cfg_matrix']['fid'][c]:.1f})"
                                                  if c in out["cfg_matrix"]["fid"] else c for c in cols]],
                      "rows": [[m] + [f"{row[c]:.3f}" if c in row else "" for c in cols]
                               for m, row in out["cfg_matrix"]["auroc"].items()]}]
  out["figure"] = r.figure("supplementation", plots.panels_figure(panels, "synthetic images, % of the real training set",
                                                                  "macro AUROC (mean over seeds)", hlines))
  out["heatmaps"] = r.figure("cooccurrence", plots.heatmaps_figure(mats, names))
  corr = ", ".join(f"{k}: {v['pearson_vs_real_train']:.3f}" for k, v in out["cooccurrence"].items()
                   if v["pearson_vs_real_train"] is not None and k != "real train")
  out["caption"] = ("Paper 000 Figs. 3 and 4: macro AUROC against the share of synthetic replicas, real + synthetic (from "
                    "0 % = real only), synthetic only, and two sites (the external site's real training images plus "
                    "this site's replicas, from 0 % = the external site's real data alone), on the internal (id) and "
                    "external test splits, mean over seeds; dashed: the real-data baselines. "
                    "The table: seed 0's per-finding AUROC, its difference to its baseline and the paired t-test over "
                    "1,000 bootstrap resamples, Bonferroni-corrected over the findings; the baseline is real data, or X for a "
                    "method marked (vs X) (000's protocol; resamples are "
                    "not independent samples, so these p-values are far smaller than the paired comparison over seeds "
                    f"gives); findings under 5 % prevalence are marked. Co-occurrence correlation with the real training labels: {corr}.")
  out["table"] = {"header": ["split", "method", "finding", "AUROC", "− baseline", "p (Bonferroni)"], "rows": rows}
  return out


def run_analyses(r: StudyRuns) -> dict[str, Any]:
  """Runs every analysis, records it under `analyses` in results.json, and returns the entries."""
  results = artifacts.read_json(r.results_path) if os.path.exists(r.results_path) else {}
  out: dict[str, Any] = {}

  def attempt(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.time()
    try:
      entry = fn()
    except MissingInput as e:
      entry = {"skipped": str(e)}
    except NotApplicable as e:
      print(f"analysis {name}: not for this study ({e})", flush=True)
      return {}
    entry["seconds"] = round(time.time() - t0, 2)
    out[name] = entry
    print(f"analysis {name}: {entry.get('skipped', 'done')} ({entry['seconds']:.1f} s)", flush=True)
    return entry

  attempt("memorisation", lambda: analyse_memorisation(r))
  attempt("mmd", lambda: analyse_mmd(r))
  attempt("pca", lambda: analyse_pca(r))
  improvement = attempt("improvement", lambda: analyse_improvement(r, results))
  attempt("generation_quality", lambda: analyse_generation_quality(r, results, improvement))
  attempt("underserved", lambda: analyse_underserved(r))
  attempt("beta_posterior", lambda: analyse_beta_posterior(r))
  attempt("group_metrics", lambda: analyse_group_metrics(r, results))
  attempt("quality_filter", lambda: analyse_quality_filter(r, results))
  attempt("supplementation", lambda: analyse_supplementation(r, results))
  attempt("learnt_weights", lambda: analyse_learnt_weights(r))
  results = artifacts.read_json(r.results_path) if os.path.exists(r.results_path) else {}
  results["analyses"] = out
  artifacts.write_json(r.results_path, results)
  return out
