"""On-disk shards of examples (synthetic images plus their conditions).

A shard is one `.npz` file of arrays in the example schema (plus `seed` and
`generator_step` for synthetic data), written to a temporary file and renamed
into place, so a shard file on disk is always complete. `ShardedSource` reads a
folder of shards as a pipeline source.
"""
from __future__ import annotations

import glob
import os
from typing import Mapping

import numpy as np

from synth_med.data.pipeline import ArraySource
from synth_med.data.schema import concat_batches
from synth_med.errors import SynthMedError
from synth_med.infra import artifacts

SHARD_PATTERN = "shard-{:05d}.npz"


def shard_path(folder: str, index: int) -> str:
  return os.path.join(folder, SHARD_PATTERN.format(index))


def write_shard(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes `arrays` atomically (temporary file in the same folder, then rename)."""
  artifacts.atomic_write(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}),
                         "wb", ".npz")


def read_shard(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  except Exception as e:  # noqa: BLE001 - truncated or foreign file
    raise SynthMedError(f"cannot read shard {path!r}: {e}. Delete it and rerun the generation job; "
                        "finished shards are kept and only missing ones are generated.") from e


def list_shards(folder: str) -> list[str]:
  return sorted(glob.glob(os.path.join(folder, "shard-*.npz")))


def read_shards(folder: str) -> ArraySource:
  """All shards of `folder` as one in-memory source."""
  paths = list_shards(folder)
  if not paths:
    raise SynthMedError(f"no shards (shard-*.npz) in {folder!r}; run the generation job first.")
  return ArraySource(concat_batches([read_shard(p) for p in paths]))
