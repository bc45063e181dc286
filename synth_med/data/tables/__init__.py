"""Real data sets from local folders, served like the procedural worlds (see table.py, table_world.py).

`data.source` picks the loader; `data.manual_dir` names the folder holding the
data set exactly as its owners distribute it (docs/data.md: "Real data sets").
"""
from __future__ import annotations

import os
from typing import Any, Callable

from synth_med.data.tables.table import ImageTable
from synth_med.errors import SynthMedError
from synth_med.data.tables import camelyon17, chest_xray, csv_table, dermatology
from synth_med.data.tables.table_world import TableWorld
from synth_med.infra.artifacts import write_json


def _loaders() -> dict[str, Callable[[Any], ImageTable]]:
  return {"chexpert": chest_xray.load_chexpert, "chestxray14": chest_xray.load_chestxray14,
          "mimic_cxr": chest_xray.load_mimic_cxr, "camelyon17": camelyon17.load_camelyon17,
          "scin": dermatology.load_scin, "fitzpatrick17k": dermatology.load_fitzpatrick17k,
          "ddi": dermatology.load_ddi, "ham10000": dermatology.load_ham10000, "csv": csv_table.load_csv}


SOURCES = ("chexpert", "chestxray14", "mimic_cxr", "camelyon17", "scin", "fitzpatrick17k", "ddi", "ham10000", "csv")


def load_table(data_config: Any) -> ImageTable:
  """The `ImageTable` of `data.source`."""
  source = str(data_config.source)
  loaders = _loaders()
  if source not in loaders:
    raise SynthMedError(f"data.source={source!r}; choose 'world' (procedural) or one of {list(loaders)}.")
  return loaders[source](data_config)


def make_table_world(data_config: Any):
  """A `TableWorld` over `data.source` at `data.image_size` (preprocessing the images on first use)."""
  return TableWorld(data_config, load_table(data_config))


def save_vocabulary(world: Any, workdir: str) -> None:
  """Writes `<workdir>/vocabulary.json` (classes, attribute values, domains) for a real data set; a
  procedural world's vocabulary is fixed in code, so nothing is written for it."""
  if isinstance(world, TableWorld):
    table = world.table


    write_json(os.path.join(workdir, "vocabulary.json"), table.vocabulary())


__all__ = ["ImageTable", "SOURCES", "load_table", "make_table_world", "save_vocabulary"]
