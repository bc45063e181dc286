"""`TableWorld`: a real data set (an `ImageTable` + its preprocessed shards) behind the World interface.

Splits, with `data.id_domains` / `ood_domains` / `unlabelled_domains` naming
values of the table's domain column (hospital, centre, site; 'all' when the
data set has one):

| split       | rows                                                                     |
|-------------|--------------------------------------------------------------------------|
| train       | ID domains, split 'train', labelled, usable under the label policy; skew |
| val         | ID domains, split 'val', labelled                                        |
| id          | ID domains, split 'test', labelled                                       |
| <ood name>  | that domain, split 'test', labelled (evaluation only)                    |
| unlabelled  | unlabelled-domain rows that are in no other split: unlabelled rows, rows |
|             | the label policy keeps out of classifier training, and OOD 'train' rows  |

`data.{train,val,test,ood,unlabelled}_size` > 0 caps a split (a seeded
choice); 0 keeps all of it. Images are read from the shards that
`images.prepare_images` writes once per image size.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from synth_med.data.label_policy import apply_label_policy, usable_for_classifier
from synth_med.data.reports import Vocabulary
from synth_med.data.tables.images import prepare_images
from synth_med.data.tables.table import ImageTable
from synth_med.data.worlds.base import Split, apply_skew, unlabelled_domains
from synth_med.errors import SynthMedError

DEFAULT_CACHE = "~/.cache/synth_med/preprocessed"


class TableWorld:
  """Serves an `ImageTable` as the procedural worlds are served (split / examples / metadata / spec)."""

  def __init__(self, data_config: Any, table: ImageTable):
    self.config = data_config
    self.image_size = int(data_config.image_size)
    policy = str(data_config.get("label_policy", "drop_uncertain"))
    if table.raw_label is not None:
      label, mask = apply_label_policy(table.raw_label, policy)
      usable = usable_for_classifier(table.raw_label, policy)
    else:
      label, mask, usable = table.label, table.label_mask, np.ones(len(table), bool)
    self.spec = table.spec
    self._label, self._mask = label.astype(np.float32), mask.astype(np.float32)
    self.table = table
    for name, doms in (("id_domains", self.id_domains), ("ood_domains", self.ood_domains),
                       ("train_domains", self.train_domains),
                       ("unlabelled_domains", self.unlabelled_domains)):
      bad = [d for d in doms if d not in table.domains]
      if bad:
        raise SynthMedError(f"data.{name} has {bad}, which never occur in {table.name}'s domain column; "
                            f"its domains are {list(table.domains)}.")
    cache = str(data_config.get("preprocessed_dir", "") or DEFAULT_CACHE)
    self._images, ok = prepare_images(table, self.image_size, cache, bool(data_config.get("equalize", False)),
                                      str(data_config.get("corrupt_images", "skip")),
                                      int(data_config.get("num_threads", 0) or 0))
    self._splits = self._build_splits(ok, usable)
    self.report_length = int(data_config.get("report_length", 0) or 0)
    self._vocabulary = None
    if self.report_length > 0:
      if table.reports is None:
        raise SynthMedError(f"data.report_length={self.report_length} but {table.name} has no report text: for "
                            "MIMIC-CXR-JPG unpack mimic-cxr-reports.zip as <manual_dir>/mimic-cxr-reports/; for your "
                            "CSV name the text column in data.columns.report; or set data.report_length=0.")
      # The training split's words seen twice or more (the rest are <unk>), so no test report shapes it.
      self._vocabulary = Vocabulary.build(table.reports[self._splits["train"]].tolist(), min_count=2)
      self._report_ids = self._vocabulary.encode(table.reports.tolist(), self.report_length)  # once, not per batch

  @property
  def ood_domains(self) -> tuple[str, ...]:
    return tuple(self.config.ood_domains)

  @property
  def id_domains(self) -> tuple[str, ...]:
    """data.id_domains, or (when empty) every domain that is not OOD."""
    return tuple(self.config.id_domains) or tuple(d for d in self.table.domains if d not in self.ood_domains)

  @property
  def train_domains(self) -> tuple[str, ...]:
    """data.train_domains, or (when empty) the ID domains: where the labelled training and validation rows
    come from (paper 000's two-site setting trains on another site's rows; the test splits stay)."""
    return tuple(self.config.get("train_domains", ()) or ()) or self.id_domains

  @property
  def unlabelled_domains(self) -> tuple[str, ...]:
    """data.unlabelled_domains, or (when empty) every domain (`worlds.base.unlabelled_domains`)."""
    return unlabelled_domains(self.config.unlabelled_domains, self.table.domains)

  def eval_split_names(self) -> tuple[str, ...]:
    return ("id",) + self.ood_domains

  def _cap(self, rows: np.ndarray, key: str, salt: int) -> np.ndarray:
    n = int(self.config.get(key, 0) or 0)
    if n <= 0 or len(rows) <= n:
      return rows
    rng = np.random.default_rng([int(self.config.seed), salt])
    return np.sort(rng.choice(rows, n, replace=False))

  def _build_splits(self, ok: np.ndarray, usable: np.ndarray) -> dict[str, np.ndarray]:
    t = self.table
    dom_names = np.asarray(t.domains, dtype=object)[t.domain]
    in_id = np.isin(dom_names, self.id_domains)
    in_train_domains = np.isin(dom_names, self.train_domains)
    lab = t.labelled & ok
    splits = {}
    train = np.nonzero(in_train_domains & lab & usable & (t.split == "train"))[0]
    train = self._cap(train, "train_size", 1)
    splits["train"] = apply_skew(train, self.metadata(train), self.config.skew, self.spec)
    splits["val"] = self._cap(np.nonzero(in_train_domains & lab & (t.split == "val"))[0], "val_size", 2)
    splits["id"] = self._cap(np.nonzero(in_id & lab & (t.split == "test"))[0], "test_size", 3)
    for k, d in enumerate(self.ood_domains):
      splits[d] = self._cap(np.nonzero((dom_names == d) & lab & (t.split == "test"))[0], "ood_size", 10 + k)
    used = np.zeros(len(t), bool)
    for rows in splits.values():
      used[rows] = True
    in_unl = np.isin(dom_names, self.unlabelled_domains)
    # Never an evaluation image, and not the ID labelled rows left out by a cap or the skew.
    in_train = t.split == "train"
    eligible = in_unl & ok & ~used & (~t.labelled | (in_train & ~usable) | (in_train & ~in_train_domains))
    splits["unlabelled"] = self._cap(np.nonzero(eligible)[0], "unlabelled_size", 4)
    for name, rows in splits.items():
      if name in ("train", "val", "id") and len(rows) == 0:
        raise SynthMedError(
            f"{t.name}: the {name!r} split is empty after filtering (domains {list(self.id_domains)}, label "
            f"policy, frontal/decodable images, skew). Check data.id_domains, the split column or fractions, "
            "and data.label_policy.")
    return splits

  def split(self, name: str) -> Split:
    if name not in self._splits:
      raise SynthMedError(f"unknown split {name!r} for {self.table.name}; valid splits: {list(self._splits)}")
    return Split(name, self._splits[name], name != "unlabelled")

  def metadata(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    ids = np.asarray(ids, np.int64)
    out = {"label": self._label[ids], "label_mask": self._mask[ids], "domain": self.table.domain[ids]}
    for a in self.spec.attributes:
      out[f"attrs/{a.name}"] = np.asarray(self.table.attrs[a.name])[ids].astype(np.int32)
    return out

  def examples(self, ids: np.ndarray, labelled: bool = True) -> dict[str, np.ndarray]:
    """The schema dict (see `schema.py`) for table rows `ids`."""
    ids = np.asarray(ids, np.int64)
    meta = self.metadata(ids)
    labelled_rows = np.full(len(ids), bool(labelled)) & self.table.labelled[ids]
    out = {"image": self._images[ids] if len(ids) else
           np.zeros((0, self.image_size, self.image_size, self.spec.channels), np.uint8),
           "label": np.where(labelled_rows[:, None], meta["label"], 0.0).astype(np.float32),
           "label_mask": np.where(labelled_rows[:, None], meta["label_mask"], 0.0).astype(np.float32),
           "labelled": labelled_rows, "domain": meta["domain"].astype(np.int32), "index": ids}
    for a in self.spec.attributes:
      out[f"attrs/{a.name}"] = meta[f"attrs/{a.name}"]
    if self.report_length > 0:
      out["report"] = self._report_ids[ids]
    return out

  def report_vocabulary(self) -> Vocabulary:
    """The vocabulary of the training split's reports (data.report_length > 0)."""
    if self._vocabulary is None:
      raise SynthMedError(f"{self.table.name}: reports are read only with data.report_length > 0.")
    return self._vocabulary


def describe(world: TableWorld) -> str:
  """One line per split with its size, for the log."""
  return ", ".join(f"{k} {len(v)}" for k, v in world._splits.items())

