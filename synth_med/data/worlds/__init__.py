"""Procedural medical-like worlds: the embedded default data (no downloads)."""
from __future__ import annotations

from typing import Any

from synth_med.data.worlds.base import Split, World
from synth_med.data.worlds.chest import ChestWorld
from synth_med.data.worlds.skin import SkinWorld
from synth_med.data.worlds.tissue import TissueWorld
from synth_med.errors import SynthMedError

WORLDS = ("skin", "chest", "tissue")


def make_procedural_world(data_config: Any) -> World:
  """The procedural world named by `data_config.world` (real data sets: `synth_med.data.sources`)."""
  name = data_config.world
  if name == "skin":
    return SkinWorld(data_config)
  if name == "chest":
    return ChestWorld(data_config)
  if name == "tissue":
    return TissueWorld(data_config)
  raise SynthMedError(f"data.world={name!r} is unknown; choose one of {list(WORLDS)}.")


__all__ = ["World", "Split", "make_procedural_world", "WORLDS"]
