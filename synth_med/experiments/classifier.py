"""The classifier stage: train a BiT-ResNet on a world's labelled ID data, evaluate ID and OOD.

Writes to its folder: checkpoints/, tensorboard/, config.json, metrics.json,
predictions.npz (every split's per-example outputs, labels and attributes),
features.npz (every split's penultimate-layer features, float16; the study's real-data model also
its training images' and the synthetic stores'),
val_curve.json (the validation metrics every `train.eval_every` steps; also
in metrics.json as `val_curve`, with the final step) and DONE. A folder with DONE is skipped; one without resumes from its checkpoint.
Later stages (baselines, synthetic mixes, seeds) call `run_classifier` with
their own folder.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from synth_med.data.augment import make_augment
from synth_med.data.mixing import MixedStream, check_alpha, classifier_arrays
from synth_med.data.pipeline import ArraySource, RowSubset, TrainStream, WorldSource, eval_batches, materialise
from synth_med.data.shards import read_shards
from synth_med.diffusion.fair_sampler import first_copies, held_out
from synth_med.data.tables import save_vocabulary
from synth_med.data.sources import make_world
from synth_med.evaluation.evaluator import ClassificationEvaluator, flatten_for_writer
from synth_med.infra.image_grid import make_grid, save_png
from synth_med.evaluation.paired import PREDICTIONS_FILE, save_predictions
from synth_med.errors import SynthMedError
from synth_med.infra import artifacts
from synth_med.models import bit_resnet
from synth_med.objectives.classification import ClassifierTask, probabilities
from synth_med.objectives.learnt_weights import LearntWeightsTask
from synth_med.objectives.reweighting import (dominant_classes, equality_weights, filter_weights, label_keys,
                                              oversample_rows)
from synth_med.infra import sharding
from synth_med.train import jit_cache
from synth_med.infra.checkpoint import read_checkpoint
from synth_med.train.loop import train
from synth_med.train.metric_writers import create_writer


VAL_CURVE_FILE = "val_curve.json"  # [{step, metric: value}] every train.eval_every steps


def build_model(config: Any, spec) -> bit_resnet.Model:
  m = config.model
  return bit_resnet.Model(num_outputs=bit_resnet.num_outputs(spec.label_kind, spec.num_classes),
                          depth=int(m.depth), width=float(m.width), block_units=tuple(m.block_units),
                          root_pool=bool(m.root_pool))


FEATURES_FILE = "features.npz"  # {split or 'train' or 'synthetic/<store>': [N, d] float16}
LEARNT_WEIGHTS_FILE = "learnt_weights.npz"  # {'weight': [M, L]}: every row of the mixed-in store (reweight.method)


def learnt_weights_task(classifier: ClassifierTask, config: Any, spec: Any, synthetic_examples: int) -> LearntWeightsTask:
  """The classifier with learnt synthetic-example weights (`config.reweight`); IDS's epoch (the Q(Z|Y) and
  centroid refresh) is one pass over the synthetic examples at the mix's rate, (1 − α) × batch per step."""
  r = config.reweight
  per_step = max((1.0 - float(config.mix.alpha)) * int(config.train.batch_size), 1.0)
  return LearntWeightsTask(classifier, spec.num_classes, method=str(r.method), weight_input=str(r.input),
                           hidden=int(r.hidden), epoch_steps=int(np.ceil(synthetic_examples / per_step)),
                           temperature=float(r.temperature), input_size=int(r.input_size),
                           reweight_real=bool(r.reweight_real), virtual_lr=float(r.virtual_lr),
                           weighted_vib=bool(r.weighted_vib), entropy=float(r.entropy))


def save_learnt_weights(task: LearntWeightsTask, params: Any, mesh: jax.sharding.Mesh, folder: str, path: str,
                        batch_size: int) -> np.ndarray:
  """The learnt weight of every row of the store in `folder` (its label as the condition), saved to `path`."""
  arrays = read_shards(folder).arrays
  fn = jax.jit(task.weights, out_shardings=sharding.replicated(mesh))
  source = ArraySource({k: arrays[k] for k in ("image", "label", "label_mask")})
  weights = source_outputs(source, lambda batch: jax.device_get(fn(params, sharding.to_global(batch, mesh))),
                           batch_size).astype(np.float32)
  artifacts.atomic_write(path, lambda f: np.savez_compressed(f, weight=weights), mode="wb", suffix=".npz")
  return weights


def _batch_fn(task: ClassifierTask, mesh: jax.sharding.Mesh, name: str, head, *variant):
  """(params) -> fn(local batch dict) -> head(logits, features) of the global batch (numpy), jitted once
  per (name, task, mesh, variant)."""
  key = jit_cache.task_key(task)
  fn = jit_cache.shared(key and (name, key, mesh, *variant), lambda: jax.jit(
      lambda params, images: head(*task.logits(params, images)), out_shardings=sharding.replicated(mesh)))

  def bind(params):
    def apply(batch):
      images = sharding.to_global({"image": batch["image"]}, mesh)["image"]
      return np.asarray(jax.device_get(fn(params, images)))
    return apply
  return bind


def make_embed(task: ClassifierTask, mesh: jax.sharding.Mesh):
  """(params) -> fn(local batch dict) -> the global batch's pre-logit features (numpy)."""
  return _batch_fn(task, mesh, "embed", lambda logits, features: features)


def source_outputs(source: Any, fn: Any, batch_size: int) -> np.ndarray:
  """fn(local batch dict) -> the global batch's outputs, for every example of `source`, in order."""
  out = []
  for batch, valid in eval_batches(source, batch_size):
    keep = multihost_utils.process_allgather(valid, tiled=True)
    out.append(np.asarray(fn(batch))[keep])
  return np.concatenate(out)


def embed_source(source: Any, embed: Any, batch_size: int) -> np.ndarray:
  """Every example's features, in order, as float16."""
  return source_outputs(source, embed, batch_size).astype(np.float16)


def load_embedder(config: Any, run_dir: str) -> Callable[[np.ndarray], np.ndarray]:
  """fn(uint8 images [N, H, W, C]) -> float32 pre-logit features of the finished classifier run in
  `run_dir` (its config `config`; EMA weights when eval.use_ema): paper 001's FID and nearest-neighbour
  feature space."""
  spec = make_world(config.data).spec
  task = ClassifierTask(build_model(config, spec), spec.label_kind)
  tree, _ = read_checkpoint(os.path.join(run_dir, "checkpoints"))
  params = tree["ema_params" if config.eval.use_ema else "params"]
  mesh = sharding.make_mesh(config.mesh)
  embed = make_embed(task, mesh)(params)
  bs = int(config.eval.batch_size)

  def fn(images: np.ndarray) -> np.ndarray:
    return embed_source(ArraySource({"image": np.asarray(images, np.uint8)}), embed, bs).astype(np.float32)
  return fn


def save_features(path: str, features: dict[str, np.ndarray]) -> None:
  artifacts.atomic_write(path, lambda f: np.savez_compressed(f, **features), mode="wb", suffix=".npz")


def load_features(path: str) -> dict[str, np.ndarray]:
  """{name: float32 features}, and the training images' attribute codes under 'attrs/train/<a>'."""
  with np.load(path) as z:
    return {k: z[k] if k.startswith("attrs/") else z[k].astype(np.float32) for k in z.files}


def make_predict(task: ClassifierTask, mesh: jax.sharding.Mesh, label_kind: str):
  """(params) -> fn(local batch dict) -> global probabilities (numpy)."""
  return _batch_fn(task, mesh, "predict", lambda logits, features: probabilities(logits, label_kind), label_kind)


def training_stream(source: Any, spec: Any, config: Any) -> tuple[Any, dict[str, Any]]:
  """The classifier's training stream: real data (optionally oversampled, w1-weighted), mixed with
  synthetic shards (w2-weighted) when `mix.alpha < 1` (002 Eq. 3/8)."""
  mix = config.mix
  alpha = check_alpha(mix.alpha)
  bs, seed, threads = int(config.train.batch_size), int(config.seed), int(config.data.num_threads)
  level, k_dom = float(mix.equality_level), int(mix.filter_dominant)
  plain = alpha == 1.0 and level == 0.0 and not mix.oversample
  info: dict[str, Any] = {"alpha": alpha, "equality_level": level, "filter_dominant": k_dom,
                          "oversample": bool(mix.oversample), "synthetic_dir": str(mix.synthetic_dir)}
  if plain:
    return TrainStream(source, bs, seed=seed, num_threads=threads), info
  attr_names = tuple(a.name for a in spec.attributes)
  if mix.attribute not in attr_names:
    raise SynthMedError(f"mix.attribute={mix.attribute!r}; the {spec.name} data have {list(attr_names)}.")
  arrays = source.arrays if hasattr(source, "arrays") else materialise(source, "train split").arrays
  keys = label_keys(arrays["label"], spec.label_kind)
  attrs = arrays[f"attrs/{mix.attribute}"]
  w1 = equality_weights(keys, attrs, level)
  real = classifier_arrays(arrays, w1, attr_names)
  if mix.oversample:
    real = RowSubset(real, oversample_rows(attrs, seed))
  info["real_examples"] = len(real)
  synthetic = None
  if alpha < 1.0:
    if not mix.synthetic_dir:
      raise SynthMedError("mix.alpha < 1 needs synthetic data: set mix.synthetic_dir to a generation "
                          "folder (shard-*.npz), or mix.alpha=1 for real data only.")
    synth = first_copies(read_shards(str(mix.synthetic_dir)).arrays, int(mix.synthetic_copies))
    if int(mix.synthetic_holdout) > 0:  # train on the rows not set aside for validation
      keep = ~held_out(synth, int(mix.synthetic_holdout))
      synth = {k: v[keep] for k, v in synth.items()}
    size = tuple(arrays["image"].shape[1:])
    if tuple(synth["image"].shape[1:]) != size:
      raise SynthMedError(f"synthetic images in {mix.synthetic_dir!r} are {tuple(synth['image'].shape[1:])} "
                          f"but the classifier trains on {size}; generate at data.image_size.")
    control = str(mix.get("control", "") or "")
    if control:
      synth, info["control_matched"] = control_images(synth, arrays, spec.label_kind, mix.attribute, control, seed)
      info["control"] = control
    dominant = dominant_classes(arrays["label"], k_dom) if spec.label_kind == "softmax" else ()
    w2 = filter_weights(label_keys(synth["label"], spec.label_kind), dominant)
    synthetic = classifier_arrays(synth, w2, attr_names)
    info.update(synthetic_examples=len(synthetic), dominant_classes=[spec.class_names[c] for c in dominant],
                synthetic_kept=float(np.mean(w2)))
  return MixedStream(real if alpha > 0 else None, synthetic, alpha, bs, seed, threads), info


def control_images(synth: dict[str, np.ndarray], real: dict[str, np.ndarray], label_kind: str, attribute: str,
                   control: str, seed: int) -> tuple[dict[str, np.ndarray], float]:
  """The synthetic store's rows (labels, masks, properties) with real training images in their place.

  `real_images`: for each row a random real image with the same label key and the same value of
  `attribute` (the row's requested value; a row without one, or with a (label, value) pair the real data
  lack, takes any real image of its label). `label_prior`: a random real image of the same label, so the
  stream is the real data resampled to the store's label distribution. Rows whose label no real image has
  keep their synthetic image. Returns (arrays, fraction of rows matched as the control asks)."""
  rng = np.random.default_rng([seed, 7919])
  s_keys, r_keys = label_keys(synth["label"], label_kind), label_keys(real["label"], label_kind)
  s_attr = synth.get(f"attrs/{attribute}", np.full(len(s_keys), -1))
  r_attr = real[f"attrs/{attribute}"]
  images = np.array(synth["image"], copy=True)
  matched = np.zeros(len(s_keys), bool)
  by_label = {k: np.flatnonzero(r_keys == k) for k in np.unique(s_keys)}
  for i, (k, a) in enumerate(zip(s_keys, s_attr)):
    pool = by_label[k]
    if control == "real_images" and a >= 0:
      same = pool[r_attr[pool] == a]
      matched[i] = len(same) > 0
      pool = same if len(same) else pool
    else:
      matched[i] = len(pool) > 0
    if len(pool):
      images[i] = real["image"][rng.choice(pool)]
  return {**synth, "image": images}, float(matched.mean()) if len(matched) else 0.0


def eval_params(state, config: Any) -> Any:
  """The parameters evaluation uses: EMA if `eval.use_ema`, else the raw params."""
  return state.ema_params if config.eval.use_ema else state.params


SYNTHETIC_PREDICTIONS_FILE = "synthetic_predictions.npz"  # the model's outputs on synthetic stores


def run_classifier(config: Any, workdir: str, synthetic_stores: dict[str, str] | None = None) -> dict[str, Any]:
  """Trains and evaluates one classifier; returns the metrics dict (also in metrics.json).

  `synthetic_stores` ({name: generation folder}): the trained model also predicts those images, saved in
  synthetic_predictions.npz with the conditions they were generated for (the study's real-data model
  scores whether the generator rendered the requested label)."""
  metrics_path = os.path.join(workdir, "metrics.json")
  done = artifacts.begin_stage(workdir, config, "classifier")
  if done is not None:
    return done
  t0 = time.time()

  world = make_world(config.data)
  save_vocabulary(world, workdir)
  spec = world.spec
  mesh = sharding.make_mesh(config.mesh)
  train_split = world.split("train")
  if len(train_split) == 0:
    raise SynthMedError("the training split is empty after skew and label-policy filtering; raise "
                        "data.train_size or relax data.skew.")
  source = WorldSource(world, train_split)
  if config.data.cache:
    source = materialise(source, "train split")
  stream, mix_info = training_stream(source, spec, config)
  model = build_model(config, spec)
  task = ClassifierTask(model, spec.label_kind, loss=config.loss.name,
                        focal_gamma=float(config.loss.focal_gamma),
                        augment=make_augment(str(config.data.world), config.data.augment),  # the modality
                        pretrained_npz=config.model.pretrained_npz, load_fn=bit_resnet.load)
  if config.get("reweight") is not None and config.reweight.method:
    task = learnt_weights_task(task, config, spec, int(mix_info.get("synthetic_examples", 0)))
  bind = make_predict(task, mesh, spec.label_kind)
  eval_bs = int(config.eval.batch_size)
  sharding.check_batch_size(eval_bs, mesh, "eval.batch_size")

  def eval_source(name):
    src = WorldSource(world, world.split(name))
    return materialise(src, f"{name} split") if config.data.cache else src

  eval_writer = create_writer(os.path.join(workdir, "tensorboard", "eval"), console=False)
  grid = make_grid(source.fetch(np.arange(min(64, len(source))))["image"])
  eval_writer.write_images(0, {"train_examples": grid})
  save_png(os.path.join(workdir, "train_examples.png"), grid)
  val_eval = ClassificationEvaluator("val", eval_source("val"), spec, config.eval, eval_bs, fairness=False)
  every = int(config.train.eval_every)

  curve_path = os.path.join(workdir, VAL_CURVE_FILE)
  # The validation curve survives a kill: points past the resumed step are dropped and re-measured.
  curve = artifacts.read_json(curve_path) if os.path.exists(curve_path) else []

  def val_hook(step: int, state) -> None:
    if every > 0 and step % every == 0 and step < int(config.train.steps):
      res = val_eval.run(bind(eval_params(state, config)))
      curve[:] = [c for c in curve if c["step"] < step] + [{"step": step, **res["overall"]}]
      artifacts.write_json(curve_path, curve)
      eval_writer.write_scalars(step, flatten_for_writer("val", res))
      summary = ", ".join(f"{k}={v:.3f}" for k, v in res["overall"].items() if v is not None and "/" not in k)
      print(f"val @ step {step}: {summary}", flush=True)

  result = train(task, config, stream, workdir, hooks=[val_hook], mesh=mesh)
  t_train = time.time() - t0
  predict = bind(eval_params(result.state, config))
  metrics: dict[str, Any] = {"world": spec.name, "label_kind": spec.label_kind, "classes": list(spec.class_names),
                             "high_risk": list(spec.high_risk), "train_examples": len(train_split),
                             "train_domains": list(world.train_domains),
                             "steps": int(config.train.steps), "mix": mix_info, "splits": {}}
  split_predictions = {}
  embed = make_embed(task, mesh)(eval_params(result.state, config))
  features = {}
  for name in ("val",) + world.eval_split_names():
    ev = val_eval if name == "val" else ClassificationEvaluator(name, eval_source(name), spec, config.eval,
                                                               eval_bs)
    preds = ev.predictions(predict)
    features[name] = embed_source(ev.source, embed, eval_bs)
    res = ev.score(preds)
    split_predictions[name] = preds
    metrics["splits"][name] = res
    if name == "val" and every > 0:
      metrics["val_curve"] = curve + [{"step": int(config.train.steps), **res["overall"]}]
    eval_writer.write_scalars(int(config.train.steps), flatten_for_writer(name, res))
  metrics["wall_time_s"] = {"train": t_train, "total": time.time() - t0}
  eval_writer.flush()
  save_predictions(os.path.join(workdir, PREDICTIONS_FILE), split_predictions)
  if synthetic_stores is not None:  # the study's real-data model: its training images' features too
    features["train"] = embed_source(source, embed, eval_bs)
    meta = world.metadata(np.asarray(train_split.ids, np.int64))  # the attributes without the pixels
    for a in spec.attributes:
      features[f"attrs/train/{a.name}"] = np.asarray(meta[f"attrs/{a.name}"], np.int32)
  if synthetic_stores:
    synth_preds = {}
    for store, folder in synthetic_stores.items():
      arrays = read_shards(folder).arrays
      ev = ClassificationEvaluator(store, ArraySource(arrays), spec, config.eval, eval_bs, fairness=False,
                                   attributes=tuple(a for a in (x.name for x in spec.attributes)
                                                    if f"attrs/{a}" in arrays))
      synth_preds[store] = ev.predictions(predict)
      features[f"synthetic/{store}"] = embed_source(ev.source, embed, eval_bs)
    save_predictions(os.path.join(workdir, SYNTHETIC_PREDICTIONS_FILE), synth_preds)
  save_features(os.path.join(workdir, FEATURES_FILE), features)
  if isinstance(task, LearntWeightsTask):
    w = save_learnt_weights(task, eval_params(result.state, config), mesh, str(config.mix.synthetic_dir),
                            os.path.join(workdir, LEARNT_WEIGHTS_FILE), eval_bs)
    metrics["learnt_weights"] = {"method": task.method, "mean": float(w.mean()), "std": float(w.std()),
                                 "rows": int(len(w))}
  artifacts.write_json(metrics_path, metrics)
  artifacts.mark_done(workdir)
  print(summary_table(metrics), flush=True)
  print(f"wrote {metrics_path} ({metrics['wall_time_s']['total']:.0f} s)", flush=True)
  return metrics


def summary_table(metrics: dict[str, Any]) -> str:
  """A short human-readable table of the headline metrics and gaps per split."""
  lines = []
  for split, res in metrics["splits"].items():
    head = ", ".join(f"{k}={v:.3f}" for k, v in res["overall"].items()
                     if v is not None and "/" not in k)
    lines.append(f"[{split}] n={res['n']}: {head}")
    for attr, gaps in res.get("gaps", {}).items():
      txt = ", ".join(f"{m}={g['gap']:.3f}" for m, g in gaps.items() if g["gap"] is not None)
      if txt:
        lines.append(f"    gap by {attr}: {txt}")
  return "\n".join(lines)
