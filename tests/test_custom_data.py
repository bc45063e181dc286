"""Bring your own data (data.source='csv'): label forms, vocabularies, splits, errors, the full method."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from synth_med.data.tables import load_table
from synth_med.data.tables.table_world import TableWorld
from synth_med.errors import SynthMedError
from tests import fake_datasets as fake
from tests.conftest import load_config
from tests.test_cli import run_main


def csv_cfg(csv: str, tmp_path, **columns):
  c = load_config("custom_classifier", "smoke").data
  c.unlock()
  c.csv = csv
  c.preprocessed_dir = str(tmp_path / "cache")
  c.val_fraction = c.id_test_fraction = 0.25
  cols = dict(image="file", label="diagnosis", attributes="tone,sex", patient="patient_id")
  cols.update(columns)
  for k, v in cols.items():
    c.columns[k] = v
  return c


def test_class_column_vocabularies_buckets_and_patient_split(tmp_path):
  csv = fake.write_custom_csv(str(tmp_path / "mine"))
  cfg = csv_cfg(csv, tmp_path, buckets="age=0|40|65|120", domain="site")
  table = load_table(cfg)
  assert table.class_names == ("eczema", "melanoma", "naevus") and table.label_kind == "softmax"
  assert {a.name: a.values for a in table.attributes} == {
      "tone": ("dark", "light"), "sex": ("F", "M"), "age": ("(0,40]", "(40,65]", "(65,120]")}
  assert table.domains == ("site_a", "site_b", "site_c")
  assert not table.labelled[10] and table.labelled[0]  # blank label: generator only
  assert table.label[0].tolist() == [0.0, 1.0, 0.0]  # melanoma
  assert table.attrs["age"][0] == 0 and table.attrs["age"][2] == 0 and table.attrs["age"][3] == 1  # 20, 34, 41
  seen = {}
  for p, s in zip(table.patient, table.split):
    seen.setdefault(p, set()).add(s)
  assert all(len(v) == 1 for v in seen.values()) and set(table.split) == {"train", "val", "test"}
  world = TableWorld(cfg, table)
  ex = world.examples(world.split("train").ids[:4])
  assert ex["image"].shape == (4, 16, 16, 3) and ex["image"].dtype == np.uint8
  # the vocabulary round-trip: codes -> names as written in the CSV
  vocab = json.loads(json.dumps(table.vocabulary()))
  i = int(world.split("train").ids[0])
  assert vocab["attributes"]["tone"][table.attrs["tone"][i]] == ["light", "dark"][i % 2]
  assert vocab["classes"][int(np.argmax(table.label[i]))] == ["melanoma", "naevus", "eczema"][i % 3]


def test_site_column_names_ood_values(tmp_path):
  csv = fake.write_custom_csv(str(tmp_path / "mine"))
  cfg = csv_cfg(csv, tmp_path, domain="site")
  with cfg.unlocked():
    cfg.ood_domains = ("site_c",)
  world = TableWorld(cfg, load_table(cfg))
  assert world.id_domains == ("site_a", "site_b") and world.eval_split_names() == ("id", "site_c")
  dom = np.asarray(world.table.domains)[world.table.domain]
  assert set(dom[world.split("site_c").ids]) == {"site_c"} and "site_c" not in set(dom[world.split("train").ids])
  with cfg.unlocked():  # paper 000's two sites: train on site_c's training rows, test on the same splits
    cfg.train_domains = ("site_c",)
  two_site = TableWorld(cfg, load_table(cfg))
  assert set(dom[two_site.split("train").ids]) == {"site_c"} and set(dom[two_site.split("val").ids]) <= {"site_c"}
  assert not set(two_site.split("train").ids) & set(two_site.split("site_c").ids)
  for split in ("id", "site_c"):
    np.testing.assert_array_equal(two_site.split(split).ids, world.split(split).ids)
  with cfg.unlocked():
    cfg.train_domains = ()
    cfg.ood_domains = ("site_z",)
  with pytest.raises(SynthMedError, match=r"data.ood_domains has \['site_z'\], which never occur.*'site_a'"):
    TableWorld(cfg, load_table(cfg))


@pytest.mark.parametrize("fmt", ["pipe", "soft"])
def test_pipe_and_soft_label_forms(fmt, tmp_path):
  csv = fake.write_custom_csv(str(tmp_path / "mine"), label_format=fmt)
  table = load_table(csv_cfg(csv, tmp_path, label_format=fmt))
  assert table.class_names == ("eczema", "melanoma", "naevus")
  if fmt == "pipe":
    assert table.label_kind == "multilabel"
    assert table.label[0].tolist() == [1.0, 1.0, 0.0] and table.label[2].tolist() == [0.0, 0.0, 0.0]
    assert table.labelled[2] and not table.labelled[10]  # 'No Finding' is a label (all negative); blank is not
  else:
    assert table.label_kind == "softmax"
    np.testing.assert_allclose(table.label[0], [0.0, 0.8, 0.2])  # melanoma 0.8, naevus 0.2


def test_findings_columns_follow_the_label_policy_and_a_given_split(tmp_path):
  csv = fake.write_findings_csv(str(tmp_path / "xr"))
  cfg = csv_cfg(csv, tmp_path, image="path", label_format="findings", findings="effusion,edema", attributes="sex",
                split="split", patient="patient")
  with cfg.unlocked():
    cfg.channels = 1
  table = load_table(cfg)
  assert table.raw_label[:4, 0].tolist() == [1, 0, -1, 0] and table.label_kind == "multilabel"
  assert table.split[4] == "val" and table.split[6] == "test"
  with cfg.unlocked():
    cfg.label_policy = "mask_uncertain"
  world = TableWorld(cfg, table)
  assert world.metadata(np.array([2]))["label_mask"][0].tolist() == [0.0, 1.0]
  assert world.examples(np.array([0]))["image"].shape == (1, 16, 16, 1)


def test_custom_data_errors(tmp_path):
  csv = fake.write_custom_csv(str(tmp_path / "mine"))
  with pytest.raises(SynthMedError, match=r"CSV '.*nope.csv' does not exist"):
    load_table(csv_cfg(str(tmp_path / "nope.csv"), tmp_path))
  with pytest.raises(SynthMedError, match=r"has no column\(s\) \['dx'\]; its columns are \['file', 'diagnosis'"):
    load_table(csv_cfg(csv, tmp_path, label="dx"))
  with pytest.raises(SynthMedError, match=r"attribute column 'site' has 1 distinct value"):
    only_a = str(tmp_path / "one_site.csv")
    lines = open(csv).read().splitlines()
    open(only_a, "w").write("\n".join([lines[0]] + [ln for ln in lines[1:] if ",site_a," in ln]) + "\n")
    load_table(csv_cfg(only_a, tmp_path, attributes="site"))
  unlabelled = str(tmp_path / "mine" / "unlabelled.csv")
  lines = open(csv).read().splitlines()
  open(unlabelled, "w").write("\n".join([lines[0]] + [",".join(ln.split(",")[:1] + [""] + ln.split(",")[2:])
                                                      for ln in lines[1:]]) + "\n")
  with pytest.raises(SynthMedError, match=r"no row has a label in 'diagnosis'"):
    load_table(csv_cfg(unlabelled, tmp_path))
  crossing = str(tmp_path / "mine" / "crossing.csv")
  lines = open(csv).read().splitlines()
  open(crossing, "w").write("\n".join([lines[0] + ",split"] + [ln + ("," + ["train", "test"][k % 2])
                                                                 for k, ln in enumerate(lines[1:])]) + "\n")
  with pytest.raises(SynthMedError, match=r"patient\(s\) appear in more than one split, e\.g\. \['pt0'"):
    load_table(csv_cfg(crossing, tmp_path, split="split"))
  os.remove(os.path.join(tmp_path, "mine", "images", "005.png"))
  os.remove(os.path.join(tmp_path, "mine", "images", "007.png"))
  cfg = csv_cfg(csv, tmp_path)
  with pytest.raises(SynthMedError, match=r"2 of 48 listed image files are missing, e\.g\. '.*005.png', '.*007.png'"):
    TableWorld(cfg, load_table(cfg))
  with pytest.raises(ValueError, match="attribute=<column>"):
    load_config("custom_cascade", "smoke")


@pytest.mark.slow
def test_custom_cascade_smoke_runs_the_method_on_a_csv_and_names_groups_as_written(tmp_path):
  csv = fake.write_custom_csv(str(tmp_path / "mine"), n=60)
  workdir = tmp_path / "run"
  r = run_main("--config=configs/custom_cascade.py:attribute=tone,smoke", f"--workdir={workdir}",
               f"--config.data.csv={csv}", "--config.data.columns.image=file",
               "--config.data.columns.label=diagnosis", "--config.data.columns.attributes=tone,sex",
               "--config.data.columns.patient=patient_id", "--config.data.columns.domain=site",
               "--config.data.ood_domains=('site_c',)", "--config.data.val_fraction=0.25",
               "--config.data.id_test_fraction=0.25", f"--config.data.preprocessed_dir={tmp_path / 'cache'}",
               "--config.seeds=1", "--config.method_names=real,synth_label_property", "--config.tune.grid=",
               timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((workdir / "results.json").read_text())
  assert res["splits"] == ["id", "site_c"] and res["attribute"] == "tone"
  assert res["metrics"][0] == "top1"  # 3 classes: top-3 would always be right
  vocab = json.loads((workdir / "classifiers" / "real" / "seed0" / "vocabulary.json").read_text())
  assert vocab["attributes"]["tone"] == ["dark", "light"] and vocab["classes"] == ["eczema", "melanoma", "naevus"]
  m = json.loads((workdir / "classifiers" / "real" / "seed0" / "metrics.json").read_text())
  assert set(m["splits"]["id"]["groups"]["tone"]) == {"dark", "light"}
  store = np.load(sorted((workdir / "synthetic" / "label_property").glob("shard-*.npz"))[0])
  assert set(np.unique(store["attrs/tone"])) == {0, 1}  # fair over the CSV's tone values
  assert (workdir / "report.html").stat().st_size > 10_000
