"""`run(config, workdir)`: the one call `launch/main.py` makes."""
from __future__ import annotations

from typing import Any

from synth_med import configuration
from synth_med.experiments.artifacts import ensure_writable_dir
from synth_med.errors import SynthMedError


def run(config: Any, workdir: str) -> Any:
  """Validates the config and runs its experiment in `workdir`."""
  configuration.validate(config)
  ensure_writable_dir(workdir)
  if config.distributed:
    import jax
    jax.distributed.initialize()
  if config.experiment == "classifier":
    from synth_med.experiments.classifier import run_classifier
    return run_classifier(config, workdir)
  if config.experiment == "diffusion":
    from synth_med.experiments.diffusion import run_diffusion
    return run_diffusion(config, workdir)
  if config.experiment == "study":
    from synth_med.experiments.study import run_study
    return run_study(config, workdir)
  raise SynthMedError(f"experiment {config.experiment!r} is unknown; choose one of "
                      f"{list(configuration.EXPERIMENTS)}.")
