"""`make_world(data_config)`: the data every stage reads, a procedural world (data/worlds) or a real data
set from a local folder (data/tables), behind the same `World` interface."""
from __future__ import annotations

from typing import Any

from synth_med.data.label_combinations import restrict
from synth_med.data.tables import make_table_world
from synth_med.data.worlds import World, make_procedural_world


def make_world(data_config: Any) -> World:
  """The world named by `data_config.world`, or the real data set of `data.source` when it is not 'world';
  restricted to its most frequent label combinations when data.label_combinations / data.per_combination
  are set (paper 001's benchmark axes, `data.label_combinations`)."""
  if str(data_config.get("source", "world")) != "world":
    return restrict(make_table_world(data_config), data_config)
  return restrict(make_procedural_world(data_config), data_config)
