"""Checkpoints through orbax `CheckpointManager`: keep-N, atomic, resume from the workdir. The training
loop saves and restores through `Checkpointer`; `read_checkpoint` reads a finished one back as host arrays
(what `models.*.load()` use)."""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from synth_med.errors import SynthMedError
from synth_med.infra.artifacts import ensure_writable_dir


class Checkpointer:
  """Saves and restores a pytree (the train state) under `directory`.

  Orbax writes each step to a temporary folder and renames it when complete,
  so a run killed mid-save leaves the previous checkpoint intact.
  """

  def __init__(self, directory: str, keep: int = 2):
    self.directory = ensure_writable_dir(os.path.abspath(directory))
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state))

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
    step = self.latest_step() if step is None else step
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # noqa: BLE001 - shape/structure mismatch, corrupt files
      raise SynthMedError(f"cannot restore checkpoint step {step} from {self.directory!r}: {e}. If the "
                          "model config changed since that run, use a fresh --workdir.") from e

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def read_checkpoint(directory: str, step: int | None = None) -> tuple[Any, int]:
  """(tree, step): the latest (or `step`'s) checkpoint under `directory` as host arrays, with no template.

  `directory` is a run's `checkpoints/` folder or the run folder holding one.
  """
  path = directory
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if not os.path.isdir(path):
    raise SynthMedError(f"no checkpoint folder at {directory!r}; train the model first or point to its run folder.")
  manager = ocp.CheckpointManager(os.path.abspath(path))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise SynthMedError(f"{path!r} holds no finished checkpoint; train the model first.")
    try:
      return manager.restore(step, args=ocp.args.StandardRestore()), int(step)
    except Exception as e:  # noqa: BLE001 - missing step, corrupt files
      raise SynthMedError(f"cannot read checkpoint step {step} in {path!r}: {e}") from e
  finally:
    manager.close()
