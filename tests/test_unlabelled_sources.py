"""Unlabelled images reach the generator on every source kind, and a train/test-only CSV gets a val split.

For each source (procedural world, each real loader's fake tree, a user's CSV), the base stage's
generator data (`experiments.diffusion.training_source`) must count every unlabelled row the data have.
"""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from ml_collections import ConfigDict

from synth_med.data.tables import load_table
from synth_med.data.sources import make_world
from synth_med.experiments.diffusion import training_source
from tests import fake_datasets as fake
from tests.test_custom_data import csv_cfg
from tests.test_real_data import data_cfg


def _generator_counts(data: ConfigDict) -> tuple[dict[str, int], object]:
  world = make_world(data)
  _, counts = training_source(world, ConfigDict({"data": data}))
  return counts, world


@pytest.mark.parametrize("domains", [("id", "ood1"), ()])
def test_procedural_world_unlabelled_images_reach_the_generator(domains):
  from configs import common
  data = common.data_config("skin", 16)
  data.train_size, data.unlabelled_size = 200, 90
  data.unlabelled_domains = domains  # () = every domain of the world
  counts, world = _generator_counts(data)
  assert counts == {"labelled": len(world.split("train")), "unlabelled": 90}
  used = {world.spec.domains[d] for d in world.metadata(world.split("unlabelled").ids)["domain"]}
  assert used == set(domains or world.spec.domains)


REAL = {  # source: (writer, modality, extra data keys)
    "chexpert": (fake.write_chexpert, "chest"),
    "chestxray14": (fake.write_chestxray14, "chest"),
    "camelyon17": (fake.write_camelyon, "tissue"),
    "scin": (fake.write_scin, "skin"),
    "fitzpatrick17k": (fake.write_fitzpatrick17k, "skin"),
    "ddi": (fake.write_ddi, "skin"),
    "ham10000": (fake.write_ham10000, "skin"),
}


@pytest.mark.parametrize("source", sorted(REAL) + ["mimic_cxr"])
def test_real_loader_unlabelled_rows_reach_the_generator(source, tmp_path):
  if source == "mimic_cxr":
    root, patients = fake.write_mimic(str(tmp_path / source))
    data = data_cfg(source, root, tmp_path, "chest", mimic_patients_csv=patients)
  else:
    writer, modality = REAL[source]
    data = data_cfg(source, writer(str(tmp_path / source)), tmp_path, modality)
  counts, world = _generator_counts(data)
  t = world.table
  in_domains = np.isin(np.asarray(t.domains, dtype=object)[t.domain], world.unlabelled_domains)
  unlabelled_rows = int((~t.labelled & in_domains).sum())  # rows with no label: the generator's alone
  assert counts["unlabelled"] == len(world.split("unlabelled")) >= unlabelled_rows
  if source in ("chexpert", "camelyon17", "scin"):  # their fake trees hold unlabelled rows
    assert counts["unlabelled"] > 0


def test_csv_unlabelled_rows_reach_the_generator(tmp_path):
  csv_path = fake.write_custom_csv(str(tmp_path / "mine"))
  data = csv_cfg(csv_path, tmp_path)
  data.unlabelled_domains = ()  # the CSV source's "every domain"
  counts, world = _generator_counts(data)
  blank = int((~world.table.labelled).sum())
  assert blank == 4 and counts["unlabelled"] >= blank


def test_csv_with_train_and_test_only_gets_a_validation_split_by_patient(tmp_path):
  csv_path = fake.write_custom_csv(str(tmp_path / "mine"), n=120)
  with open(csv_path) as f:
    rows = list(csv.reader(f))
  rows[0].append("split")
  for i, r in enumerate(rows[1:]):
    r.append("test" if int(r[-1][2:]) % 4 == 0 else "train")  # by patient, as data sets ship it
  with open(csv_path, "w", newline="") as f:
    csv.writer(f).writerows(rows)
  data = csv_cfg(csv_path, tmp_path, split="split")
  data.val_fraction = 0.3
  table = load_table(data)
  assert set(table.split) == {"train", "val", "test"}
  given = np.array([r[-1] for r in rows[1:]])
  assert np.all(table.split[given == "test"] == "test")  # test rows stay test
  val_patients = set(table.patient[table.split == "val"])
  assert val_patients and not val_patients & set(table.patient[table.split == "train"])
  assert 0.1 < np.mean(table.split[given == "train"] == "val") < 0.55
  world = make_world(data)
  assert len(world.split("val")) > 0
  assert os.path.exists(csv_path)
