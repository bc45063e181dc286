"""`run(config, workdir)`: the one call `launch/main.py` makes."""
from __future__ import annotations

from typing import Any

import jax

from synth_med import configuration
from synth_med.errors import SynthMedError
from synth_med.experiments.classifier import run_classifier
from synth_med.experiments.diffusion import run_diffusion
from synth_med.experiments.gan import run_gan
from synth_med.experiments.study import run_study
from synth_med.experiments.study import validate as validate_study
from synth_med.experiments.tstr import run_tstr
from synth_med.experiments.tstr import validate as validate_tstr
from synth_med.infra.artifacts import ensure_writable_dir


def validate(config: Any) -> None:
  """Raises SynthMedError naming the first invalid key: a study's own keys and each stage's, or one
  classifier / diffusion config's."""
  if config.get("experiment") == "study":
    validate_study(config)
  elif config.get("experiment") == "tstr":
    validate_tstr(config)
  else:
    configuration.validate(config)


def run(config: Any, workdir: str) -> Any:
  """Validates the config and runs its experiment in `workdir`."""
  validate(config)
  ensure_writable_dir(workdir)
  if config.distributed:
    jax.distributed.initialize()
  if config.experiment == "classifier":
    return run_classifier(config, workdir)
  if config.experiment == "diffusion":
    return run_diffusion(config, workdir)
  if config.experiment == "gan":
    return run_gan(config, workdir)
  if config.experiment == "study":
    return run_study(config, workdir)
  if config.experiment == "tstr":
    return run_tstr(config, workdir)
  raise SynthMedError(f"experiment {config.experiment!r} is unknown; choose one of "
                      f"{list(configuration.EXPERIMENTS)}.")
