"""Real data sets from local folders, served like the procedural worlds (see table.py, table_world.py).

`data.source` picks the loader; `data.manual_dir` names the folder holding the
data set exactly as its owners distribute it (docs/data.md: "Real data sets").
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from synth_med.data.tables.table import ImageTable
from synth_med.errors import SynthMedError
from synth_med.data.tables import camelyon17, chest_xray, csv_table, dermatology
from synth_med.data.tables.table_world import TableWorld
from synth_med.infra.artifacts import write_json


@dataclasses.dataclass(frozen=True)
class DataSource:
  """A real data set: its modality (None: any, a CSV), its loader and the ID / OOD / unlabelled values of
  its domain column (empty: every domain, see csv_table.py)."""
  modality: str | None
  load: Callable[[Any], ImageTable]
  id_domains: tuple[str, ...] = ()
  ood_domains: tuple[str, ...] = ()
  unlabelled_domains: tuple[str, ...] = ()


def _single(name: str, modality: str, load: Callable[[Any], ImageTable]) -> DataSource:
  """A data set from one site: one ID domain, which also supplies the unlabelled images."""
  return DataSource(modality, load, (name,), (), (name,))


# The one registry of real data sets: `data.source` names one; configs take their arguments from it.
DATA_SOURCES: dict[str, DataSource] = {
    "chexpert": _single("chexpert", "chest", chest_xray.load_chexpert),
    "chestxray14": _single("chestxray14", "chest", chest_xray.load_chestxray14),
    "mimic_cxr": _single("mimic_cxr", "chest", chest_xray.load_mimic_cxr),
    "camelyon17": DataSource("tissue", camelyon17.load_camelyon17, ("h0", "h3", "h4"), ("h1", "h2"),
                             ("h0", "h3", "h4")),
    "scin": _single("scin", "skin", dermatology.load_scin),
    "fitzpatrick17k": _single("fitzpatrick17k", "skin", dermatology.load_fitzpatrick17k),
    "ddi": _single("ddi", "skin", dermatology.load_ddi),
    "ham10000": _single("ham10000", "skin", dermatology.load_ham10000),
    "csv": DataSource(None, csv_table.load_csv),
}
SOURCES = tuple(DATA_SOURCES)


def load_table(data_config: Any) -> ImageTable:
  """The `ImageTable` of `data.source`."""
  source = str(data_config.source)
  if source not in DATA_SOURCES:
    raise SynthMedError(f"data.source={source!r}; choose 'world' (procedural) or one of {list(SOURCES)}.")
  return DATA_SOURCES[source].load(data_config)


def make_table_world(data_config: Any):
  """A `TableWorld` over `data.source` at `data.image_size` (preprocessing the images on first use)."""
  return TableWorld(data_config, load_table(data_config))


REPORT_VOCABULARY_FILE = "report_vocabulary.json"


def save_vocabulary(world: Any, workdir: str) -> None:
  """Writes `<workdir>/vocabulary.json` (classes, attribute values, domains) for a real data set (a
  procedural world's is fixed in code), and `<workdir>/report_vocabulary.json` (the report tokens, paper 003)
  whenever the examples carry reports (`data.report_length` > 0), so their token ids can be read back."""
  if isinstance(world, TableWorld):
    write_json(os.path.join(workdir, "vocabulary.json"), world.table.vocabulary())
  if int(world.config.get("report_length", 0) or 0) > 0:
    world.report_vocabulary().save(os.path.join(workdir, REPORT_VOCABULARY_FILE))


__all__ = ["DataSource", "DATA_SOURCES", "ImageTable", "REPORT_VOCABULARY_FILE", "SOURCES", "load_table",
           "make_table_world", "save_vocabulary"]
