"""Procedural medical-like worlds: the embedded default data (no downloads)."""
from __future__ import annotations

from typing import Any

from synth_med.data.worlds.base import Split, World
from synth_med.errors import SynthMedError
from synth_med.data.tables import make_table_world
from synth_med.data.worlds.skin import SkinWorld
from synth_med.data.worlds.chest import ChestWorld
from synth_med.data.worlds.tissue import TissueWorld

WORLDS = ("skin", "chest", "tissue")


def make_world(data_config: Any) -> World:
  """Builds the world named by `data_config.world`, or the real data set of `data.source` (data/tables)."""
  if str(data_config.get("source", "world")) != "world":
    return make_table_world(data_config)
  name = data_config.world
  if name == "skin":
    return SkinWorld(data_config)
  if name == "chest":
    return ChestWorld(data_config)
  if name == "tissue":
    return TissueWorld(data_config)
  raise SynthMedError(f"data.world={name!r} is unknown; choose one of {list(WORLDS)}.")


__all__ = ["World", "Split", "make_world", "WORLDS"]
