"""The input pipeline on grain: seeded shuffling, per-host shards, exact resume.

A source is anything with `__len__` and `fetch(rows) -> batch dict` (the schema
in `schema.py`); worlds, cached arrays and (later) real-data shards all fit.
The training stream is a grain `MapDataset` of row indices:

  range(len) -> seed/shuffle (a new order each epoch) -> repeat -> this host's
  rows [process_index::process_count] -> batch(local) -> fetch

so the batch of step s is a pure function of (seed, s): resuming at a step needs
no iterator state, and the hosts' shards together form the global batch.
"""
from __future__ import annotations

from typing import Iterator, Mapping, Protocol

import grain
import jax
import numpy as np

from synth_med.data.schema import concat_batches, take
from synth_med.data.worlds.base import Split, World
from synth_med.infra.progress import Progress


class Source(Protocol):
  def __len__(self) -> int: ...

  def fetch(self, rows: np.ndarray) -> dict[str, np.ndarray]: ...


class WorldSource:
  """The examples of one split of a procedural world, rendered on demand."""

  def __init__(self, world: World, split: Split):
    self.world, self.split = world, split

  def __len__(self) -> int:
    return len(self.split)

  def fetch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    return self.world.examples(self.split.ids[np.asarray(rows)], self.split.labelled)


class ArraySource:
  """Examples held in memory (a cached split)."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    self.arrays = dict(arrays)
    lens = {len(v) for v in self.arrays.values()}
    if len(lens) != 1:
      raise ValueError(f"arrays of unequal length: { {k: len(v) for k, v in arrays.items()} }")
    self._n = lens.pop()

  def __len__(self) -> int:
    return self._n

  def fetch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    return take(self.arrays, np.asarray(rows))


class RowSubset:
  """Rows of another source, in the given order (repeats allowed: oversampling)."""

  def __init__(self, source: Source, rows: np.ndarray):
    self.source, self.rows = source, np.asarray(rows)

  def __len__(self) -> int:
    return len(self.rows)

  def fetch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    return self.source.fetch(self.rows[np.asarray(rows)])


def materialise(source: Source, name: str = "data", chunk: int = 512) -> ArraySource:
  """Renders/decodes a whole source once into memory, with progress."""
  n = len(source)
  prog = Progress(f"caching {name}", n, unit="image", every_s=15.0)
  parts = []
  for start in range(0, n, chunk):
    parts.append(source.fetch(np.arange(start, min(start + chunk, n))))
    prog.update(min(start + chunk, n))
  return ArraySource(concat_batches(parts))


class TrainStream:
  """Infinite, seeded, host-sharded batches that restart exactly at any step."""

  def __init__(self, source: Source, global_batch: int, seed: int, num_threads: int = 2,
               prefetch: int = 4, process_index: int | None = None, process_count: int | None = None):
    if len(source) == 0:
      raise ValueError("the training source is empty")
    self.source = source
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    self.local_batch = global_batch // self.process_count
    self.seed = seed
    self.num_threads, self.prefetch = num_threads, prefetch
    rows = (grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat()
            [self.process_index::self.process_count])
    self._rows = rows.batch(self.local_batch)

  def rows(self, step: int) -> np.ndarray:
    """This host's row indices for `step` (pure function of seed and step)."""
    return np.asarray(self._rows[step])

  def batch(self, step: int) -> dict[str, np.ndarray]:
    return self.source.fetch(self.rows(step))

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    ds = self._rows[start_step:].map(self.source.fetch)
    if self.num_threads > 0:
      it = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.num_threads,
                                                prefetch_buffer_size=self.prefetch))
      return iter(it)
    return (ds[i] for i in range(len(ds)))


def eval_batches(source: Source, global_batch: int, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
  """Every example once, in order: (this host's padded batch, valid mask)."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  n, local = len(source), global_batch // pc
  for start in range(0, n, global_batch):
    rows = np.arange(start + pi * local, start + (pi + 1) * local)
    valid = rows < n
    batch = source.fetch(np.where(valid, rows, n - 1))
    yield batch, valid
