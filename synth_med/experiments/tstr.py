"""Paper 001's benchmark (DuMont Schütte et al.): can a synthetic copy of a data set stand in for it?
Train on synthetic, test on real (`experiment='tstr'`), along three axes.

For each setting (a number of label combinations, images per combination and a resolution; one axis
varied at a time from `base`), in <workdir>/settings/<setting>/:

  real         classifiers on the real training fold, one per seed          real/seed<k>/
  generator    the generator on the real training fold (config.generator:   generator/
               cpD-GAN or prog-GAN with FID early stopping on the seed-0
               real classifier's features, or the diffusion model)
  synthesize   synthetic train, validation and test folds with the real      synthetic/{train,val,test}/
               folds' label sets (one image per real image)
  synthetic    classifiers on the synthetic training fold, one per seed,     synthetic_models/seed<k>/
               also scored on the synthetic validation and test folds
then, over all settings:
  evaluate     AUC_real − AUC_syn on the real test fold, paired over seeds   results.json
               (95 % bootstrap CI over seeds and test images, one-sample
               t-test over the seeds' differences), Δ_syn = AUC_syn(X_syn) −
               AUC_syn(X_real), the generator's FID, and 001's Fig. 4 check:
               each of some synthetic images next to its nearest real
               training image in the real classifier's features (cosine)
  report       tables and 001's Fig. 2 (AUC_real and AUC_syn along each axis) report.html

Every stage skips finished work and resumes interrupted work, as the study does.
"""
from __future__ import annotations

import html
import os
import time
from typing import Any

import numpy as np
from scipy import stats

from synth_med import configuration
from synth_med.analysis import plots
from synth_med.analysis.distributions import frechet_distance
from synth_med.analysis.memorisation import copy_check, nearest
from synth_med.data.pipeline import WorldSource, materialise
from synth_med.data.shards import read_shards
from synth_med.data.sources import make_world
from synth_med.errors import SynthMedError
from synth_med.evaluation.paired import compare, load_predictions, metric_values
from synth_med.infra.figures import data_uri, png_file_data_uri
from synth_med.experiments.classifier import (FEATURES_FILE, PREDICTIONS_FILE, SYNTHETIC_PREDICTIONS_FILE,
                                              load_embedder, load_features, run_classifier)
from synth_med.experiments.diffusion import run_diffusion
from synth_med.experiments.gan import load_generator as load_gan, run_gan
from synth_med.experiments.study import stage_config as study_stage_config
from synth_med.experiments.generation import run_generation
from synth_med.experiments.synthetic_store import load_generator as load_diffusion
from synth_med.infra import artifacts, sharding

STAGES = ("real", "generator", "synthesize", "synthetic", "evaluate", "report")
AXES = ("label_combinations", "per_combination", "image_size")
AXIS_NAMES = {"label_combinations": "label combinations", "per_combination": "training images per combination",
              "image_size": "resolution (px)"}
GENERATORS = ("cpd_gan", "prog_gan", "diffusion")
FOLDS = {"train": "train", "val": "val", "test": "id"}  # synthetic fold -> the real split whose labels it copies
def setting_name(s: dict[str, int]) -> str:
  return f"m{s['label_combinations']}_n{s['per_combination']}_px{s['image_size']}"


def settings(config: Any) -> list[dict[str, Any]]:
  """The base setting and, per axis, each other value with the rest at base (no repeats), in run order;
  `config.setting_names` ('' = all) picks some of them."""
  base = {a: int(config.base[a]) for a in AXES}
  out: dict[str, dict[str, Any]] = {setting_name(base): {**base, "axes": list(AXES)}}
  for axis in AXES:
    for value in config.axes[axis]:
      s = {**base, axis: int(value)}
      entry = out.setdefault(setting_name(s), {**s, "axes": []})
      if axis not in entry["axes"]:
        entry["axes"].append(axis)
  chosen = [n.strip() for n in str(config.get("setting_names", "") or "").split(",") if n.strip()]
  bad = [n for n in chosen if n not in out]
  if bad:
    raise SynthMedError(f"--config.setting_names has unknown settings {bad}; choose from {list(out)}.")
  return [dict(v, name=k) for k, v in out.items() if not chosen or k in chosen]


def stage_config(config: Any, part: str, setting: dict[str, Any]) -> Any:
  """config.<part> (classifier, gan or diffusion) as the study builds a stage (`study.stage_config`: its
  data keys and mesh), with the setting's axes."""
  sub = study_stage_config(config, part)
  with sub.unlocked():
    sub.data.label_combinations = int(setting["label_combinations"])
    sub.data.per_combination = int(setting["per_combination"])
    sub.data.image_size = int(setting["image_size"])
    if part == "diffusion":
      sub.data.unlabelled_size = 0  # the benchmark's generators see the labelled training fold only
      sub.diffusion.condition.attributes = ()
  return sub


def classifier_config(config: Any, setting: dict[str, Any], seed: int, synthetic_dir: str = "") -> Any:
  c = stage_config(config, "classifier", setting)
  with c.unlocked():
    c.seed = int(config.seed) + int(seed)
    c.mix.alpha = 0.0 if synthetic_dir else 1.0
    c.mix.synthetic_dir = synthetic_dir
  return c


def parse_stages(value: str) -> list[str]:
  """'real,evaluate' -> the valid stages in run order; bad names fail clearly."""
  names = [s.strip() for s in str(value).split(",") if s.strip()]
  bad = [s for s in names if s not in STAGES]
  if bad or not names:
    raise SynthMedError(f"--config.stages has {bad or 'no stages'}; choose from {list(STAGES)}.")
  return [s for s in STAGES if s in names]


def validate(config: Any) -> None:
  """Checks the benchmark's own keys, then each stage config of every setting, before any work."""
  parse_stages(config.stages)
  if config.generator not in GENERATORS:
    raise SynthMedError(f"--config.generator={config.generator!r} is not valid; choose one of {list(GENERATORS)}.")
  if int(config.seeds) < 2:
    raise SynthMedError(f"--config.seeds={config.seeds}: the paired test needs >= 2 seeds (001 uses >= 4).")
  for axis in AXES:
    values = tuple(config.axes[axis])
    if any(int(v) < 0 for v in values) or (axis == "image_size" and any(int(v) < 8 for v in values)):
      raise SynthMedError(f"--config.axes.{axis}={values}: values must be >= 0 (image sizes >= 8).")
  for s in settings(config):
    part = "diffusion" if config.generator == "diffusion" else "gan"
    classifier = classifier_config(config, s, 0, "/tmp/synthetic")
    for c in (stage_config(config, part, s), classifier):
      configuration.validate(c)
    if str(config.data.source) == "world":  # enough images per combination (metadata only, cheap)
      make_world(classifier.data)


def _run_dir(workdir: str, s: dict[str, Any], *parts: str) -> str:
  return os.path.join(workdir, "settings", s["name"], *parts)


def _stage_real(config: Any, workdir: str, s: dict[str, Any]) -> None:
  for k in range(int(config.seeds)):  # seed 0 keeps its training features (FID, nearest neighbours)
    run_classifier(classifier_config(config, s, k), _run_dir(workdir, s, "real", f"seed{k}"), {} if k == 0 else None)


def _embedder(config: Any, workdir: str, s: dict[str, Any]):
  folder = _run_dir(workdir, s, "real", "seed0")
  if not artifacts.is_done(folder):
    raise SynthMedError(f"{folder} is not finished; run the real stage first (--config.stages=real,...).")
  return load_embedder(classifier_config(config, s, 0), folder)


def _stage_generator(config: Any, workdir: str, s: dict[str, Any]) -> None:
  folder = _run_dir(workdir, s, "generator")
  if config.generator == "diffusion":
    run_diffusion(stage_config(config, "diffusion", s), folder)
  else:
    run_gan(stage_config(config, "gan", s), folder, _embedder(config, workdir, s) if not artifacts.is_done(folder)
            else None)


def _generator(config: Any, workdir: str, s: dict[str, Any], spec: Any) -> tuple[Any, int]:
  folder = _run_dir(workdir, s, "generator")
  if config.generator == "diffusion":
    c = stage_config(config, "diffusion", s)
    return load_diffusion(c, folder, spec, sharding.make_mesh(c.mesh), low_res=False)
  return load_gan(stage_config(config, "gan", s), folder, spec)


def _stage_synthesize(config: Any, workdir: str, s: dict[str, Any]) -> None:
  folders = {f: _run_dir(workdir, s, "synthetic", f) for f in FOLDS}
  if all(artifacts.is_done(f) for f in folders.values()):
    return
  world = make_world(classifier_config(config, s, 0).data)
  generator, step = _generator(config, workdir, s, world.spec)
  for i, (fold, split) in enumerate(FOLDS.items()):
    meta = world.metadata(np.asarray(world.split(split).ids, np.int64))
    cond = {"label": meta["label"].astype(np.float32), "label_mask": meta["label_mask"].astype(np.float32),
            "labelled": np.ones(len(meta["label"]), bool)}
    for a in world.spec.attributes:
      cond[f"attrs/{a.name}"] = np.full(len(meta["label"]), -1, np.int32)  # the generators see labels only
    run_generation(generator, cond, folders[fold], int(config.seed) + 1000 * (i + 1), 256, step)


def _stage_synthetic(config: Any, workdir: str, s: dict[str, Any]) -> None:
  stores = {f"synthetic_{f}": _run_dir(workdir, s, "synthetic", f) for f in ("val", "test")}
  for f in list(stores.values()) + [_run_dir(workdir, s, "synthetic", "train")]:
    if not artifacts.is_done(f):
      raise SynthMedError(f"{f} is not finished; run the synthesize stage first.")
  for k in range(int(config.seeds)):
    run_classifier(classifier_config(config, s, k, _run_dir(workdir, s, "synthetic", "train")),
                   _run_dir(workdir, s, "synthetic_models", f"seed{k}"), stores)


def benchmark_metric(label_kind: str) -> str:
  """The AUC the benchmark reports: mean AUROC over findings (001's AUC-bar), AUROC for a binary label,
  top-1 accuracy for a single-label softmax task (no AUC over many classes in the paired machinery)."""
  return {"multilabel": "mean_auc", "binary": "auc"}.get(label_kind, "top1")


def evaluate_setting(config: Any, workdir: str, s: dict[str, Any]) -> dict[str, Any]:
  """One setting's AUC_real, AUC_syn, their paired difference, Δ_syn, FID and nearest neighbours."""
  seeds = range(int(config.seeds))
  real_dirs = [_run_dir(workdir, s, "real", f"seed{k}") for k in seeds]
  syn_dirs = [_run_dir(workdir, s, "synthetic_models", f"seed{k}") for k in seeds]
  missing = [d for d in real_dirs + syn_dirs if not os.path.exists(os.path.join(d, PREDICTIONS_FILE))]
  if missing:
    return {"skipped": f"unfinished runs: {missing[:2]}{' ...' if len(missing) > 2 else ''}"}
  info = artifacts.read_json(os.path.join(real_dirs[0], "metrics.json"))
  kind = info["label_kind"]
  metric = benchmark_metric(kind)
  real = [load_predictions(os.path.join(d, PREDICTIONS_FILE))["id"] for d in real_dirs]
  syn = [load_predictions(os.path.join(d, PREDICTIONS_FILE))["id"] for d in syn_dirs]
  full = np.ones((1, len(real[0].label)))
  auc_real = np.array([metric_values(metric, p, full, kind)[0] for p in real])
  auc_syn = np.array([metric_values(metric, p, full, kind)[0] for p in syn])
  cmp = compare(real, syn, [metric], metric, "", kind, n_boot=int(config.bootstrap), seed=int(config.seed))[metric]
  diffs = auc_real - auc_syn
  t = stats.ttest_1samp(diffs, 0.0) if np.std(diffs) > 0 else None
  on_syn = []
  for d in syn_dirs:
    p = load_predictions(os.path.join(d, SYNTHETIC_PREDICTIONS_FILE))["synthetic_test"]
    on_syn.append(metric_values(metric, p, np.ones((1, len(p.label))), kind)[0])
  delta_syn = np.asarray(on_syn) - auc_syn
  out = {"setting": {a: s[a] for a in AXES}, "axes": s["axes"], "metric": metric,
         "train_examples": info["train_examples"], "test_examples": int(len(real[0].label)),
         "auc_real": {"mean": float(np.mean(auc_real)), "std": float(np.std(auc_real)), "seeds": auc_real.tolist()},
         "auc_syn": {"mean": float(np.mean(auc_syn)), "std": float(np.std(auc_syn)), "seeds": auc_syn.tolist()},
         "gap": {"mean": float(np.mean(diffs)), "std": float(np.std(diffs)),
                 "ci": cmp["ci"],
                 "p_t": None if t is None else float(t.pvalue), "p_mann_whitney": cmp["p_mann_whitney"],
                 "verdict": {"better": "real better", "worse": "synthetic better"}.get(cmp["verdict"], cmp["verdict"])},
         "delta_syn": {"mean": float(np.mean(delta_syn)), "std": float(np.std(delta_syn))}}
  gen_metrics = os.path.join(_run_dir(workdir, s, "generator"), "metrics.json")
  if os.path.exists(gen_metrics):
    g = artifacts.read_json(gen_metrics)
    out["generator"] = {"steps": g.get("steps"), "fid_best": (g.get("fid") or {}).get("best"),
                        "stopped_early": (g.get("fid") or {}).get("stopped_early")}
  out.update(fidelity_checks(config, workdir, s))
  return out


def fidelity_checks(config: Any, workdir: str, s: dict[str, Any], pairs: int = 8) -> dict[str, Any]:
  """FID of the synthetic training fold against the real one, and 001's Fig. 4: random synthetic images
  with their nearest real training image, cosine distance in the seed-0 real classifier's features
  (with the memorisation check's reference: real test images' nearest training distances)."""
  world = make_world(classifier_config(config, s, 0).data)
  real_train = materialise(WorldSource(world, world.split("train")), "real train fold").arrays["image"]
  synthetic = read_shards(_run_dir(workdir, s, "synthetic", "train")).arrays["image"]
  saved = load_features(os.path.join(_run_dir(workdir, s, "real", "seed0"), FEATURES_FILE))  # real train, test
  f_train, f_test, f_syn = saved["train"], saved["id"], _embedder(config, workdir, s)(synthetic)
  check = copy_check(f_syn, f_train, f_test, metric="cosine")
  rng = np.random.default_rng(int(config.seed))
  picks = rng.choice(len(synthetic), min(pairs, len(synthetic)), replace=False)
  dist, idx = nearest(f_syn[picks], f_train, "cosine")
  folder = _run_dir(workdir, s)
  fig = plots.memorisation_figure(dict(check, closest_pairs=[[int(p), int(i), float(d)] for p, i, d in
                                                             zip(picks, idx, dist)]), synthetic, real_train)
  path = os.path.join(folder, "nearest_neighbours.png")
  artifacts.atomic_write(path, lambda f: f.write(fig), mode="wb", suffix=".png")
  return {"fid_features": float(frechet_distance(f_train, f_syn)),
          "nearest": {"pairs": [[int(p), int(i), float(d)] for p, i, d in zip(picks, idx, dist)],
                      "flagged_fraction": check["flagged_fraction"], "figure": os.path.relpath(path, workdir)}}


def _stage_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  res = {"generator": str(config.generator), "seeds": int(config.seeds), "settings": {}}
  for s in settings(config):
    res["settings"][s["name"]] = evaluate_setting(config, workdir, s)
  res["axes"] = {}
  for axis in AXES:
    rows = sorted(((e["setting"][axis], name) for name, e in res["settings"].items()
                   if "skipped" not in e and axis in e["axes"]), reverse=True)
    res["axes"][axis] = [name for _, name in rows]
  artifacts.write_json(os.path.join(workdir, "results.json"), res)
  print(results_table(res), flush=True)
  return res


def results_table(res: dict[str, Any]) -> str:
  """Plain text: per axis, AUC_real, AUC_syn, their difference with CI and t-test p, Δ_syn and FID."""
  lines = [f"train on synthetic ({res['generator']}), test on real: mean over {res['seeds']} seeds"]
  for axis, names in res["axes"].items():
    lines.append(f"  {AXIS_NAMES[axis]}:")
    for name in names:
      e = res["settings"][name]
      g = e["gap"]
      ci = "n/a" if g["ci"] is None else f"[{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]"
      p = "n/a" if g["p_t"] is None else f"{g['p_t']:.2g}"
      lines.append(f"    {e['setting'][axis]:>6}: AUC_real {e['auc_real']['mean']:.3f} ± {e['auc_real']['std']:.3f}, "
                   f"AUC_syn {e['auc_syn']['mean']:.3f} ± {e['auc_syn']['std']:.3f}, real − syn "
                   f"{g['mean']:+.3f} {ci} (t-test p={p}), Δ_syn {e['delta_syn']['mean']:+.3f}, "
                   f"FID {e['fid_features']:.2f}")
  return "\n".join(lines)


def _stage_report(config: Any, workdir: str) -> None:
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    raise SynthMedError(f"{path} is missing; run the evaluate stage first.")
  res = artifacts.read_json(path)
  parts = [f"<h1>Train on synthetic, test on real: {html.escape(res['generator'])}</h1>",
           "<p>Paper 001's benchmark. Per setting: classifiers trained on the real training fold and on a "
           "synthetic copy with the same labels, both tested on the real test fold; mean ± std over "
           f"{res['seeds']} seeds. real − syn: the paired difference of the mean AUC with its 95 % bootstrap "
           "CI (seeds and test images) and a one-sample t-test over the seeds' differences; Δ_syn = AUC of the "
           "synthetic-data model on synthetic test images minus on real ones (label overfitting when large); "
           "FID between the real and synthetic training folds in the real classifier's features.</p>"]
  panels = {}
  for axis, names in res["axes"].items():
    if not names:
      continue
    xs = [res["settings"][n]["setting"][axis] for n in names]
    panels[AXIS_NAMES[axis]] = {"AUC_real": (xs, [res["settings"][n]["auc_real"]["mean"] for n in names]),
                                "AUC_syn": (xs, [res["settings"][n]["auc_syn"]["mean"] for n in names])}
    rows = []
    for n in names:
      e = res["settings"][n]
      g = e["gap"]
      ci = "" if g["ci"] is None else f" [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]"
      rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
          e["setting"][axis], e["train_examples"], f"{e['auc_real']['mean']:.3f} ± {e['auc_real']['std']:.3f}",
          f"{e['auc_syn']['mean']:.3f} ± {e['auc_syn']['std']:.3f}", f"{g['mean']:+.3f}{ci}",
          "n/a" if g["p_t"] is None else f"{g['p_t']:.2g}", f"{e['delta_syn']['mean']:+.3f}",
          f"{e['fid_features']:.2f}")) + "</tr>")
    parts.append(f"<h2>{html.escape(AXIS_NAMES[axis])}</h2><table><tr><th>{html.escape(AXIS_NAMES[axis])}</th>"
                 "<th>real training images</th><th>AUC_real</th><th>AUC_syn</th><th>real − syn</th>"
                 "<th>t-test p</th><th>Δ_syn</th><th>FID</th></tr>" + "".join(rows) + "</table>")
  if panels:
    fig = plots.panels_figure({k: v for k, v in panels.items()}, "axis value", "AUC on the real test fold")
    parts.insert(2, f"<img alt='AUC along each axis' src='{data_uri(fig)}'>")
  for name in res["settings"]:
    grid = os.path.join(workdir, "settings", name, "generator", "samples.png")
    if os.path.exists(grid):
      parts.append(f"<h3>Generator samples: {html.escape(name)}</h3><p>One row per frequent label combination.</p>"
                   f"<img alt='samples' src='{png_file_data_uri(grid)}'>")
  for name, e in res["settings"].items():
    fig = e.get("nearest", {}).get("figure")
    if fig and os.path.exists(os.path.join(workdir, fig)):
      parts.append(f"<h3>Nearest real neighbours of synthetic images: {html.escape(name)}</h3>"
                   f"<img alt='nearest neighbours' src='{png_file_data_uri(os.path.join(workdir, fig))}'>")
  page = "<html><head><meta charset='utf-8'><style>td,th{border:1px solid #ccc;padding:3px}</style></head><body>"
  out = os.path.join(workdir, "report.html")
  artifacts.atomic_write(out, lambda f: f.write(page + "".join(parts) + "</body></html>"))
  print(f"wrote {out}", flush=True)


SETTING_STAGES = {"real": _stage_real, "generator": _stage_generator, "synthesize": _stage_synthesize,
                  "synthetic": _stage_synthetic}


def run_tstr(config: Any, workdir: str) -> dict[str, Any]:
  """Runs the configured stages: per setting the first four, then evaluate and report."""
  validate(config)
  stages = parse_stages(config.stages)
  artifacts.write_json(os.path.join(workdir, "config.json"), artifacts.config_to_dict(config))
  t0 = time.time()
  chosen = settings(config)
  for i, s in enumerate(chosen):
    for stage in stages:
      if stage in SETTING_STAGES:
        print(f"=== setting {i + 1}/{len(chosen)} {s['name']}: {stage} ===", flush=True)
        SETTING_STAGES[stage](config, workdir, s)
  res: dict[str, Any] = {}
  if "evaluate" in stages:
    res = _stage_evaluate(config, workdir)
  if "report" in stages:
    _stage_report(config, workdir)
  total = time.time() - t0
  timings_path = os.path.join(workdir, "timings.json")
  artifacts.write_json(timings_path, {"seconds": total, "settings": len(chosen)})
  print(f"benchmark finished in {total:.0f} s ({total / 60:.1f} min)", flush=True)
  return res
