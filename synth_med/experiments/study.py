"""The method of paper 002 end to end, as one resumable run (`experiment='study'`).

Stages, each in its own folder under the workdir:

  base         the base diffusion model                       base/
  upsampler    the cascade's super-resolution model            upsampler/
  generate     fair sampling, one store per conditioning mode  synthetic/<mode>/
  tune         the real baseline over tune.grid, scored on ID val   tune/best.json
  classifiers  every method x seed                             classifiers/<method>/seed<k>/
  evaluate     mean +- std over seeds, ID and OOD              results.json
  analyze      002's analyses and fairness metrics             results.json `analyses`, analyses/
  report       one self-contained HTML page                    report.html

Every stage skips what is finished (DONE markers, finished shards) and resumes
what was interrupted (checkpoints), so rerunning the same command after a kill
continues where it stopped. `--config.stages=classifiers,evaluate` runs a
subset. One generator conditioned on label + property serves both modes: for
label-only samples the property part of the condition is null, which the model
learnt through the per-part condition dropout (our choice, halving the
generator cost; see docs/design.md).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import os
import time
from typing import Any

from synth_med import configuration
from synth_med.data.pipeline import WorldSource, materialise
from synth_med.data.schema import concat_batches
from synth_med.data.shards import read_shards
from synth_med.data.sources import make_world
from synth_med.errors import SynthMedError
from synth_med.evaluation.condition_fidelity import classifier_fidelity, fidelity, fit_probes
from synth_med.evaluation.paired import load_predictions
from synth_med.evaluation.report import write_report
from synth_med.evaluation.study_results import aggregate, comparison_table, comparisons, results_table
from synth_med.experiments.analyze import StudyRuns, run_analyses
from synth_med.experiments.classifier import SYNTHETIC_PREDICTIONS_FILE, run_classifier
from synth_med.experiments.diffusion import run_diffusion
from synth_med.experiments.synthetic_store import FILTER_REPORT, filter_store, generate_fair, replica_guidance
from synth_med.experiments.tuning import apply_overrides, best_path, grid_points, read_best, run_tuning
from synth_med.infra import artifacts

STAGES = ("base", "upsampler", "generate", "tune", "classifiers", "evaluate", "analyze", "report")
# The world's identity and splits: one value for every stage (the image size stays per stage).
SHARED_DATA_KEYS = ("source", "world", "seed", "num_classes", "id_domains", "ood_domains",
                    "unlabelled_domains", "train_size", "val_size", "test_size", "ood_size", "label_policy",
                    "skew", "domain_prevalence", "manual_dir", "preprocessed_dir", "corrupt_images", "equalize",
                    "frontal_only", "val_fraction", "id_test_fraction", "mimic_patients_csv", "mimic_admissions_csv",
                    "chexpert_demographics_csv", "fitzpatrick_partition",
                    "use_unlabelled_set", "csv", "channels", "columns")
SYNTHETIC_MODES = ("label", "label_property", "replica")  # and 'replica_w<w>': one replica copy at guidance w


def output_path(config: Any, workdir: str, kind: str) -> str:
  """results.json / report.html, or results_<name>.json / report_<name>.html with config.output_name
  (so a sweep in the same workdir reuses the generator without overwriting the main results)."""
  name = str(config.get("output_name", "") or "")
  stem, ext = {"results": ("results", "json"), "report": ("report", "html")}[kind]
  return os.path.join(workdir, f"{stem}_{name}.{ext}" if name else f"{stem}.{ext}")


def parse_stages(value: Any, has_upsampler: bool) -> list[str]:
  """'base,generate' or a tuple -> the valid stages in run order; bad names fail clearly."""
  names = [s.strip() for s in (value.split(",") if isinstance(value, str) else value) if s.strip()]
  valid = [s for s in STAGES if has_upsampler or s != "upsampler"]
  bad = [s for s in names if s not in valid]
  if bad or not names:
    raise SynthMedError(f"--config.stages has {bad or 'no stages'}; choose from {valid} "
                        "(comma separated, e.g. --config.stages=classifiers,evaluate,report).")
  return [s for s in valid if s in names]


def method_names(config: Any) -> list[str]:
  """The methods to run: `method_names`, or all (pretrained ones only with `pretrained_npz`)."""
  known = list(config.methods.keys())
  if not config.method_names:
    return [m for m in known if config.pretrained_npz or not config.methods[m].pretrained]
  names = [m.strip() for m in config.method_names.split(",") if m.strip()]
  bad = [m for m in names if m not in known]
  if bad:
    raise SynthMedError(f"--config.method_names has unknown methods {bad}; choose from {known}.")
  return names


def reference_method(config: Any) -> str:
  """The real-data baseline every method is compared with: the tuned method (`tune.method`, each study's
  real-data baseline)."""
  return str(config.tune.method)


def stage_config(config: Any, part: str) -> Any:
  """A complete stage config: `config.<part>` with the study's shared data settings and mesh."""
  sub = copy.deepcopy(config[part])
  with sub.unlocked():
    for k in SHARED_DATA_KEYS:
      sub.data[k] = copy.deepcopy(config.data[k])
    sub.mesh = copy.deepcopy(config.mesh)
    sub.cpu_devices = config.cpu_devices
    sub.distributed = False
  sub.lock()
  return sub


def synthetic_folder(workdir: str, method: Any) -> str:
  """The store a method mixes in: synthetic/<mode>, or its quality-filtered copy synthetic/<mode>_filtered."""
  return os.path.join(workdir, "synthetic", method.synthetic + ("_filtered" if method.get("quality_filter") else ""))


def real_probes(config: Any, world: Any) -> dict[str, Any]:
  """The condition-fidelity probes fitted on the real val + ID test images of `world` (the classifier's)."""
  real = concat_batches([materialise(WorldSource(world, world.split(s)), f"{s} split").arrays for s in ("val", "id")])
  return fit_probes(real, str(config.generate.attribute), int(config.seed))


def ensure_filtered_store(config: Any, workdir: str, method: str) -> dict[str, Any]:
  """Builds (once) the quality-filtered copy of `method`'s store from the baseline's seed-0 predictions on it."""
  m = config.methods[method]
  out = synthetic_folder(workdir, m)
  if artifacts.is_done(out) and os.path.exists(os.path.join(out, FILTER_REPORT)):  # every later seed
    return artifacts.read_json(os.path.join(out, FILTER_REPORT))
  reference = reference_method(config)
  ref_dir = os.path.join(workdir, "classifiers", reference, "seed0")
  preds_path = os.path.join(ref_dir, SYNTHETIC_PREDICTIONS_FILE)
  if not os.path.exists(preds_path) or m.synthetic not in load_predictions(preds_path):
    raise SynthMedError(f"method {method!r} filters the {m.synthetic!r} store with the baseline {reference!r}'s "
                        f"seed-0 predictions ({preds_path}); run that classifier first (it is the first method).")
  world = make_world(stage_config(config, "classifier").data)
  attribute = str(config.generate.attribute)
  info = artifacts.read_json(os.path.join(ref_dir, "metrics.json"))
  values = next((tuple(a.values) for a in world.spec.attributes if a.name == attribute), ())
  return filter_store(os.path.join(workdir, "synthetic", m.synthetic), out, load_predictions(preds_path)[m.synthetic],
                      info["label_kind"], real_probes(config, world), attribute, values, tuple(info["classes"]))


def baseline_of(config: Any, method: str) -> str:
  """The method `method` is compared with: its `baseline`, or the study's real-data baseline."""
  return str(config.methods[method].get("baseline", "") or reference_method(config))


def classifier_config(config: Any, workdir: str, method: str, seed: int,
                      tuned: dict[str, Any] | None = None) -> Any:
  """The classifier stage config of one method and seed, with the tune stage's values (`tuned`) applied."""
  m = config.methods[method]
  c = stage_config(config, "classifier")
  with c.unlocked():
    apply_overrides(c, tuned or {})
    c.seed = int(seed)
    c.data.augment = m.augment
    c.loss.name = m.loss
    c.mix.alpha = float(m.alpha) if m.synthetic else 1.0
    c.mix.synthetic_dir = synthetic_folder(workdir, m) if m.synthetic else ""
    c.mix.equality_level = float(m.equality_level)
    c.mix.filter_dominant = int(m.filter_dominant)
    c.mix.oversample = bool(m.oversample)
    c.mix.control = str(m.get("control", ""))
    c.mix.synthetic_copies = int(m.get("copies", 0))
    c.mix.synthetic_holdout = int(m.get("holdout", 0))
    c.model.pretrained_npz = config.pretrained_npz if m.pretrained else ""
    c.reweight.method = str(m.get("reweight", ""))
    if m.get("site", "") == "external":  # paper 000's two sites: the first OOD domain's real training images
      c.data.train_domains = tuple(config.data.ood_domains)[:1]
  return c


def _name_stage_key(message: str, part: str) -> str:
  """A stage config's error with its key as the study names it: `--config.model.x` is
  `--config.<part>.model.x`, except the keys the study shares (its data keys, the mesh)."""
  key = message.split("--config.", 1)[1].split("=", 1)[0] if "--config." in message else ""
  shared = key.startswith("mesh.") or (key.startswith("data.") and key.split(".")[1] in SHARED_DATA_KEYS)
  return message if not key or shared else message.replace("--config.", f"--config.{part}.", 1)


def validate(config: Any) -> None:
  """Checks the parts of a study config before any work (sub-configs are validated as stages)."""
  has_up = config.get("upsampler") is not None
  parse_stages(config.stages, has_up)
  names = method_names(config)
  for name in names:
    m = config.methods[name]
    if m.synthetic and m.synthetic not in config.generate.modes:
      raise SynthMedError(f"method {name!r} uses synthetic mode {m.synthetic!r}, which "
                          f"generate.modes={tuple(config.generate.modes)} does not make.")
    if m.pretrained and not config.pretrained_npz:
      raise SynthMedError(f"method {name!r} needs --config.pretrained_npz (a local BiT .npz).")
    copies = int(m.get("copies", 0))
    if copies and (m.synthetic != "replica" or copies > int(config.generate.get("replica_copies", 0))):
      raise SynthMedError(f"method {name!r} mixes in {copies} replica copies; that needs synthetic='replica' "
                          f"and generate.replica_copies >= {copies} (it is "
                          f"{config.generate.get('replica_copies', 0)}).")
    site = str(m.get("site", ""))
    if site not in ("", "external"):
      raise SynthMedError(f"method {name!r} has site={site!r}; use '' (the study's ID domains) or 'external'.")
    base = str(m.get("baseline", ""))
    if base and (base not in config.methods or base == name):
      raise SynthMedError(f"method {name!r} has baseline={base!r}; name another of the study's methods "
                          f"{list(config.methods)}.")
    for other in m.get("also_against", ()):
      if other not in config.methods or other == name or config.methods[other].synthetic != m.synthetic:
        raise SynthMedError(f"method {name!r} has also_against={tuple(m.also_against)}; name other methods of the "
                            f"study that mix in the same store ({m.synthetic!r}).")
    if site == "external" and not tuple(config.data.ood_domains):
      raise SynthMedError(f"method {name!r} trains on the external site's real images, but data.ood_domains is "
                          "empty; name a second site in --config.data.ood_domains, or leave the method out with "
                          "--config.method_names.")
  for mode in config.generate.modes:
    if mode not in SYNTHETIC_MODES and replica_guidance(mode) is None:
      raise SynthMedError(f"generate.modes has {mode!r}; choose from {list(SYNTHETIC_MODES)} or "
                          "'replica_w<w>' (a replica copy at guidance w >= 0, e.g. replica_w4).")
  for part in ("base", "upsampler") if has_up else ("base",):
    try:
      configuration.validate(stage_config(config, part))
    except SynthMedError as e:
      raise SynthMedError(_name_stage_key(str(e), part)) from None
  for name in names:
    configuration.validate(classifier_config(config, "/tmp", name, 0))
  if config.tune.method not in config.methods:
    raise SynthMedError(f"tune.method={config.tune.method!r}; choose one of {list(config.methods)}.")
  for point in grid_points(config.tune.grid):
    configuration.validate(classifier_config(config, "/tmp", config.tune.method, 0, point))
  synth_size = (config.upsampler if has_up else config.base).data.image_size
  if synth_size != config.classifier.data.image_size:
    raise SynthMedError(f"synthetic images are {synth_size} px but the classifier trains at "
                        f"{config.classifier.data.image_size} px; make the last generator's "
                        "data.image_size equal classifier.data.image_size.")
  if int(config.seeds) < 1:
    raise SynthMedError(f"--config.seeds={config.seeds} must be >= 1.")
  if int(config.generate.num_images) < 1:
    raise SynthMedError(f"--config.generate.num_images={config.generate.num_images} must be >= 1.")


class Timings:
  """Wall time per stage in timings.json across reruns: the last run's seconds and the total over
  runs (a stage resumed after a kill, or rerun for a few methods, adds up)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "timings.json")
    self.data = artifacts.read_json(self.path) if os.path.exists(self.path) else {}

  def record(self, stage: str, seconds: float, skipped: bool) -> None:
    old = self.data.get(stage, {})
    total = old.get("total_seconds", old.get("seconds", 0.0)) + (0.0 if skipped else seconds)
    self.data[stage] = {"seconds": old.get("seconds", seconds) if skipped else seconds,
                        "total_seconds": total, "skipped_last_run": skipped}
    artifacts.write_json(self.path, self.data)


def run_study(config: Any, workdir: str) -> dict[str, Any]:
  """Runs the configured stages in order; returns the aggregated results (results.json)."""
  validate(config)
  has_up = config.get("upsampler") is not None
  stages = parse_stages(config.stages, has_up)
  artifacts.write_json(os.path.join(workdir, "config.json"), artifacts.config_to_dict(config))
  timings = Timings(workdir)
  t_start = time.time()
  results: dict[str, Any] = {}
  for stage in stages:
    print(f"=== stage {stage} ===", flush=True)
    t0 = time.time()
    skipped = STAGE_FNS[stage](config, workdir)
    timings.record(stage, time.time() - t0, bool(skipped))
  total = time.time() - t_start
  print(f"study finished in {total:.0f} s; stage times (s): " +
        ", ".join(f"{k} {v['seconds']:.0f}{' (skipped)' if v['skipped_last_run'] else ''}"
                  for k, v in timings.data.items()), flush=True)
  path = output_path(config, workdir, "results")
  if os.path.exists(path):
    results = artifacts.read_json(path)
  return results


def _stage_diffusion(part: str, config: Any, workdir: str) -> bool:
  """The base model or the upsampler (`part`), trained in workdir/<part>/."""
  folder = os.path.join(workdir, part)
  done = artifacts.is_done(folder)
  run_diffusion(stage_config(config, part), folder)
  return done


def _stage_generate(config: Any, workdir: str) -> bool:
  up_cfg = stage_config(config, "upsampler") if config.get("upsampler") is not None else None
  return generate_fair(config, workdir, stage_config(config, "base"), up_cfg)


def _stage_tune(config: Any, workdir: str) -> bool:
  return run_tuning(config, workdir, lambda method, seed: classifier_config(config, workdir, method, seed))


def _stage_classifiers(config: Any, workdir: str) -> bool:
  tuned = read_best(workdir)
  if tuned is None and grid_points(config.tune.grid):
    raise SynthMedError(f"tune.grid is set but {workdir}/tune/best.json is missing; run the tune stage first "
                        "(add it to --config.stages) or set --config.tune.grid='' to train with the config as written.")
  if tuned:
    print(f"every method uses the tuned values {tuned}", flush=True)
  names = method_names(config)
  runs = [(m, s) for m in names for s in range(int(config.seeds))]
  all_done = True
  for i, (m, s) in enumerate(runs):
    folder = os.path.join(workdir, "classifiers", m, f"seed{s}")
    all_done &= artifacts.is_done(folder)
    if config.methods[m].synthetic:
      synth = os.path.join(workdir, "synthetic", config.methods[m].synthetic)
      if not artifacts.is_done(synth):
        raise SynthMedError(f"method {m!r} needs the synthetic store {synth!r}, which is not finished; "
                            "run the generate stage first (add it to --config.stages).")
    print(f"--- classifier {i + 1}/{len(runs)}: {m}, seed {s} ---", flush=True)
    if config.methods[m].get("quality_filter"):
      report = ensure_filtered_store(config, workdir, m)
      print(f"quality filter: kept {report['kept']} of {report['total']} images ({100 * report['acceptance']:.0f} %)",
            flush=True)
    stores = None
    cfg_store = replica_guidance(str(config.methods[m].synthetic)) is not None
    if m == reference_method(config) or cfg_store:  # these models also score the synthetic stores
      stores = {mode: os.path.join(workdir, "synthetic", mode) for mode in config.generate.modes
                if artifacts.is_done(os.path.join(workdir, "synthetic", mode))
                and (m == reference_method(config) or replica_guidance(mode) is not None)}
    run_classifier(classifier_config(config, workdir, m, int(config.seed) + s, tuned), folder, stores)
  return all_done


def store_fidelity(config: Any, workdir: str, world: Any) -> dict[str, Any]:
  """The probe's `fidelity` of each finished synthetic store, against the real val + ID test images of
  `world` (the classifier's: unskewed, labelled, at its resolution)."""
  stores = {m: os.path.join(workdir, "synthetic", m) for m in config.generate.modes}
  stores = {m: f for m, f in stores.items() if artifacts.is_done(f)}
  if not stores:
    return {}
  attribute = str(config.generate.attribute)
  probes = real_probes(config, world)
  out = {m: fidelity(probes, read_shards(f).arrays, attribute) for m, f in stores.items()}
  spec = next((a for a in world.spec.attributes if a.name == attribute), None)
  for entry in out.values():  # name the requested values as the data do (female / male, tone=dark)
    per = entry.get(attribute, {}).get("synthetic_per_value")
    if per and spec is not None:
      entry[attribute]["synthetic_per_value"] = {spec.value_name(int(k)): v for k, v in per.items()}
  return out


def _stage_evaluate(config: Any, workdir: str) -> bool:
  names = method_names(config)
  res = aggregate(config, workdir, names, int(config.seeds))
  res["reference"] = reference_method(config)
  res["comparisons"] = {}
  for base in dict.fromkeys(baseline_of(config, m) for m in names):  # each method against its own baseline
    group = [m for m in names if baseline_of(config, m) == base and m != base]
    found = comparisons(workdir, res, base, group, int(config.seeds),
                        int(config.classifier.eval.min_group_size), int(config.comparisons.bootstrap), int(config.seed))
    for entry in found.values():
      if base != res["reference"]:
        entry["against"] = base
    res["comparisons"].update(found)
  for m in names:  # e.g. a learnt-weights mix against its fixed-weight mix (the weights' own effect) and MW-Net
    for other in config.methods[m].get("also_against", ()):
      if other in names:
        found = comparisons(workdir, res, other, [m], int(config.seeds), int(config.classifier.eval.min_group_size),
                            int(config.comparisons.bootstrap), int(config.seed))
        for entry in found.values():
          entry["against"] = other
          res["comparisons"][f"{m} vs {other}"] = entry
  if os.path.exists(best_path(workdir)):
    res["tuning"] = artifacts.read_json(best_path(workdir))
  if config.get("fidelity", True):
    world = make_world(stage_config(config, "classifier").data)
    attribute = str(config.generate.attribute)
    res["fidelity"] = store_fidelity(config, workdir, world)
    value_names = next((tuple(a.values) for a in world.spec.attributes if a.name == attribute), ())
    res["fidelity_classifier"] = classifier_fidelity(
        [os.path.join(workdir, "classifiers", res["reference"], f"seed{s}") for s in range(int(config.seeds))],
        attribute, value_names)
  artifacts.write_json(output_path(config, workdir, "results"), res)
  print(results_table(res), flush=True)
  print(comparison_table(res), flush=True)
  return False


def analysis_inputs(config: Any, workdir: str) -> StudyRuns:
  """What the analyze stage reads from this study's workdir."""
  stores = {m: os.path.join(workdir, "synthetic", m) for m in config.generate.modes}
  names = method_names(config)
  store_method = {}
  for m in names:  # the mix that trains on each store (alpha in (0, 1), no control, filter or learnt weights)
    method = config.methods[m]
    if (method.synthetic and 0 < float(method.alpha) < 1 and not method.control and not method.get("quality_filter")
        and not method.get("reweight") and method.synthetic not in store_method):
      store_method[method.synthetic] = m
  filtered = {m: (store_method.get(config.methods[m].synthetic, ""), synthetic_folder(workdir, config.methods[m]))
              for m in names if config.methods[m].get("quality_filter")}
  cfg_matrix = {m: str(config.methods[m].synthetic) for m in names
                if replica_guidance(str(config.methods[m].synthetic)) is not None}
  def supplement_kind(m: str) -> str:
    if config.methods[m].get("site") == "external":
      return "two sites"
    return "real+synthetic" if float(config.methods[m].alpha) > 0 else "synthetic only"
  supplement = {m: (supplement_kind(m), 100 * int(config.methods[m].get("copies", 0)))
                for m in names if int(config.methods[m].get("copies", 0)) > 0}
  supplement_baselines = {kind: baseline_of(config, m) for m, (kind, _) in supplement.items()
                          if baseline_of(config, m) in names}
  return StudyRuns(workdir=workdir, methods=names, seeds=int(config.seeds), reference=reference_method(config),
                   attribute=str(config.generate.attribute),
                   stores={m: f for m, f in stores.items() if artifacts.is_done(f)}, store_method=store_method,
                   filtered=filtered, supplement=supplement, supplement_baselines=supplement_baselines,
                   cfg_matrix=cfg_matrix,
                   learnt_weights={m: str(config.methods[m].synthetic) for m in names
                                   if config.methods[m].get("reweight")},
                   classifier_config=stage_config(config, "classifier"),
                   generator_config=stage_config(config, "upsampler" if config.get("upsampler") is not None
                                                 else "base"),
                   results_path=output_path(config, workdir, "results"), n_boot=int(config.comparisons.bootstrap),
                   seed=int(config.seed))


def _stage_analyze(config: Any, workdir: str) -> bool:
  run_analyses(analysis_inputs(config, workdir))
  return False


def _stage_report(config: Any, workdir: str) -> bool:
  res_path = output_path(config, workdir, "results")
  res = artifacts.read_json(res_path) if os.path.exists(res_path) else None
  timings_path = os.path.join(workdir, "timings.json")
  timings = artifacts.read_json(timings_path) if os.path.exists(timings_path) else {}
  summary = {"world": str(config.data.world), "skew_setting": str(config.data.skew.setting),
             "skew_attribute": str(config.data.skew.attribute), "attribute": str(config.generate.attribute),
             "seeds": int(config.seeds), "num_images": int(config.generate.num_images)}
  samples = None
  store = next((os.path.join(workdir, "synthetic", m) for m in ("label_property", "label")
                if os.path.isdir(os.path.join(workdir, "synthetic", m))), None)
  if store is not None:  # real training images next to the label + property store's
    world = make_world(stage_config(config, "classifier").data)
    split = world.split("train")
    n = min(len(split), 2000)
    real = materialise(WorldSource(world, dataclasses.replace(split, ids=split.ids[:n])), "report samples").arrays
    samples = {"real": real, "synthetic": read_shards(store).arrays, "spec": world.spec,
               "store": os.path.relpath(store, workdir)}
  path = write_report(output_path(config, workdir, "report"), res, timings, summary, samples)
  print(f"wrote {path}", flush=True)
  return False


STAGE_FNS = {"base": functools.partial(_stage_diffusion, "base"),
             "upsampler": functools.partial(_stage_diffusion, "upsampler"), "generate": _stage_generate,
             "tune": _stage_tune, "classifiers": _stage_classifiers, "evaluate": _stage_evaluate, "analyze": _stage_analyze,
             "report": _stage_report}

