"""Paper 001's benchmark axes on any data: keep the m most frequent label combinations and at most n
training images per combination (DuMont Schütte et al., Table S1).

`CombinationWorld(world, combinations, per_combination)` wraps a world (procedural or a real table):
its training split keeps the first `per_combination` images of each of the `combinations` most
frequent label combinations of the underlying training split (a combination is the whole label vector,
"no finding" included, unknown findings counted as absent); every other labelled split (validation,
ID and OOD test) keeps its images with one of those combinations. 0 keeps everything on that axis.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from synth_med.errors import SynthMedError
from synth_med.data.worlds.base import Split


def combination_keys(label: np.ndarray, label_mask: np.ndarray) -> np.ndarray:
  """One hashable row key per example: its label vector with unknown entries as 0."""
  known = (np.asarray(label) * np.asarray(label_mask) > 0.5).astype(np.uint8)
  return np.array([row.tobytes() for row in known], dtype=object)


class CombinationWorld:
  """A world restricted to its most frequent label combinations (see the module docstring)."""

  def __init__(self, world: Any, combinations: int, per_combination: int):
    if combinations < 0 or per_combination < 0:
      raise SynthMedError(f"data.label_combinations={combinations} and data.per_combination={per_combination} "
                          "must be >= 0 (0 keeps every combination / image).")
    self._world, self._splits = world, {}
    train = np.asarray(world.split("train").ids, np.int64)
    meta = world.metadata(train)
    keys = combination_keys(meta["label"], meta["label_mask"])
    values, counts = np.unique(keys, return_counts=True)
    order = np.lexsort((values.astype(str), -counts))  # most frequent first, ties by key
    if combinations and combinations > len(values):
      raise SynthMedError(f"data.label_combinations={combinations}, but the training split has only "
                          f"{len(values)} label combinations; lower it (or raise data.train_size).")
    self.combinations = [values[i] for i in order[:combinations or len(values)]]
    wanted = set(self.combinations)
    rows, taken = [], {k: 0 for k in wanted}
    for i, k in enumerate(keys):
      if k in wanted and (not per_combination or taken[k] < per_combination):
        taken[k] += 1
        rows.append(i)
    short = {k: n for k, n in taken.items() if per_combination and n < per_combination}
    if short:
      raise SynthMedError(f"data.per_combination={per_combination}, but {len(short)} of the {len(wanted)} label "
                          f"combinations have fewer training images (as few as {min(short.values())}); lower it, "
                          "lower data.label_combinations, or raise data.train_size.")
    self._splits["train"] = train[np.asarray(rows, np.int64)]
    self.per_combination = dict(taken)
    self._wanted = wanted

  def __getattr__(self, name: str) -> Any:  # everything else is the underlying world's
    return getattr(self._world, name)

  def split(self, name: str) -> Split:
    base = self._world.split(name)
    if name == "unlabelled" or not base.labelled:
      return base
    if name not in self._splits:
      ids = np.asarray(base.ids, np.int64)
      meta = self._world.metadata(ids)
      keep = np.array([k in self._wanted for k in combination_keys(meta["label"], meta["label_mask"])], bool)
      self._splits[name] = ids[keep] if len(ids) else ids
    return Split(base.name, self._splits[name], base.labelled)


def restrict(world: Any, data_config: Any) -> Any:
  """`world`, wrapped in a CombinationWorld when data.label_combinations or data.per_combination is set."""
  m, n = int(data_config.get("label_combinations", 0) or 0), int(data_config.get("per_combination", 0) or 0)
  return CombinationWorld(world, m, n) if (m or n) else world
