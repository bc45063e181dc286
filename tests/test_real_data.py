"""Real-data loaders on tiny fake copies in each data set's published layout (tests/fake_datasets.py)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from synth_med.data.tables import load_table
from synth_med.data.tables.images import load_image, prepare_images
from synth_med.data.tables.table_world import TableWorld
from synth_med.errors import SynthMedError
from tests import fake_datasets as fake
from tests.conftest import load_config


def data_cfg(source: str, manual_dir: str, tmp_path, modality: str = "chest", **kw) -> ConfigDict:
  from configs import common
  c = common.data_config(modality, 16)
  c.unlock()
  cfg = ConfigDict({"data": c})
  common.use_real_data(cfg, source)
  c.manual_dir = str(manual_dir)
  c.preprocessed_dir = str(tmp_path / "cache")
  c.val_fraction = c.id_test_fraction = 0.25  # tiny fake sets: every split gets rows
  for k, v in kw.items():
    c[k] = v
  return c


def _no_patient_crosses(table, world=None):
  seen = {}
  for p, s in zip(table.patient, table.split):
    seen.setdefault(p, set()).add(s)
  assert all(len(v) == 1 for v in seen.values())


# --- preprocessing -----------------------------------------------------------------------------

def test_load_image_keeps_aspect_and_pads_with_zeros(tmp_path):
  path = str(tmp_path / "wide.png")
  Image.fromarray(np.full((10, 20), 200, np.uint8), "L").save(path)  # 20 wide, 10 high
  img = load_image(path, 16, 1)
  assert img.shape == (16, 16, 1)
  assert (img[:4] == 0).all() and (img[12:] == 0).all()  # 8 rows of image, centred
  assert (img[4:12] == 200).all()
  rgb = load_image(path, 8, 3)
  assert rgb.shape == (8, 8, 3) and (rgb[2:6] == 200).all()
  eq = load_image(str(tmp_path / "wide.png"), 16, 1, equalize=True)
  assert eq.shape == (16, 16, 1)


def test_preprocessing_is_resumable_and_prints_throughput(tmp_path, capsys):
  root = fake.write_chexpert(str(tmp_path / "cx"), patients=8)
  table = load_table(data_cfg("chexpert", root, tmp_path))
  images, ok = prepare_images(table, 16, str(tmp_path / "cache"))
  out = capsys.readouterr().out
  assert "images/s" in out and ok.all() and images[np.arange(len(table))].shape == (len(table), 16, 16, 1)
  assert len(images) == len(table)  # ArrayRecord shards, one record per image
  folder = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cache") for f in fs if f.startswith("images-")]
  mtimes = {f: os.stat(f).st_mtime_ns for f in folder}
  images2, _ = prepare_images(table, 16, str(tmp_path / "cache"))
  assert "preprocessing" not in capsys.readouterr().out  # nothing redone
  assert {f: os.stat(f).st_mtime_ns for f in folder} == mtimes
  np.testing.assert_array_equal(images[np.arange(len(table))], images2[np.arange(len(table))])
  # the decoded pixels are the file's, resized
  i = 3
  np.testing.assert_array_equal(images[np.array([i])][0], load_image(table.full_path(i), 16, 1))


# --- CheXpert ---------------------------------------------------------------------------------

def test_chexpert_schema_policies_and_patient_split(tmp_path):
  root = fake.write_chexpert(str(tmp_path / "cx"), patients=24)
  cfg = data_cfg("chexpert", root, tmp_path)
  table = load_table(cfg)
  assert table.class_names == ("Atelectasis", "Consolidation", "Cardiomegaly", "Effusion", "Edema")
  assert all("frontal" in p for p in table.paths)  # frontal_only
  assert set(table.split) == {"train", "val", "test"} and (table.split[table.patient >= "patient60000"] == "val").all()
  _no_patient_crosses(table)
  eff = table.raw_label[:, 3]
  assert set(eff.tolist()) == {1, 0, -1}  # 1 / 0 / -1 / blank (-> 0)
  world = TableWorld(cfg, table)
  train = world.split("train").ids
  assert not (table.raw_label[train] == -1).any()  # 002: uncertain images do not train the classifier
  unl = world.split("unlabelled").ids
  assert len(unl) and (table.raw_label[unl] == -1).any(axis=1).all()  # ... but do train the generator
  ex = world.examples(unl[:2], labelled=False)
  assert ex["image"].shape == (2, 16, 16, 1) and not ex["labelled"].any() and ex["label"].sum() == 0
  with cfg.unlocked():
    cfg.label_policy = "mask_uncertain"
  w0 = TableWorld(cfg, table)
  m = w0.metadata(np.nonzero(eff == -1)[0])
  assert (m["label_mask"][:, 3] == 0).all() and (m["label_mask"][:, [0, 1, 2, 4]] == 1).all()
  assert len(w0.split("train")) > len(train)
  with cfg.unlocked():
    cfg.label_policy = "ones"
  assert (TableWorld(cfg, table).metadata(np.nonzero(eff == -1)[0])["label"][:, 3] == 1).all()
  sex = table.attrs["sex"]
  assert set(sex.tolist()) == {0, 1}
  # paper 000's attributes: age decades from the age, race from a demographics CSV the user names
  assert [a.name for a in table.attributes] == ["sex", "age_bucket", "age_decade", "race"]
  assert (table.attrs["race"] == -1).all()  # none named
  with cfg.unlocked():
    cfg.chexpert_demographics_csv = os.path.join(str(tmp_path / "cx"), "chexpert_demo.csv")
  raced = load_table(cfg)
  # White, Black or African American, Asian (non-Hispanic), Other, Unknown, White (Hispanic),
  # Native Hawaiian or Other Pacific Islander, American Indian or Alaska Native
  groups = [0, 1, 2, -1, -1, 0, 4, 3]
  number = np.array([int(p[7:]) for p in raced.patient])
  expected = np.array([groups[k % 8] for k in number])
  np.testing.assert_array_equal(raced.attrs["race"][number < 24], expected[number < 24])
  ages = np.array([20 + 3 * (k % 60000) for k in number])  # the fake's ages
  np.testing.assert_array_equal(raced.attrs["age_decade"], ages // 10 - 1)


def test_chestxray14_label_mapping_and_official_test_list(tmp_path):
  root = fake.write_chestxray14(str(tmp_path / "nih"))
  table = load_table(data_cfg("chestxray14", root, tmp_path))
  row = {p.split("/")[-1]: i for i, p in enumerate(table.paths)}
  i = row["00000000_001.png"]  # 'Cardiomegaly|Effusion'
  assert table.raw_label[i].tolist() == [0, 0, 1, 1, 0]
  assert table.raw_label[row["00000001_001.png"]].tolist() == [0, 0, 0, 0, 1]  # 'Edema|Pneumonia'
  assert table.raw_label[row["00000002_001.png"]].tolist() == [0, 0, 0, 0, 0]  # 'No Finding'
  assert table.raw_label[row["00000002_000.png"]].tolist() == [0, 1, 0, 0, 0]  # 'Consolidation|Mass'
  with open(os.path.join(root, "test_list.txt")) as f:
    test = set(f.read().split())
  assert {os.path.basename(p) for p, s in zip(table.paths, table.split) if s == "test"} == test
  assert table.paths[0].startswith("images_001/images/")
  _no_patient_crosses(table)
  assert table.attrs["age_bucket"][row["00000000_000.png"]] >= 0  # '030Y' parsed


def test_mimic_cxr_joins_the_three_csvs_and_patients(tmp_path):
  root, patients = fake.write_mimic(str(tmp_path / "mimic"))
  cfg = data_cfg("mimic_cxr", root, tmp_path, mimic_patients_csv=patients)
  table = load_table(cfg)
  assert len(table) == 9  # lateral views dropped
  assert set(table.split) == {"train", "val", "test"}
  assert table.paths[0] == "files/p10/p10000001/s50000001/d0001.jpg"
  assert (table.attrs["sex"] >= 0).all()
  TableWorld(cfg, table)  # every listed file exists and decodes
  assert (table.attrs["race"] == -1).all()
  with cfg.unlocked():
    cfg.mimic_admissions_csv = os.path.join(root, "mimic-iv", "admissions.csv")
  subject = np.array([int(p.split("/")[2][1:]) for p in load_table(cfg).paths]) - 10000000
  race = load_table(cfg).attrs["race"]
  # WHITE, BLACK/..., ASIAN - ..., HISPANIC/LATINO - ... (no race stated), AMERICAN INDIAN, DECLINED
  np.testing.assert_array_equal(race, np.array([0, 1, 2, -1, 3, -1])[subject % 6])


# --- CAMELYON17-WILDS -------------------------------------------------------------------------

def test_camelyon17_wilds_centre_split_and_unlabelled_set(tmp_path):
  root = fake.write_camelyon(str(tmp_path / "wilds"))
  cfg = data_cfg("camelyon17", root, tmp_path, modality="tissue")
  table = load_table(cfg)
  world = TableWorld(cfg, table)
  dom = np.asarray(table.domains)[table.domain]
  assert set(dom[world.split("h1").ids]) == {"h1"} and set(dom[world.split("h2").ids]) == {"h2"}
  for s in ("train", "val", "id"):
    assert set(dom[world.split(s).ids]) <= {"h0", "h3", "h4"}
  assert world.eval_split_names() == ("id", "h1", "h2")
  unl = world.split("unlabelled").ids
  assert len(unl) and not table.labelled[unl].all()
  assert table.paths[0].startswith("camelyon17_v1.0/patches/patient_000_node_0/patch_patient_000_node_0_x_100")
  ex = world.examples(world.split("h1").ids[:3])
  assert ex["image"].shape == (3, 16, 16, 3) and ex["label"].shape == (3, 1)
  assert (ex["attrs/hospital"] == -1).all()  # the OOD hospitals are no fairness group


# --- dermatology ------------------------------------------------------------------------------

def test_scin_soft_labels_images_per_case_and_tones(tmp_path):
  root = fake.write_scin(str(tmp_path / "scin"))
  cfg = data_cfg("scin", root, tmp_path, modality="skin")
  table = load_table(cfg)
  assert len(table) == 16 + 8  # image_1 for every case, image_2 for half
  assert table.class_names[-1] == "Other" and set(table.class_names[:-1]) == {"Eczema", "Psoriasis", "Acne"}
  i = int(np.nonzero(table.patient == "1000")[0][0])  # {'Eczema': 0.75, 'Psoriasis': 0.25}
  lab = dict(zip(table.class_names, table.label[i]))
  assert lab["Eczema"] == pytest.approx(0.75) and lab["Psoriasis"] == pytest.approx(0.25)
  assert not table.labelled[table.patient == "1015"].any()  # no dermatologist label: generator only
  tones = table.attrs["skin_tone"][table.patient == "1001"]
  assert (tones == 2).all()  # dermatologist FST3 over the self-reported FST2
  assert (table.attrs["skin_tone"][table.patient == "1000"] == 0).all()  # no derm label -> self-reported FST1
  _no_patient_crosses(table)
  TableWorld(cfg, table)


@pytest.mark.parametrize("source,writer,classes", [
    ("fitzpatrick17k", fake.write_fitzpatrick17k, ("benign", "malignant", "non-neoplastic")),
    ("ddi", fake.write_ddi, ("malignant",)),
    ("ham10000", fake.write_ham10000, ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"))])
def test_other_dermatology_sets(source, writer, classes, tmp_path):
  root = writer(str(tmp_path / source))
  cfg = data_cfg(source, root, tmp_path, modality="skin")
  table = load_table(cfg)
  assert table.class_names == classes
  world = TableWorld(cfg, table)
  assert len(world.split("train")) > 0
  if source == "ddi":
    assert table.attributes[0].values == ("FST I-II", "FST III-IV", "FST V-VI")
    assert table.attrs["skin_tone"].tolist()[:3] == [0, 1, 2] and table.label[:2, 0].tolist() == [1.0, 0.0]
  if source == "fitzpatrick17k":
    assert table.attrs["skin_tone"].tolist()[:4] == [0, 2, 5, -1]
  if source == "ham10000":
    assert table.attrs["sex"].tolist()[:3] == [1, 0, -1]
    _no_patient_crosses(table)  # by lesion


# --- errors -----------------------------------------------------------------------------------

def test_clear_errors_for_bad_real_data(tmp_path):
  with pytest.raises(SynthMedError, match=r"folder '.*nowhere' does not exist; set --config.data.manual_dir"):
    load_table(data_cfg("chexpert", tmp_path / "nowhere", tmp_path))
  with pytest.raises(SynthMedError, match=r"data.manual_dir is not set"):
    load_table(data_cfg("chexpert", "", tmp_path))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(SynthMedError, match=r"none of \['train.csv'"):
    load_table(data_cfg("chexpert", empty, tmp_path))
  root = fake.write_chexpert(str(tmp_path / "cx"), patients=8)
  csv = os.path.join(root, "train.csv")
  text = open(csv).read().replace("Frontal/Lateral", "View")
  open(csv, "w").write(text)
  with pytest.raises(SynthMedError, match=r"has no column\(s\) \['Frontal/Lateral'\]; its columns are \['Path'"):
    load_table(data_cfg("chexpert", root, tmp_path))


def test_missing_and_corrupt_images(tmp_path):
  root = fake.write_ddi(str(tmp_path / "ddi"))
  os.remove(os.path.join(root, "000003.png"))
  os.remove(os.path.join(root, "000005.png"))
  cfg = data_cfg("ddi", root, tmp_path, modality="skin")
  with pytest.raises(SynthMedError, match=r"2 of 12 listed image files are missing, e\.g\. '.*000003.png', '.*000005.png'"):
    TableWorld(cfg, load_table(cfg))
  root = fake.write_ddi(str(tmp_path / "ddi2"))
  with open(os.path.join(root, "000004.png"), "wb") as f:
    f.write(b"not a png")
  cfg = data_cfg("ddi", root, tmp_path, modality="skin", corrupt_images="fail")
  with pytest.raises(SynthMedError, match=r"cannot decode image '.*000004.png'.*corrupt_images=skip"):
    TableWorld(cfg, load_table(cfg))
  with cfg.unlocked():
    cfg.corrupt_images = "skip"
    cfg.preprocessed_dir = str(tmp_path / "cache2")
  world = TableWorld(cfg, load_table(cfg))
  used = np.concatenate([world.split(s).ids for s in ("train", "val", "id", "unlabelled")])
  assert 4 not in used and len(used) == 11  # the broken image is left out, the rest kept


def test_empty_split_after_filtering_is_a_clear_error(tmp_path):
  root = fake.write_chexpert(str(tmp_path / "cx"), patients=8)
  cfg = data_cfg("chexpert", root, tmp_path, id_test_fraction=0.0)
  with pytest.raises(SynthMedError, match=r"the 'id' split is empty after filtering"):
    TableWorld(cfg, load_table(cfg))
  cfg = data_cfg("camelyon17", fake.write_camelyon(str(tmp_path / "w")), tmp_path, modality="tissue")
  with cfg.unlocked():
    cfg.ood_domains = ("h7",)
  with pytest.raises(SynthMedError, match=r"data.ood_domains has \['h7'\], which never occur"):
    TableWorld(cfg, load_table(cfg))


def test_real_data_config_switches(tmp_path):
  c = load_config("cxr_cascade", "chexpert,smoke")
  assert c.data.source == "chexpert" and c.data.train_size == 0 and c.seeds == 2
  c = load_config("derm_cascade", "fitzpatrick17k")
  assert c.data.source == "fitzpatrick17k" and c.generate.attribute == "skin_tone"
  c = load_config("histo_camelyon", "wilds,smoke")
  assert c.data.source == "camelyon17" and c.data.ood_domains == ("h1", "h2")
  with pytest.raises(ValueError, match="is chest data"):
    load_config("derm_cascade", "chexpert")


@pytest.mark.slow
def test_chexpert_smoke_study_runs_end_to_end_on_a_fake_copy(tmp_path):
  """`cxr_cascade.py:chexpert,smoke` on a CheXpert-v1.0-small tree: every stage, unchanged, on real-format data."""
  import json

  from tests.test_cli import run_main
  root = fake.write_chexpert(str(tmp_path / "cx"), patients=40)
  workdir = tmp_path / "run"
  r = run_main("--config=configs/cxr_cascade.py:chexpert,smoke", f"--workdir={workdir}",
               f"--config.data.manual_dir={root}", f"--config.data.preprocessed_dir={tmp_path / 'cache'}",
               "--config.data.id_test_fraction=0.25", "--config.method_names=real,synth_label", "--config.seeds=1",
               "--config.tune.grid=", timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "decoded" in r.stdout and "images/s" in r.stdout  # the preprocessing job ran and reported throughput
  res = json.loads((workdir / "results.json").read_text())
  assert set(res["methods"]) == {"real", "synth_label"} and res["splits"] == ["id"]
  assert res["metrics"] == ["mean_auc"]
  m = json.loads((workdir / "classifiers" / "real" / "seed0" / "metrics.json").read_text())
  assert m["classes"] == ["Atelectasis", "Consolidation", "Cardiomegaly", "Effusion", "Edema"]
  assert set(m["splits"]["id"]["groups"]["sex"]) == {"female", "male"}
  vocab = json.loads((workdir / "base" / "vocabulary.json").read_text())
  assert vocab["source"] == "chexpert" and vocab["attributes"]["sex"] == ["female", "male"]
  assert (workdir / "report.html").stat().st_size > 10_000


def test_patient_split_is_per_patient_and_not_correlated_with_the_id_digits():
  from synth_med.data.tables.table import patient_split
  patients = np.asarray([f"patient{i:05d}" for i in range(400)])
  split = patient_split(np.repeat(patients, 2), {"train": 0.75, "test": 0.25}, seed=0)
  assert (split[::2] == split[1::2]).all()  # both images of a patient in one split
  test = np.nonzero(split[::2] == "test")[0]
  assert 0.18 < len(test) / 400 < 0.32
  for m in (2, 4):  # not all test ids share a residue (crc32 did that)
    assert len(set(test % m)) == m
  assert (patient_split(patients, {"train": 0.75, "test": 0.25}, seed=1) != split[::2]).any()
