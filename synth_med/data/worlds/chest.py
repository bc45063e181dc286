"""The procedural chest X-ray world: 5 findings, multi-label, with uncertain labels.

Attributes: sex, age (002's buckets and 000's decades) and a race-like attribute with paper
000's five groups that leaves the pixels and findings alone.

Greyscale radiographs: thorax, lungs, heart and ribs, with sex changing the
thorax width and adding breast shadows over the lung bases, and age lowering
bone density. Findings are visible where a radiologist would look:
atelectasis (a linear band at a base), consolidation (a dense patch in a lung),
cardiomegaly (a wide heart), effusion (a fluid level with a meniscus) and edema
(bilateral perihilar haze). The ID hospital is CheXpert-like (uncertain labels,
-1); the OOD hospital is ChestX-ray14-like (different exposure, no uncertain
labels, a different prevalence and sex ratio).

Label policies for uncertain findings (shared with the real loaders):
- 'drop_uncertain' (paper 002's choice): blank = negative; images with an uncertain finding are left out of the
  labelled classifier set but still train the generator (unlabelled pool);
- 'mask_uncertain' (paper 000's choice): uncertain findings are masked in training and evaluation;
- 'ones' / 'zeros': uncertain = positive / negative.
"""
from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from synth_med.data import random_fields as rf
from synth_med.data import reports
from synth_med.data.label_policy import apply_label_policy, usable_for_classifier
from synth_med.data.schema import (AGE_BUCKET_NAMES, AGE_DECADE_NAMES, RACE_NAMES, AttributeSpec, DatasetSpec,
                                   age_to_bucket, age_to_decade)
from synth_med.data.worlds.base import UNLABELLED, Capture, World, make_ids, unpack_ids

FINDINGS = ("Atelectasis", "Consolidation", "Cardiomegaly", "Effusion", "Edema")
_PREVALENCE = {"id": (0.15, 0.07, 0.12, 0.25, 0.18), "ood1": (0.10, 0.04, 0.03, 0.12, 0.02)}
_P_MALE = {"id": 0.58, "ood1": 0.56}
# A race-like attribute (paper 000's five groups): it shifts neither the findings nor the pixels, so what
# a model learns about it comes from the data's skew alone. Drawn from its own stream, so adding it
# left every other draw of the world as it was.
_P_RACE = {"id": (0.70, 0.14, 0.12, 0.02, 0.02), "ood1": (0.62, 0.24, 0.10, 0.02, 0.02)}
_P_UNCERTAIN_POS, _P_UNCERTAIN_NEG = 0.2, 0.03

_CAPTURES = {
    "id": Capture(gain=(1.0,), noise=0.015),
    "ood1": Capture(gain=(1.0,), brightness=0.04, contrast=0.8, gamma=0.8, blur=0.7, noise=0.04),
}

_S_DEMO, _S_FIND, _S_UNC, _S_GEOM, _S_RACE, _S_REPORT = 31, 32, 33, 34, 35, 36


class ChestWorld(World):
  """Chest-X-ray-like world (see module docstring)."""

  captures = _CAPTURES

  def __init__(self, data_config):
    super().__init__(data_config)
    self.policy = str(data_config.label_policy)
    apply_label_policy(np.zeros((1, 1)), self.policy)  # validates the name
    self.spec = DatasetSpec(
        name="chest", class_names=FINDINGS, label_kind="multilabel",
        attributes=(AttributeSpec("sex", ("female", "male")),
                    AttributeSpec("age_bucket", AGE_BUCKET_NAMES),
                    AttributeSpec("age_decade", AGE_DECADE_NAMES),
                    AttributeSpec("race", RACE_NAMES)),
        domains=("id", "ood1"), channels=1)
    self._prevalence = self.prevalence(_PREVALENCE, "probability of each of the 5 findings at age 54")

  def metadata(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    domain, stream, _ = unpack_ids(ids)
    b = len(ids)
    u = self.uniform(_S_DEMO, ids, 2)
    uf = self.uniform(_S_FIND, ids, 5)
    uu = self.uniform(_S_UNC, ids, 5)
    ur = self.uniform(_S_RACE, ids, 1)[:, 0]
    sex, race = np.zeros(b, np.int32), np.zeros(b, np.int32)
    age = 18.0 + 72.0 * u[:, 1] ** 0.8
    present = np.zeros((b, 5), bool)
    raw = np.zeros((b, 5), np.int32)
    for d in np.unique(domain):
      dname = self.spec.domains[d]
      sel = domain == d
      sex[sel] = (u[sel, 0] < _P_MALE[dname]).astype(np.int32)
      race[sel] = np.searchsorted(np.cumsum(_P_RACE[dname])[:-1], ur[sel], side="right")
      # Older patients have more cardiomegaly, effusion and edema.
      p = self._prevalence[dname][None, :] * (0.5 + (age[sel, None] - 18) / 72.0)
      present[sel] = uf[sel] < p
      raw[sel] = present[sel].astype(np.int32)
      if dname == "id":  # CheXpert-like reports carry uncertainty
        unc = np.where(present[sel], uu[sel] < _P_UNCERTAIN_POS, uu[sel] < _P_UNCERTAIN_NEG)
        raw[sel] = np.where(unc, -1, raw[sel])
    label, mask = apply_label_policy(raw, self.policy)
    return {"label": label, "label_mask": mask, "domain": domain, "raw_label": raw,
            "present": present, "attrs/sex": sex, "attrs/age_bucket": age_to_bucket(age),
            "attrs/age_decade": age_to_decade(age), "attrs/race": race,
            "age": age.astype(np.float32)}

  def usable_for_labelled_training(self, meta: Mapping[str, np.ndarray]) -> np.ndarray:
    return usable_for_classifier(meta["raw_label"], self.policy)

  def _unlabelled_ids(self, domains: tuple[str, ...]) -> np.ndarray:
    """drop_uncertain: the generator's extra data are the ID images whose labels are uncertain."""
    if self.policy != "drop_uncertain":
      return super()._unlabelled_ids(domains)
    n, out, start = int(self.config.unlabelled_size), [], 0
    doms = [self.spec.domain_id(d) for d in domains]
    while sum(len(o) for o in out) < n:
      ids = np.concatenate([make_ids(d, UNLABELLED, np.arange(start, start + 4 * n + 64)) for d in doms])
      start += 4 * n + 64
      meta = self.metadata(ids)
      out.append(ids[~self.usable_for_labelled_training(meta)])
    return np.concatenate(out)[:n] if out else np.zeros((0,), np.int64)

  def report_texts(self, ids: np.ndarray, meta: Mapping[str, np.ndarray]) -> list[str]:
    """Paper 003's reports (`reports.chest_report`), from what `render` draws: the side of the lateral
    findings (geometry uniform 3: image left is the patient's right), the heart's extra width (cardiomegaly
    severity), the fluid level (effusion: a higher level is a larger effusion) and the consolidation's
    height (its zone). Severity of the findings drawn at one size comes from the report's own uniforms.
    Uncertain findings (-1) are drawn and hedged in the text."""
    g = self.uniform(_S_GEOM, ids, 12)
    u = self.uniform(_S_REPORT, ids, reports.report_uniforms(len(FINDINGS)) + len(FINDINGS))
    severity = u[:, -len(FINDINGS):].copy()
    severity[:, 2] = g[:, 2]
    severity[:, 3] = 1.0 - g[:, 6]
    raw = meta["raw_label"]
    return [reports.chest_report(FINDINGS, raw[i], bool(g[i, 3] >= 0.5), severity[i], float(g[i, 5]), u[i])
            for i in range(len(ids))]

  def report_vocabulary(self) -> reports.Vocabulary:
    return reports.chest_vocabulary(FINDINGS)

  def render(self, ids: np.ndarray, meta: Mapping[str, np.ndarray]):
    """Per-example parameters in numpy, pixels in one jitted XLA kernel (`_chest_pixels`)."""
    return _chest_pixels(self.image_size, self.uniform(_S_GEOM, ids, 12),
                         meta["attrs/sex"].astype(np.float32), meta["age"].astype(np.float32),
                         meta["present"].astype(np.float32))


@functools.partial(jax.jit, static_argnums=(0,))
def _chest_pixels(n, g, sex, age, f):
  """float32[B, n, n, 1] radiographs in [0, 1] (before capture effects)."""
  t = ((jnp.arange(n, dtype=jnp.float32) + 0.5) / n) * 2.0 - 1.0
  x, y = t[None, None, :], t[None, :, None]
  col = lambda v: v[:, None, None]  # noqa: E731
  sex, age = col(sex), col(age)
  width = 0.72 + 0.1 * sex + 0.04 * col(g[:, 0])
  thorax = _sig((1.0 - jnp.sqrt((x / width) ** 2 + ((y - 0.05) / 0.9) ** 2)) / 0.05)
  lung_l = _sig((1.0 - jnp.sqrt(((x + 0.33 * width) / (0.28 * width)) ** 2 + ((y + 0.05) / 0.62) ** 2)) / 0.06)
  lung_r = _sig((1.0 - jnp.sqrt(((x - 0.33 * width) / (0.28 * width)) ** 2 + ((y + 0.05) / 0.62) ** 2)) / 0.06)
  lungs = jnp.maximum(lung_l, lung_r)
  img = 0.08 + 0.45 * thorax - 0.3 * lungs
  density = 1.2 - (age - 18.0) / 90.0  # bone density falls with age
  ribs = 0.5 + 0.5 * jnp.sin(22.0 * (y + 0.12 * x * x) + col(6.0 * g[:, 1]))
  img = img + 0.07 * density * thorax * (ribs > 0.75)
  # Heart: wider with cardiomegaly.
  hw = (0.22 + 0.12 * col(f[:, 2])) * (1.0 + 0.05 * col(g[:, 2]))
  heart = _sig((1.0 - jnp.sqrt(((x + 0.06) / hw) ** 2 + ((y - 0.28) / 0.26) ** 2)) / 0.08)
  img = img + 0.35 * heart
  # Breast shadows over the lung bases (females): they hide basal findings.
  breast = _sig((1.0 - jnp.sqrt(((jnp.abs(x) - 0.42 * width) / 0.3) ** 2 + ((y - 0.55) / 0.22) ** 2)) / 0.1)
  img = img + 0.14 * (1.0 - sex) * breast
  side = jnp.where(col(g[:, 3]) < 0.5, -1.0, 1.0)
  lung_side = jnp.where(side < 0, lung_l, lung_r)
  # Findings, a little fainter in females (obscured by soft tissue).
  vis = 1.0 - 0.3 * (1.0 - sex)
  atel = jnp.exp(-((y - 0.38 - 0.1 * col(g[:, 4])) / 0.035) ** 2) * lung_side
  img = img + 0.3 * vis * col(f[:, 0]) * atel
  cxo, cyo = side * 0.33 * width, col(-0.2 + 0.5 * g[:, 5])
  cons = jnp.exp(-(((x - cxo) ** 2 + (y - cyo) ** 2) / 0.03)) * lung_side
  img = img + 0.38 * vis * col(f[:, 1]) * cons
  level = 0.35 + 0.15 * col(g[:, 6])
  eff = _sig((y - level + 0.6 * (x - side * 0.33 * width) ** 2) / 0.03) * lung_side
  img = img + 0.4 * vis * col(f[:, 3]) * eff
  edema = (jnp.exp(-((jnp.abs(x) - 0.22) ** 2 + (y - 0.0) ** 2) / 0.08)) * lungs
  img = img + 0.22 * vis * col(f[:, 4]) * edema
  return jnp.clip(img, 0.0, 1.0)[..., None]


_sig = rf.jsoft_step
