"""Tiny fake copies of the real data sets, in their published layouts and CSV schemas, written by tests.

Images are small random PNG/JPEGs whose brightness follows the label, so a
classifier can learn something; none of the real data is needed.
"""
from __future__ import annotations

import gzip
import json
import os

import numpy as np
from PIL import Image


def write_image(path: str, rng: np.random.Generator, size=(20, 16), mode: str = "L", level: float = 0.5) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
  arr = np.clip(rng.normal(255 * level, 30, shape), 0, 255).astype(np.uint8)
  Image.fromarray(arr, mode).save(path)


def _csv(path: str, header: list[str], rows: list[list]) -> None:
  import csv
  import io
  os.makedirs(os.path.dirname(path), exist_ok=True)
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(header)
  w.writerows([["" if v is None else v for v in r] for r in rows])
  if path.endswith(".gz"):
    with gzip.open(path, "wt") as f:
      f.write(buf.getvalue())
  else:
    with open(path, "w") as f:
      f.write(buf.getvalue())


CHEXPERT_FINDINGS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                     "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                     "Pleural Other", "Fracture", "Support Devices"]


def write_chexpert(root: str, patients: int = 24, seed: int = 0) -> str:
  """<root>/CheXpert-v1.0-small/{train,valid}.csv + images; returns the folder to give as manual_dir."""
  rng = np.random.default_rng(seed)
  base = os.path.join(root, "CheXpert-v1.0-small")
  header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + CHEXPERT_FINDINGS
  for csv_name, folder, n in (("train.csv", "train", patients), ("valid.csv", "valid", max(4, patients // 4))):
    rows = []
    for p in range(n):
      pid = f"patient{(p + (0 if folder == 'train' else 60000)):05d}"
      for view, fl in (("view1_frontal", "Frontal"), ("view2_lateral", "Lateral")):
        rel = f"CheXpert-v1.0-small/{folder}/{pid}/study1/{view}.jpg"
        findings = [None] * len(CHEXPERT_FINDINGS)
        cardio = float(rng.integers(0, 2))
        findings[CHEXPERT_FINDINGS.index("Cardiomegaly")] = cardio
        findings[CHEXPERT_FINDINGS.index("Pleural Effusion")] = [1.0, 0.0, -1.0, None][p % 4]
        findings[CHEXPERT_FINDINGS.index("Edema")] = 0.0 if p % 3 else None
        write_image(os.path.join(root, rel), rng, level=0.3 + 0.4 * cardio)
        rows.append([rel, ["Male", "Female"][p % 2], 20 + 3 * p, fl, "AP" if fl == "Frontal" else None] + findings)
    _csv(os.path.join(base, csv_name), header, rows)
  races = ["White", "Black or African American", "Asian, non-Hispanic", "Other", "Unknown", "White, Hispanic",
           "Native Hawaiian or Other Pacific Islander", "American Indian or Alaska Native"]
  _csv(os.path.join(root, "chexpert_demo.csv"), ["PATIENT", "GENDER", "AGE_AT_CXR", "PRIMARY_RACE"],
       [[f"patient{p:05d}", "Male", 40, races[p % len(races)]] for p in range(patients)])
  return base


def write_chestxray14(root: str, n: int = 30, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  header = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
            "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
  labels = ["No Finding", "Cardiomegaly|Effusion", "Atelectasis", "Edema|Pneumonia", "Consolidation|Mass"]
  rows, train, test = [], [], []
  for i in range(n):
    name = f"{i // 2:08d}_{i % 2:03d}.png"
    write_image(os.path.join(root, "images_001", "images", name), rng)
    rows.append([name, labels[i % 5], i % 2, i // 2, f"{30 + i:03d}Y" if i % 7 == 0 else 30 + i, "MF"[i % 2],
                 "PA", 20, 16, 0.1, 0.1])
    (test if (i // 2) % 4 == 0 else train).append(name)
  _csv(os.path.join(root, "Data_Entry_2017_v2020.csv"), header, rows)
  for fname, names in (("train_val_list.txt", train), ("test_list.txt", test)):
    with open(os.path.join(root, fname), "w") as f:
      f.write("\n".join(names) + "\n")
  return root


def write_mimic(root: str, n: int = 12, seed: int = 0, reports: bool = False) -> tuple[str, str]:
  """MIMIC-CXR-JPG's three CSVs, images and MIMIC-IV patients / admissions; with `reports`, PhysioNet's
  mimic-cxr-reports/ for every study but the last (a missing report file)."""
  rng = np.random.default_rng(seed)
  lab_header = ["subject_id", "study_id"] + CHEXPERT_FINDINGS
  labs, meta, split, pts = [], [], [], []
  for i in range(n):
    subj, study, dicom = 10000000 + i, 50000000 + i, f"d{i:04d}"
    f = [None] * len(CHEXPERT_FINDINGS)
    f[CHEXPERT_FINDINGS.index("Edema")] = [1.0, -1.0, 0.0][i % 3]
    labs.append([subj, study] + f)
    meta.append([dicom, subj, study, "PA" if i % 4 else "LATERAL"])
    split.append([dicom, study, subj, ["train", "train", "validate", "test"][i % 4]])
    pts.append([subj, "FM"[i % 2], 40 + i])
    write_image(os.path.join(root, "files", f"p{str(subj)[:2]}", f"p{subj}", f"s{study}", f"{dicom}.jpg"), rng)
    if reports and i < n - 1:
      path = os.path.join(root, "mimic-cxr-reports", "files", f"p{str(subj)[:2]}", f"p{subj}", f"s{study}.txt")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w") as f:
        f.write(f"                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n"
                f" INDICATION:  cough.\n\n FINDINGS:  \n \n Study {i}: mild pulmonary\n edema.  No effusion.\n"
                f" \n IMPRESSION:  \n \n Edema, case {i}.\n")
  _csv(os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv.gz"), lab_header, labs)
  _csv(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv.gz"), ["dicom_id", "subject_id", "study_id", "ViewPosition"], meta)
  _csv(os.path.join(root, "mimic-cxr-2.0.0-split.csv.gz"), ["dicom_id", "study_id", "subject_id", "split"], split)
  patients = os.path.join(root, "mimic-iv", "patients.csv")
  _csv(patients, ["subject_id", "gender", "anchor_age"], pts)
  # two admissions per subject: the first says UNKNOWN, the second the race (the loader takes the first stated)
  stated = ["WHITE", "BLACK/AFRICAN AMERICAN", "ASIAN - CHINESE", "HISPANIC/LATINO - PUERTO RICAN",
            "AMERICAN INDIAN/ALASKA NATIVE", "PATIENT DECLINED TO ANSWER"]
  _csv(os.path.join(root, "mimic-iv", "admissions.csv"), ["subject_id", "hadm_id", "race"],
       [[10000000 + i, 20000000 + 2 * i + k, "UNKNOWN" if k == 0 else stated[i % len(stated)]]
        for i in range(n) for k in range(2)])
  return root, patients


def write_camelyon(root: str, per_centre: int = 12, seed: int = 0, unlabelled: int = 6) -> str:
  rng = np.random.default_rng(seed)
  header = ["", "patient", "node", "x_coord", "y_coord", "tumor", "slide", "center", "split"]
  rows, k = [], 0
  for centre in range(5):
    for j in range(per_centre):
      patient, node = f"{centre * 10 + j % 3:03d}", j % 2
      x, y = 100 + j, 200 + j
      tumor = j % 2
      rel = f"patches/patient_{patient}_node_{node}/patch_patient_{patient}_node_{node}_x_{x}_y_{y}.png"
      write_image(os.path.join(root, "camelyon17_v1.0", rel), rng, (12, 12), "RGB", 0.3 + 0.4 * tumor)
      rows.append([k, patient, node, x, y, tumor, centre * 10 + j % 3, centre, 1 if j % 6 == 5 else 0])
      k += 1
  _csv(os.path.join(root, "camelyon17_v1.0", "metadata.csv"), header, rows)
  if unlabelled:
    urows = []
    for j in range(unlabelled):
      centre, patient, node, x, y = j % 5, f"{90 + j:03d}", 0, 5, 6
      rel = f"patches/patient_{patient}_node_{node}/patch_patient_{patient}_node_{node}_x_{x}_y_{y}.png"
      write_image(os.path.join(root, "camelyon17_unlabeled_v1.0", rel), rng, (12, 12), "RGB")
      urows.append([j, patient, node, x, y, 90 + j, centre, 0])
    _csv(os.path.join(root, "camelyon17_unlabeled_v1.0", "metadata.csv"),
         ["", "patient", "node", "x_coord", "y_coord", "slide", "center", "split"], urows)
  return root


def write_scin(root: str, n: int = 16, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  cases, labels = [], []
  conds = ["Eczema", "Psoriasis", "Acne"]
  for i in range(n):
    cid = f"{1000 + i}"
    p1 = f"dataset/images/{cid}_1.png"
    write_image(os.path.join(root, p1), rng, mode="RGB")
    p2 = ""
    if i % 2 == 0:
      p2 = f"dataset/images/{cid}_2.png"
      write_image(os.path.join(root, p2), rng, mode="RGB")
    cases.append([cid, p1, p2, "", ["MALE", "FEMALE"][i % 2], ["AGE_18_TO_29", "AGE_40_TO_49", "AGE_UNKNOWN"][i % 3],
                  f"FST{1 + i % 6}"])
    a, b = conds[i % 3], conds[(i + 1) % 3]
    weighted = "" if i == n - 1 else json.dumps({a: 0.75, b: 0.25}).replace('"', "'")
    labels.append([cid, str([a, b]), str([4, 2]), weighted, f"FST{1 + (i + 1) % 6}" if i % 4 else ""])
  _csv(os.path.join(root, "dataset", "scin_cases.csv"),
       ["case_id", "image_1_path", "image_2_path", "image_3_path", "sex_at_birth", "age_group",
        "fitzpatrick_skin_type"], cases)
  _csv(os.path.join(root, "dataset", "scin_labels.csv"),
       ["case_id", "dermatologist_skin_condition_on_label_name", "dermatologist_skin_condition_confidence",
        "weighted_skin_condition_label", "dermatologist_fitzpatrick_skin_type_label_1"], labels)
  return root


def write_fitzpatrick17k(root: str, n: int = 12, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    h = f"{i:032x}"
    write_image(os.path.join(root, "images", f"{h}.jpg"), rng, mode="RGB")
    rows.append([h, [1, 3, 6, -1][i % 4], 2, "psoriasis", "inflammatory", ["benign", "malignant", "non-neoplastic"][i % 3],
                 "", "http://x", "x"])
  _csv(os.path.join(root, "fitzpatrick17k.csv"),
       ["md5hash", "fitzpatrick_scale", "fitzpatrick_centaur", "label", "nine_partition_label",
        "three_partition_label", "qc", "url", "url_alphanum"], rows)
  return root


def write_ddi(root: str, n: int = 12, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    f = f"{i:06d}.png"
    write_image(os.path.join(root, f), rng, mode="RGB")
    rows.append([i, f, [12, 34, 56][i % 3], ["True", "False"][i % 2], "melanoma" if i % 2 == 0 else "nevus"])
  _csv(os.path.join(root, "ddi_metadata.csv"), ["DDI_ID", "DDI_file", "skin_tone", "malignant", "disease"], rows)
  return root


def write_ham10000(root: str, n: int = 14, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  rows = []
  dx = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
  for i in range(n):
    img = f"ISIC_{i:07d}"
    write_image(os.path.join(root, f"HAM10000_images_part_{1 + i % 2}", f"{img}.jpg"), rng, mode="RGB")
    rows.append([f"HAM_{i // 2:07d}", img, dx[i % 7], "histo", 30 + 5 * i if i % 5 else None,
                 ["male", "female", "unknown"][i % 3], "back"])
  _csv(os.path.join(root, "HAM10000_metadata.csv"),
       ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"], rows)
  return root


def write_custom_csv(root: str, n: int = 48, seed: int = 0, label_format: str = "class", mode: str = "RGB") -> str:
  """A user's export: images/<i>.png (or .jpg) + metadata.csv with a label column in `label_format`,
  tone / sex / age attributes, a site column, a patient id and no split column."""
  rng = np.random.default_rng(seed)
  rows = []
  classes = ["melanoma", "naevus", "eczema"]
  for i in range(n):
    c = i % 3
    ext = "png" if i % 2 else "jpg"
    rel = f"images/{i:03d}.{ext}"
    write_image(os.path.join(root, rel), rng, (18, 14) if i % 4 else (14, 18), mode, 0.25 + 0.25 * c)
    if label_format == "class":
      label = classes[c] if i % 11 != 10 else None  # some unlabelled rows
    elif label_format == "pipe":
      label = ["melanoma|eczema", "naevus", "No Finding"][c] if i % 11 != 10 else None
    else:
      label = json.dumps({classes[c]: 0.8, classes[(c + 1) % 3]: 0.2}) if i % 11 != 10 else None
    rows.append([rel, label, ["light", "dark"][i % 2], ["F", "M"][(i // 2) % 2], 20 + (i * 7) % 60,
                 ["site_a", "site_b", "site_c"][i % 3 if i % 5 else 0], f"pt{i // 2}"])
  path = os.path.join(root, "metadata.csv")
  _csv(path, ["file", "diagnosis", "tone", "sex", "age", "site", "patient_id"], rows)
  return path


def write_findings_csv(root: str, n: int = 24, seed: int = 0) -> str:
  """Greyscale images + one 1 / 0 / -1 / blank column per finding, and a split column."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    rel = f"xr/{i}.png"
    write_image(os.path.join(root, rel), rng)
    rows.append([rel, [1, 0, -1, None][i % 4], [0, 1][i % 2], ["M", "F"][i % 2],
                 ["train", "train", "valid", "test"][(i // 2) % 4], f"p{i // 2}"])
  path = os.path.join(root, "labels.csv")
  _csv(path, ["path", "effusion", "edema", "sex", "split", "patient"], rows)
  return path
