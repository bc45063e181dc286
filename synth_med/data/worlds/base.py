"""Shared machinery of the procedural worlds: example ids, splits, skew and capture.

An example id packs (domain, stream, i) into one int64, so every example is a
pure function of (world seed, id). Streams keep splits disjoint: train, val,
test and unlabelled draws of the same domain never share an example.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import zlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from synth_med.data import random_fields as rf
from synth_med.data.schema import UNKNOWN, DatasetSpec
from synth_med.errors import SynthMedError

TRAIN, VAL, TEST, UNLABELLED = 0, 1, 2, 3
STREAM_NAMES = {"train": TRAIN, "val": VAL, "test": TEST, "unlabelled": UNLABELLED}

# Fraction of the majority group's count kept for the under-represented group,
# from 002 Table A2 (sex: 1157, 115, 19 males against 8972 females).
SKEW_FRACTIONS = {"none": None, "less": 1157 / 8972, "more": 115 / 8972, "most": 19 / 8972}


def make_ids(domain: int, stream: int, i: np.ndarray) -> np.ndarray:
  """Packs (domain, stream, i) into int64 example ids."""
  i = np.asarray(i, np.int64)
  return (np.int64(domain) << np.int64(40)) | (np.int64(stream) << np.int64(32)) | i


def unpack_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  ids = np.asarray(ids, np.int64)
  return ((ids >> 40).astype(np.int32), ((ids >> 32) & 0xFF).astype(np.int32),
          (ids & 0xFFFFFFFF).astype(np.int64))


@dataclasses.dataclass(frozen=True)
class Capture:
  """How a domain's camera/scanner/stain changes an image (applied in [0, 1])."""
  gain: tuple[float, ...] = (1.0, 1.0, 1.0)  # per-channel colour cast
  brightness: float = 0.0
  contrast: float = 1.0
  gamma: float = 1.0
  blur: float = 0.0  # Gaussian sigma in pixels at 64 px
  noise: float = 0.01  # Gaussian noise std


@dataclasses.dataclass(frozen=True)
class Split:
  """A named, finite list of example ids, labelled or not."""
  name: str
  ids: np.ndarray
  labelled: bool

  def __len__(self) -> int:
    return len(self.ids)


class World(abc.ABC):
  """A procedural data set: metadata and images as pure functions of example ids."""

  spec: DatasetSpec
  captures: Mapping[str, Capture]

  def __init__(self, data_config: Any):
    self.config = data_config
    self.seed = int(data_config.seed)
    self.image_size = int(data_config.image_size)
    self._banks: dict[str, rf.FieldBank] = {}

  # --- to implement -----------------------------------------------------------
  @abc.abstractmethod
  def metadata(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Labels, attributes and the hidden variables the renderer needs; cheap."""

  @abc.abstractmethod
  def render(self, ids: np.ndarray, meta: Mapping[str, np.ndarray]) -> np.ndarray:
    """float32[B, H, W, C] in [0, 1] before capture effects."""

  # --- shared -----------------------------------------------------------------
  def prevalence(self, defaults: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
    """Per-domain label prevalence: the world's defaults, overridden by `data.domain_prevalence`.

    An override is a tuple for one domain with the same length as the default
    (`what` says what the numbers are); an empty tuple keeps the default.
    """
    out = {d: np.asarray(v, np.float64) for d, v in defaults.items()}
    overrides = self.config.get("domain_prevalence", None) or {}
    for dom, values in dict(overrides).items():
      if values is None or len(tuple(values)) == 0:
        continue
      if dom not in out:
        raise SynthMedError(f"data.domain_prevalence.{dom}: {dom!r} is not a domain of the "
                            f"{self.spec.name} world; choose from {list(out)}.")
      v = np.asarray(tuple(values), np.float64)
      if v.shape != out[dom].shape or (v < 0).any() or v.sum() <= 0:
        raise SynthMedError(f"data.domain_prevalence.{dom} must be {out[dom].size} non-negative numbers "
                            f"({what}); got {tuple(values)}.")
      out[dom] = v
    return out

  @property
  def id_domains(self) -> tuple[str, ...]:
    return tuple(self.config.id_domains)

  @property
  def ood_domains(self) -> tuple[str, ...]:
    return tuple(self.config.ood_domains)

  @property
  def train_domains(self) -> tuple[str, ...]:
    """The domains of the labelled training and validation splits: `data.train_domains`, or (when empty)
    the ID domains. Paper 000's two-site setting trains on another site's real data; the test splits
    stay the same, so its models are compared on the same images."""
    doms = tuple(self.config.get("train_domains", ()) or ()) or self.id_domains
    bad = [d for d in doms if d not in self.spec.domains]
    if bad:
      raise SynthMedError(f"data.train_domains has unknown domain(s) {bad}; choose from {list(self.spec.domains)}.")
    return doms

  def uniform(self, stream: int, ids: np.ndarray, n: int = 1) -> np.ndarray:
    return rf.uniform(self.seed, stream, ids, n)

  def bank(self, name: str, channels: int, cells: int = 0) -> rf.FieldBank:
    """A named bank of random fields for this world, built once: per-pixel Gaussian
    noise (cells=0) or smooth noise with `cells` control points per side."""
    if name not in self._banks:
      n = self.image_size
      self._banks[name] = (
          rf.FieldBank.gaussian(self.seed, n, channels) if cells <= 0 else
          rf.FieldBank.smooth(self.seed, zlib.crc32(name.encode()), n, min(cells, n), channels))
    return self._banks[name]

  def examples(self, ids: np.ndarray, labelled: bool = True) -> dict[str, np.ndarray]:
    """The schema dict (see `schema.py`) for a batch of example ids."""
    ids = np.asarray(ids, np.int64)
    meta = self.metadata(ids)
    img = self.render(ids, meta)
    out = {
        "image": self.apply_capture(img, meta["domain"], ids),
        "label": meta["label"].astype(np.float32),
        "label_mask": meta["label_mask"].astype(np.float32),
        "labelled": np.full(len(ids), bool(labelled)),
        "domain": meta["domain"].astype(np.int32),
        "index": ids,
    }
    if not labelled:
      out["label"] = np.zeros_like(out["label"])
      out["label_mask"] = np.zeros_like(out["label_mask"])
    for a in self.spec.attributes:
      out[f"attrs/{a.name}"] = meta[f"attrs/{a.name}"].astype(np.int32)
    length = int(self.config.get("report_length", 0) or 0)
    if length > 0:  # paper 003: the image's report as token ids (the report is not a label: unlabelled keep it)
      out["report"] = self.report_vocabulary().encode(self.report_texts(ids, meta), length)
    return out

  def report_texts(self, ids: np.ndarray, meta: Mapping[str, np.ndarray]) -> list[str]:
    """The radiology-style report of each image (worlds that write reports override this)."""
    raise SynthMedError(f"the {self.spec.name} world writes no reports; set data.report_length=0 "
                        "(reports exist for the chest world and for real data with report text).")

  def report_vocabulary(self) -> Any:
    """The `reports.Vocabulary` of this world's reports."""
    raise SynthMedError(f"the {self.spec.name} world writes no reports; set data.report_length=0.")

  def apply_capture(self, img: Any, domain: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Domain shift (blur, colour cast, contrast, brightness, gamma, sensor noise), then uint8.

    One jitted XLA kernel for the whole batch; per-example parameters come from
    each example's domain.
    """
    b, n, c = len(ids), self.image_size, int(np.shape(img)[-1])
    caps = [self.captures[d] for d in self.spec.domains]
    use_blur = any(caps[d].blur > 0 for d in np.unique(domain))
    mats = np.zeros((b, 1, 1), np.float32)  # unused when no domain in the batch blurs
    if use_blur:
      eye = np.eye(n, dtype=np.float32)
      mats = np.stack([rf.blur_matrix(n, cap.blur * n / 64.0) if cap.blur > 0 else eye for cap in caps])[domain]
    per = lambda f: np.asarray([f(caps[d]) for d in domain], np.float32)  # noqa: E731
    bank = self.bank(f"sensor{c}", c)
    idx, flip = bank.choice(self.seed, 901, ids)
    out = _capture_kernel(img, per(lambda k: k.gain[:c]).reshape(b, c), per(lambda k: k.contrast),
                          per(lambda k: k.brightness), per(lambda k: k.gamma), per(lambda k: k.noise),
                          mats,
                          bank.device_fields(), idx, flip, use_blur=use_blur)
    return np.asarray(out)

  # --- splits -----------------------------------------------------------------
  def split(self, name: str) -> Split:
    """Builds a named split: 'train', 'val', 'unlabelled', 'id' (ID test) or an OOD domain."""
    cfg = self.config
    if name == "train":
      return Split("train", self._train_ids(), True)
    if name == "val":
      return Split("val", self._draw(self.train_domains, VAL, int(cfg.val_size), labelled_only=True), True)
    if name == "id":
      return Split("id", self._draw(self.id_domains, TEST, int(cfg.test_size), labelled_only=True), True)
    if name == "unlabelled":
      doms = unlabelled_domains(cfg.unlabelled_domains, self.spec.domains)
      bad = [d for d in doms if d not in self.spec.domains]
      if bad:
        raise SynthMedError(f"data.unlabelled_domains has unknown domain(s) {bad}; "
                            f"choose from {list(self.spec.domains)}.")
      return Split("unlabelled", self._unlabelled_ids(doms), False)
    if name in self.ood_domains:
      return Split(name, self._draw((name,), TEST, int(cfg.ood_size), labelled_only=True), True)
    raise SynthMedError(f"unknown split {name!r} for world {self.spec.name!r}; valid splits: "
                        f"{['train', 'val', 'id', 'unlabelled', *self.ood_domains]}")

  def eval_split_names(self) -> tuple[str, ...]:
    return ("id",) + self.ood_domains

  def usable_for_labelled_training(self, meta: Mapping[str, np.ndarray]) -> np.ndarray:
    """bool[B]: whether an example may enter the labelled classifier set."""
    return np.ones(len(meta["domain"]), bool)

  def _draw(self, domains: tuple[str, ...], stream: int, n: int, labelled_only: bool) -> np.ndarray:
    """n ids spread evenly over `domains`, skipping examples unusable as labelled."""
    out = []
    per = [n // len(domains) + (1 if k < n % len(domains) else 0) for k in range(len(domains))]
    for dom, m in zip(domains, per):
      d = self.spec.domain_id(dom)
      got, start = [], 0
      while sum(len(g) for g in got) < m:
        ids = make_ids(d, stream, np.arange(start, start + 2 * m + 16))
        start += 2 * m + 16
        if labelled_only:
          ids = ids[self.usable_for_labelled_training(self.metadata(ids))]
        got.append(ids)
      out.append(np.concatenate(got)[:m] if got else np.zeros((0,), np.int64))
    return np.concatenate(out) if out else np.zeros((0,), np.int64)

  def _unlabelled_ids(self, domains: tuple[str, ...]) -> np.ndarray:
    n = int(self.config.unlabelled_size)
    return self._draw(domains, UNLABELLED, n, labelled_only=False)

  def _train_ids(self) -> np.ndarray:
    """The ID labelled pool with the configured skew caps applied (Table A2 rule)."""
    pool = self._draw(self.train_domains, TRAIN, int(self.config.train_size), labelled_only=True)
    return apply_skew(pool, self.metadata(pool), self.config.skew, self.spec)


def unlabelled_domains(configured: Any, all_domains: tuple[str, ...]) -> tuple[str, ...]:
  """The domains that supply the generator's unlabelled images, for every data source: the configured
  `data.unlabelled_domains`, or, when that is empty, every domain of the data. (How many images: a
  procedural world draws `data.unlabelled_size` of them, 0 = none; a table keeps its whole unlabelled
  split, or caps it at `data.unlabelled_size` > 0.)"""
  return tuple(configured) or tuple(all_domains)


def apply_skew(pool: np.ndarray, meta: Mapping[str, np.ndarray], skew: Any, spec: Any) -> np.ndarray:
  """`pool` with the minority values of `skew.attribute` capped (002 Table A2 fractions of the majority
  count, or the absolute `skew.cap`); `meta` holds the pool's attributes in order."""
  if skew.setting == "none" and int(skew.cap) < 0:
    return pool
  key = f"attrs/{skew.attribute}"
  if key not in meta:
    raise SynthMedError(f"data.skew.attribute={skew.attribute!r} is not an attribute of the "
                        f"{spec.name} data; choose from {[a.name for a in spec.attributes]}.")
  values = np.asarray(meta[key])
  minority = np.isin(values, np.asarray(tuple(skew.minority_values), np.int32))
  if not minority.any():
    return pool
  majority_count = int(((values != UNKNOWN) & ~minority).sum())
  cap = int(skew.cap) if int(skew.cap) >= 0 else int(round(SKEW_FRACTIONS[skew.setting] * majority_count))
  # Spread the cap over the minority values in proportion to their counts.
  keep = ~minority
  mvals, mcounts = np.unique(values[minority], return_counts=True)
  total = mcounts.sum()
  for v, c in zip(mvals, mcounts):
    quota = int(round(cap * c / total)) if total > cap else int(c)
    keep[np.nonzero(values == v)[0][:quota]] = True
  return pool[keep]


@functools.partial(jax.jit, static_argnames=("use_blur",))
def _capture_kernel(img, gain, contrast, brightness, gamma, noise, blur_mats, noise_fields, noise_idx,
                    noise_flip, use_blur: bool):
  x = jnp.asarray(img, jnp.float32)
  if use_blur:
    x = jnp.einsum("bhk,bkwc->bhwc", blur_mats, x)
    x = jnp.einsum("bwk,bhkc->bhwc", blur_mats, x)
  col = lambda v: v[:, None, None, None]  # noqa: E731
  x = x * gain[:, None, None, :]
  x = jnp.clip((x - 0.5) * col(contrast) + 0.5 + col(brightness), 0.0, 1.0)
  x = jnp.where(col(gamma) == 1.0, x, x ** col(gamma))
  x = x + col(noise) * rf.take_fields(noise_fields, noise_idx, noise_flip)
  return jnp.clip(x * 255.0 + 0.5, 0.0, 255.0).astype(jnp.uint8)
