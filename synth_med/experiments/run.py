"""`run(config, workdir)`: the one call `launch/main.py` makes."""
from __future__ import annotations

import os
from typing import Any

from synth_med import configuration
from synth_med.errors import SynthMedError


def run(config: Any, workdir: str) -> Any:
  """Validates the config and runs its experiment in `workdir`."""
  configuration.validate(config)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise SynthMedError(f"cannot create workdir {workdir!r}: {e.strerror}; pass a writable --workdir.") from e
  if not os.access(workdir, os.W_OK):
    raise SynthMedError(f"workdir {workdir!r} is not writable; pass a writable --workdir.")
  if config.distributed:
    import jax
    jax.distributed.initialize()
  if config.experiment == "classifier":
    from synth_med.experiments.classifier import run_classifier
    return run_classifier(config, workdir)
  raise SynthMedError(f"experiment {config.experiment!r} is unknown; choose one of "
                      f"{list(configuration.EXPERIMENTS)}.")
