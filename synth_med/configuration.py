"""Config validation: every enumerated setting is checked once, before any work.

ml_collections already refuses unknown keys (the configs are locked) and wrong
types on override; this adds the valid *choices* of each enumerated key, and
names both the key and the choices in the error.
"""
from __future__ import annotations

from typing import Any

from synth_med.errors import SynthMedError
from synth_med.data.augment import AUGMENTS
from synth_med.data.worlds import WORLDS
from synth_med.data.worlds.base import SKEW_FRACTIONS
from synth_med.data.label_policy import LABEL_POLICIES
from synth_med.train.optimizers import OPTIMIZERS, SCHEDULES
from synth_med.data.tables import SOURCES
from synth_med.models.bit_resnet import DEPTHS
from synth_med.objectives.classification import LOSSES
from synth_med.data.mixing import check_alpha
from synth_med.diffusion.samplers import SAMPLERS
from synth_med.diffusion.schedules import SCHEDULES as NOISE_SCHEDULES, VARIANCES
from synth_med.models.diffusion_unets import MODELS
from synth_med.models.gan_layers import GAN_MODELS

EXPERIMENTS = ("classifier", "diffusion", "gan", "study", "tstr")


def _choice(config: Any, dotted: str, choices) -> None:
  value = config
  for part in dotted.split("."):
    value = value[part]
  if value not in choices:
    raise SynthMedError(f"--config.{dotted}={value!r} is not valid; choose one of {list(choices)}.")


def _positive(config: Any, dotted: str, allow_zero: bool = False) -> None:
  value = config
  for part in dotted.split("."):
    value = value[part]
  if value < 0 or (value == 0 and not allow_zero):
    raise SynthMedError(f"--config.{dotted}={value!r} must be {'>= 0' if allow_zero else '> 0'}.")


def validate(config: Any) -> None:
  """Raises SynthMedError naming the first invalid key and its valid choices."""

  _choice(config, "experiment", EXPERIMENTS)
  if config.experiment in ("study", "tstr"):
    raise SynthMedError("configuration.validate checks one stage's config; a study config is checked by "
                        "synth_med.experiments.run.validate (which validates each of its stages).")
  _choice(config, "data.source", ("world",) + SOURCES)
  _choice(config, "data.world", WORLDS)
  _choice(config, "data.label_policy", LABEL_POLICIES)
  _choice(config, "data.skew.setting", tuple(SKEW_FRACTIONS))
  _choice(config, "data.augment", AUGMENTS)
  _choice(config, "train.optimizer.name", OPTIMIZERS)
  _choice(config, "train.optimizer.schedule", SCHEDULES)
  # A real data set's *_size keys cap its splits, 0 meaning all of it; a procedural world needs a size.
  sized = ("data.train_size",) if str(config.data.source) == "world" else ()
  for key in ("data.image_size",) + sized + ("train.steps", "train.batch_size", "train.optimizer.lr"):
    _positive(config, key)
  for key in ("train_size", "val_size", "test_size", "ood_size", "unlabelled_size"):
    if int(config.data.get(key, 0)) < 0:
      raise SynthMedError(f"--config.data.{key}={config.data[key]} must be >= 0 (0 = the whole split).")
  if not 8 <= config.data.image_size <= 1024:
    raise SynthMedError(f"--config.data.image_size={config.data.image_size} must be in 8..1024.")
  if not 0.0 <= config.train.ema_decay < 1.0:
    raise SynthMedError(f"--config.train.ema_decay={config.train.ema_decay} must be in [0, 1).")
  for name, size in config.mesh.items():
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise SynthMedError(f"--config.mesh.{name}={size!r} must be a positive int or -1.")
  if config.experiment == "classifier":
    _validate_classifier(config)
  elif config.experiment == "gan":
    _validate_gan(config)
  else:
    _validate_diffusion(config)


def _validate_gan(config: Any) -> None:
  """A GAN stage (paper 001): its model, both optimizers, the growth phase and FID early stopping."""
  _choice(config, "model.name", GAN_MODELS)
  _choice(config, "train.critic_optimizer.name", OPTIMIZERS)
  _choice(config, "train.critic_optimizer.schedule", SCHEDULES)
  size = int(config.data.image_size)
  if size & (size - 1):
    raise SynthMedError(f"--config.data.image_size={size} must be a power of 2 for a GAN (e.g. 16, 32, 64).")
  for key in ("model.z_dim", "model.base_channels", "model.max_channels", "train.critic_optimizer.lr",
              "gan.phase_images", "fid.patience"):
    _positive(config, key)
  for key in ("fid.every_images", "fid.images", "fid.min_images", "gan.gp_weight", "gan.drift", "gan.ac_weight"):
    _positive(config, key, allow_zero=True)
  if config.model.name == "prog_gan":
    start = int(config.model.start_size)
    if start < 4 or start > size or start & (start - 1):
      raise SynthMedError(f"--config.model.start_size={start} must be a power of 2 from 4 to data.image_size={size}.")
  if int(config.fid.every_images) > 0 and int(config.fid.images) < 2:
    raise SynthMedError(f"--config.fid.images={config.fid.images}: FID needs at least 2 images (001: 10,000).")


def _validate_classifier(config: Any) -> None:

  _choice(config, "model.name", ("bit_resnet",))
  if not config.model.block_units:
    _choice(config, "model.depth", tuple(sorted(DEPTHS)))
  _choice(config, "loss.name", LOSSES)
  sized = ("data.test_size", "data.ood_size") if str(config.data.source) == "world" else ()
  for key in sized + ("eval.batch_size", "model.width"):
    _positive(config, key)
  check_alpha(config.mix.alpha)
  _positive(config, "mix.equality_level", allow_zero=True)
  _positive(config, "mix.filter_dominant", allow_zero=True)
  _positive(config, "mix.synthetic_copies", allow_zero=True)
  _positive(config, "mix.synthetic_holdout", allow_zero=True)
  _choice(config, "mix.control", ("", "real_images", "label_prior"))
  if config.mix.control and float(config.mix.alpha) >= 1.0:
    raise SynthMedError(f"mix.control={config.mix.control!r} replaces a synthetic store's images; it needs "
                        "mix.alpha < 1 and mix.synthetic_dir (a control of a synthetic mix).")
  reweight = config.get("reweight")
  if reweight is not None and reweight.method:
    _choice(config, "reweight.method", ("", "ids", "mwnet"))
    _choice(config, "reweight.input", ("features", "image"))
    if not 0.0 < float(config.mix.alpha) < 1.0:
      raise SynthMedError(f"reweight.method={reweight.method!r} learns weights of synthetic examples next to real "
                          f"ones; it needs 0 < mix.alpha < 1 (it is {config.mix.alpha}) and mix.synthetic_dir.")
    if config.train.get("weighting_optimizer") is None:
      raise SynthMedError("reweight.method is set but the config lacks train.weighting_optimizer (the weighting "
                          "network's optimizer; configs/common.train_config makes one).")
    _choice(config, "train.weighting_optimizer.name", OPTIMIZERS)
    _choice(config, "train.weighting_optimizer.schedule", SCHEDULES)
    for key in ("reweight.hidden", "reweight.temperature", "reweight.input_size", "train.weighting_optimizer.lr"):
      _positive(config, key)
    _positive(config, "reweight.entropy", allow_zero=True)


def _validate_diffusion(config: Any) -> None:

  _choice(config, "model.name", MODELS)
  _choice(config, "model.dtype", ("float32", "bfloat16"))
  _choice(config, "model.matmul_precision", ("float32", "bfloat16"))
  _choice(config, "diffusion.schedule", NOISE_SCHEDULES)
  _choice(config, "diffusion.variance", VARIANCES)
  _choice(config, "sampler.name", SAMPLERS)
  for key in ("model.model_channels", "model.num_res_blocks", "diffusion.num_steps", "sampler.steps",
              "sampler.batch_size"):
    _positive(config, key)
  if not config.model.channel_mult:
    raise SynthMedError("--config.model.channel_mult must name at least one level, e.g. (1, 2, 2).")
  if config.sampler.steps > config.diffusion.num_steps:
    raise SynthMedError(f"--config.sampler.steps={config.sampler.steps} exceeds diffusion.num_steps="
                        f"{config.diffusion.num_steps}; use at most T steps.")
  for key in ("diffusion.drop_prob", "diffusion.low_res.antialias_prob", "diffusion.low_res.noise_prob",
              "diffusion.low_res.blur_prob"):
    value = config.diffusion
    for part in key.split(".")[1:]:
      value = value[part]
    if not 0.0 <= value <= 1.0:
      raise SynthMedError(f"--config.{key}={value} is a probability; use a value in [0, 1].")
