"""CAMELYON17-WILDS patches as WILDS distributes them (camelyon17_v1.0/).

`metadata.csv` (first column an unnamed index): patient, node, x_coord, y_coord,
tumor, slide, center, split; patches at
`patches/patient_{patient}_node_{node}/patch_patient_{patient}_node_{node}_x_{x}_y_{y}.png`
(patient zero-padded to 3 digits as in the file names). The optional unlabelled
set (camelyon17_unlabeled_v1.0/, same metadata without `tumor`) trains only the
generator.

Centres become the tissue world's hospitals h0..h4. The WILDS split: train
centres 0, 3, 4 (ID); OOD validation centre 1; OOD test centre 2. 002's Table
A1 swaps the names of the last two (docs/data.md). WILDS' id_val rows (split 1 in the
training centres) are our ID validation split; our ID test split is a slide-level
held-out slice (`data.id_test_fraction`) of the training rows.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from synth_med.data.schema import AttributeSpec
from synth_med.data.tables.table import ImageTable, codes, patient_split, read_csv, require_folder
from synth_med.data.worlds.tissue import HOSPITALS, ID_HOSPITALS

ID_CENTRES = (0, 3, 4)
COLUMNS = ["patient", "node", "x_coord", "y_coord", "slide", "center", "split"]


def _patch_paths(df, prefix: str) -> np.ndarray:
  p = df["patient"].astype(str).str.zfill(3)
  n = df["node"].astype(int).astype(str)
  folder = prefix + "patches/patient_" + p + "_node_" + n
  return (folder + "/patch_patient_" + p + "_node_" + n + "_x_" + df["x_coord"].astype(int).astype(str) +
          "_y_" + df["y_coord"].astype(int).astype(str) + ".png").to_numpy()


def _folder(root: str, name: str) -> str | None:
  """`root` itself if it is that folder, else root/name, else None."""
  if os.path.exists(os.path.join(root, "metadata.csv")) and os.path.basename(os.path.normpath(root)) == name:
    return root
  return os.path.join(root, name) if os.path.isdir(os.path.join(root, name)) else None


def load_camelyon17(cfg: Any) -> ImageTable:
  import pandas as pd
  root = require_folder(cfg.manual_dir, "CAMELYON17-WILDS")
  labelled_dir = _folder(root, "camelyon17_v1.0") or root
  df = read_csv(os.path.join(labelled_dir, "metadata.csv"), COLUMNS + ["tumor"], "CAMELYON17-WILDS",
                index_col=0, dtype={"patient": str})
  df["_prefix"] = os.path.relpath(labelled_dir, root) + "/" if labelled_dir != root else ""
  df["_labelled"] = True
  unl_dir = _folder(root, "camelyon17_unlabeled_v1.0")
  if unl_dir is not None and bool(cfg.get("use_unlabelled_set", True)):
    unl = read_csv(os.path.join(unl_dir, "metadata.csv"), COLUMNS, "CAMELYON17-WILDS unlabelled",
                   index_col=0, dtype={"patient": str})
    unl["tumor"], unl["_prefix"], unl["_labelled"] = 0, os.path.relpath(unl_dir, root) + "/", False
    df = pd.concat([df, unl], ignore_index=True)
  paths = np.concatenate([_patch_paths(g, prefix) for prefix, g in df.groupby("_prefix", sort=False)])
  df = pd.concat([g for _, g in df.groupby("_prefix", sort=False)], ignore_index=True)
  centre = df["center"].astype(int).to_numpy()
  labelled = df["_labelled"].to_numpy(bool)
  slide = df["slide"].astype(str).to_numpy()
  split = np.full(len(df), "test", object)  # OOD centres: evaluation
  in_id = np.isin(centre, ID_CENTRES)
  wilds_split = df["split"].astype(int).to_numpy()
  split[in_id & (wilds_split == 1)] = "val"
  rest = in_id & (wilds_split != 1)
  f = float(cfg.id_test_fraction)
  split[rest] = patient_split(slide[rest], {"train": 1.0 - f, "test": f}, int(cfg.seed))
  split[~labelled] = "train"  # unlabelled patches only train the generator
  label = df["tumor"].astype(np.float32).to_numpy()[:, None]  # binary, as the tissue world
  hospital = np.asarray([f"h{c}" for c in centre], dtype=object)
  return ImageTable(
      name="camelyon17", root=root, paths=paths.astype(str), class_names=("tumour",), label_kind="binary",
      label=label, label_mask=np.ones_like(label), labelled=labelled,
      attributes=(AttributeSpec("hospital", ID_HOSPITALS),), attrs={"hospital": codes(hospital, ID_HOSPITALS)},
      domains=HOSPITALS, domain=codes(hospital, HOSPITALS), split=split.astype(str), patient=slide, channels=3)
