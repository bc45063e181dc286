"""Chest X-ray data sets as distributed by their owners: CheXpert, NIH ChestX-ray14, MIMIC-CXR-JPG.

All three give paper 002's five conditions (the chest world's classes) as a
multi-label target with 1 / 0 / -1 (uncertain) values; blank means "not
mentioned" and counts as 0. `data.label_policy` (label_policy.py) decides what
uncertain means. Attributes, as the chest world has them: sex, 002's age buckets, paper 000's
age decades and race (its five groups; from MIMIC-IV's admissions table, or a CheXpert
demographics CSV, when the user names one; unknown otherwise).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import numpy as np

from synth_med.data.tables.table import (ImageTable, age_attribute, age_decade_attribute, find_file, patient_split,
                                         race_attribute, read_csv, require_folder, sex_attribute)
from synth_med.data.worlds.chest import FINDINGS
from synth_med.errors import SynthMedError

# CheXpert / MIMIC-CXR (CheXpert labeller) column of each of 002's five conditions.
CHEXPERT_COLUMNS = {"Atelectasis": "Atelectasis", "Consolidation": "Consolidation", "Cardiomegaly": "Cardiomegaly",
                    "Effusion": "Pleural Effusion", "Edema": "Edema"}
# ChestX-ray14's finding names for them (pipe-separated in 'Finding Labels').
CXR14_NAMES = {"Atelectasis": "Atelectasis", "Consolidation": "Consolidation", "Cardiomegaly": "Cardiomegaly",
               "Effusion": "Effusion", "Edema": "Edema"}


def _raw_from_columns(df, columns: dict[str, str]) -> np.ndarray:
  """int8[N, 5]: 1 / 0 / -1 from CheXpert-style columns; blank (NaN) -> 0."""
  raw = np.zeros((len(df), len(FINDINGS)), np.int8)
  for k, name in enumerate(FINDINGS):
    v = df[columns[name]].to_numpy(np.float64)
    raw[:, k] = np.where(np.isnan(v), 0, v).astype(np.int8)
  bad = ~np.isin(raw, (-1, 0, 1))
  if bad.any():
    raise SynthMedError(f"finding values must be 1, 0, -1 or blank; found {sorted(set(raw[bad].tolist()))}.")
  return raw


def _table(name: str, root: str, df_paths, raw, sex, age, split, patient, race=None) -> ImageTable:
  n = len(df_paths)
  specs = [sex_attribute(sex), age_attribute(age), age_decade_attribute(age), race_attribute(race or [None] * n)]
  return ImageTable(
      name=name, root=root, paths=np.asarray(df_paths, dtype=object).astype(str), class_names=FINDINGS,
      label_kind="multilabel", label=(raw == 1).astype(np.float32), label_mask=np.ones(raw.shape, np.float32),
      labelled=np.ones(n, bool), attributes=tuple(s for s, _ in specs),
      attrs={s.name: c for s, c in specs}, domains=(name,), domain=np.zeros(n, np.int32),
      split=np.asarray(split).astype(str), patient=np.asarray(patient).astype(str), channels=1, raw_label=raw)


def load_chexpert(cfg: Any) -> ImageTable:
  """CheXpert v1.0 or v1.0-small: train.csv + valid.csv with 'Path', 'Sex', 'Age', 'Frontal/Lateral',
  'AP/PA' and the 14 findings. The official valid CSV is the validation split; the ID test split is a
  patient-level held-out slice (`data.id_test_fraction`) of train, as in 002."""
  import pandas as pd
  root = require_folder(cfg.manual_dir, "CheXpert")
  cols = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + list(CHEXPERT_COLUMNS.values())
  parts = []
  for csv_name, split in (("train.csv", "train"), ("valid.csv", "val")):
    path = find_file(root, [csv_name, f"CheXpert-v1.0-small/{csv_name}", f"CheXpert-v1.0/{csv_name}"], "CheXpert")
    df = read_csv(path, cols, "CheXpert")
    df["_split"] = split
    df["_csv_dir"] = os.path.dirname(path)
    parts.append(df)
  df = pd.concat(parts, ignore_index=True)
  if bool(cfg.get("frontal_only", True)):
    df = df[df["Frontal/Lateral"].astype(str) == "Frontal"].reset_index(drop=True)
  # Paths read 'CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg': relative to the folder
  # above the one holding the CSVs.
  csv_dir = str(df["_csv_dir"].iloc[0]) if len(df) else root
  first = str(df["Path"].iloc[0]).split("/")[0] if len(df) else ""
  image_root = os.path.dirname(csv_dir) if first == os.path.basename(csv_dir) else csv_dir
  patient = df["Path"].astype(str).str.extract(r"(patient\d+)", expand=False).fillna(df["Path"].astype(str))
  split = df["_split"].to_numpy(object)
  is_train = split == "train"
  split[is_train] = patient_split(patient.to_numpy()[is_train],
                                  {"train": 1.0 - float(cfg.id_test_fraction), "test": float(cfg.id_test_fraction)},
                                  int(cfg.seed))
  race = None
  if cfg.get("chexpert_demographics_csv", ""):  # Stanford's CHEXPERT DEMO table saved as CSV
    demo = read_csv(os.path.expanduser(str(cfg.chexpert_demographics_csv)), ["PATIENT", "PRIMARY_RACE"],
                    "CheXpert demographics")
    by_patient = dict(zip(demo["PATIENT"].astype(str), demo["PRIMARY_RACE"]))
    race = [by_patient.get(p) for p in patient.astype(str)]
  return _table("chexpert", image_root, df["Path"], _raw_from_columns(df, CHEXPERT_COLUMNS), df["Sex"], df["Age"],
                split, patient, race)


def _cxr14_age(values) -> np.ndarray:
  """'58', 58 or the older '058Y' form -> years (NaN if unparsable)."""
  out = np.full(len(values), np.nan)
  for i, v in enumerate(values):
    m = re.match(r"^\s*(\d+)", str(v))
    if m:
      out[i] = float(m.group(1))
  return out


def _image_index(root: str, names) -> list[str]:
  """Where each image file lies under root: images/, images_001/images/, ... (as the NIH archives unpack)."""
  where: dict[str, str] = {}
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d.startswith("images")]
    for f in filenames:
      where.setdefault(f, os.path.relpath(os.path.join(dirpath, f), root))
  return [where.get(str(n), os.path.join("images", str(n))) for n in names]


def load_chestxray14(cfg: Any) -> ImageTable:
  """NIH ChestX-ray14: Data_Entry_2017*.csv ('Image Index', pipe-separated 'Finding Labels', 'Patient ID',
  'Patient Age', 'Patient Gender', 'View Position') and the official train_val_list.txt / test_list.txt.
  The official test list is the ID test split; validation is a patient-level slice of train_val."""
  root = require_folder(cfg.manual_dir, "ChestX-ray14")
  entries = find_file(root, ["Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"], "ChestX-ray14")
  df = read_csv(entries, ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender",
                          "View Position"], "ChestX-ray14")
  lists = {}
  for name in ("train_val_list.txt", "test_list.txt"):
    with open(find_file(root, [name], "ChestX-ray14")) as f:
      lists[name] = {line.strip() for line in f if line.strip()}
  names = df["Image Index"].astype(str)
  in_test = names.isin(lists["test_list.txt"]).to_numpy()
  in_trval = names.isin(lists["train_val_list.txt"]).to_numpy()
  df, in_test, in_trval = df[in_test | in_trval].reset_index(drop=True), in_test[in_test | in_trval], \
      in_trval[in_test | in_trval]
  findings = df["Finding Labels"].astype(str).str.split("|")
  raw = np.zeros((len(df), len(FINDINGS)), np.int8)
  for k, name in enumerate(FINDINGS):
    raw[:, k] = findings.apply(lambda fs, n=CXR14_NAMES[name]: n in fs).to_numpy()
  patient = df["Patient ID"].astype(str).to_numpy()
  split = np.where(in_test, "test", "train").astype(object)
  v = float(cfg.val_fraction)
  split[~in_test] = patient_split(patient[~in_test], {"train": 1.0 - v, "val": v}, int(cfg.seed))
  return _table("chestxray14", root, _image_index(root, df["Image Index"]), raw, df["Patient Gender"],
                _cxr14_age(df["Patient Age"].to_numpy()), split, patient)


REPORT_SECTIONS = ("FINDINGS", "IMPRESSION")


def report_sections(text: str) -> str:
  """The FINDINGS and IMPRESSION sections of a MIMIC-CXR free-text report, as 'FINDINGS: ... IMPRESSION: ...'
  (whitespace collapsed); '' when it has neither. A section runs to the next upper-case 'HEADER:' line."""
  out = []
  for name in REPORT_SECTIONS:
    m = re.search(rf"(?:^|\n)\s*{name}\s*:(.*?)(?=\n\s*[A-Z][A-Z /&()-]+:|\Z)", text, flags=re.S)
    if m and m.group(1).strip():
      out.append(f"{name}: " + " ".join(m.group(1).split()))
  return " ".join(out)


def mimic_reports(root: str, subject: np.ndarray, study: np.ndarray) -> np.ndarray | None:
  """Each row's report sections from `<root>/mimic-cxr-reports/files/pXX/pSUBJECT/sSTUDY.txt` (PhysioNet's
  mimic-cxr-reports.zip unpacked beside the images); None when the folder is absent, '' for a missing file."""
  folder = os.path.join(root, "mimic-cxr-reports")
  if not os.path.isdir(folder):
    return None
  out, cache = [], {}
  for sub, stu in zip(subject.astype(str), study.astype(str)):
    key = (sub, stu)
    if key not in cache:
      path = os.path.join(folder, "files", f"p{sub[:2]}", f"p{sub}", f"s{stu}.txt")
      cache[key] = report_sections(open(path, encoding="utf-8", errors="replace").read()) if os.path.exists(path) else ""
    out.append(cache[key])
  return np.asarray(out, dtype=object)


def load_mimic_cxr(cfg: Any) -> ImageTable:
  """MIMIC-CXR-JPG 2.0: mimic-cxr-2.0.0-{chexpert,metadata,split}.csv(.gz) and files/pXX/pSUBJECT/sSTUDY/DICOM.jpg.
  Sex and age come from MIMIC-IV's patients.csv(.gz) ('subject_id', 'gender', 'anchor_age') when
  `data.mimic_patients_csv` names it, race from its admissions.csv(.gz) ('subject_id', 'race') when
  `data.mimic_admissions_csv` does; otherwise they are unknown. Split 'validate' -> val, 'test' -> test.
  With `mimic-cxr-reports/` in the folder (paper 003), each image carries its study's FINDINGS and IMPRESSION."""
  root = require_folder(cfg.manual_dir, "MIMIC-CXR-JPG")

  def csv(stem, cols):
    return read_csv(find_file(root, [f"{stem}.csv.gz", f"{stem}.csv"], "MIMIC-CXR-JPG"), cols, "MIMIC-CXR-JPG")

  labels = csv("mimic-cxr-2.0.0-chexpert", ["subject_id", "study_id"] + list(CHEXPERT_COLUMNS.values()))
  meta = csv("mimic-cxr-2.0.0-metadata", ["dicom_id", "subject_id", "study_id", "ViewPosition"])
  splits = csv("mimic-cxr-2.0.0-split", ["dicom_id", "split"])
  df = meta.merge(splits[["dicom_id", "split"]], on="dicom_id").merge(labels, on=["subject_id", "study_id"])
  if bool(cfg.get("frontal_only", True)):
    df = df[df["ViewPosition"].astype(str).isin(["PA", "AP"])].reset_index(drop=True)
  sex, age = [None] * len(df), [np.nan] * len(df)
  if cfg.get("mimic_patients_csv", ""):
    pts = read_csv(os.path.expanduser(str(cfg.mimic_patients_csv)), ["subject_id", "gender", "anchor_age"],
                   "MIMIC-IV patients")
    df = df.merge(pts[["subject_id", "gender", "anchor_age"]], on="subject_id", how="left")
    sex, age = df["gender"].tolist(), df["anchor_age"].tolist()
  race = None
  if cfg.get("mimic_admissions_csv", ""):  # MIMIC-IV admissions: a subject's first stated race
    adm = read_csv(os.path.expanduser(str(cfg.mimic_admissions_csv)), ["subject_id", "race"], "MIMIC-IV admissions")
    codes = race_attribute(adm["race"].tolist())[1]
    adm = adm.assign(_code=codes)[codes >= 0].drop_duplicates("subject_id")
    by_subject = dict(zip(adm["subject_id"].astype(int), adm["race"]))
    race = [by_subject.get(int(s)) for s in df["subject_id"]]
  sid = df["subject_id"].astype(int).astype(str)
  paths = ("files/p" + sid.str[:2] + "/p" + sid + "/s" + df["study_id"].astype(int).astype(str) + "/" +
           df["dicom_id"].astype(str) + ".jpg")
  split = df["split"].astype(str).map({"train": "train", "validate": "val", "test": "test"})
  if split.isna().any():
    raise SynthMedError(f"MIMIC-CXR-JPG: split values {sorted(set(df['split'][split.isna()]))} are not "
                        "train / validate / test.")
  table = _table("mimic_cxr", root, paths, _raw_from_columns(df, CHEXPERT_COLUMNS), sex, age, split.to_numpy(),
                 sid.to_numpy(), race)
  reports = mimic_reports(root, sid.to_numpy(), df["study_id"].astype(int).astype(str).to_numpy())
  return table if reports is None else dataclasses.replace(table, reports=reports)
