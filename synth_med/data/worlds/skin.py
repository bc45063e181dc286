"""The procedural skin world: up to 27 conditions, sex, age bucket, 6 skin tones.

What shapes an image:
- the condition: lesion colour, size, border irregularity, rings, multiplicity
  and texture, with families of look-alike conditions (hard pairs);
- skin tone: the background colour and the lesion's contrast against it;
- sex and age: hair strokes and wrinkles, and a per-condition change of how the
  lesion presents, so a classifier that saw few examples of a group does worse
  on it;
- the domain: camera colour cast, blur, noise, and label prevalence and
  demographics (ID tele-derm; OOD1 older, mostly male, BCC/SCC-heavy, tone
  mostly unknown; OOD2 a label mix close to ID).
Soft labels come from 3 simulated raters giving top-3 lists (002 §3.3).
"""
from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from synth_med.data import random_fields as rf
from synth_med.data.schema import AGE_BUCKET_NAMES, UNKNOWN, AttributeSpec, DatasetSpec
from synth_med.data.soft_labels import aggregate_ranked
from synth_med.data.worlds.base import TEST, Capture, World, unpack_ids
from synth_med.errors import SynthMedError

# (name, family, ID prevalence weight). High-risk conditions come early so that
# smaller class counts keep them.
CONDITIONS = (
    ("Eczema", 2, 14.0), ("Acne", 3, 10.0), ("Psoriasis", 2, 8.0),
    ("Melanoma", 0, 0.6), ("Basal Cell Carcinoma", 1, 2.0), ("SCC/SCCIS", 1, 1.2),
    ("Urticaria", 4, 2.0), ("Melanocytic Nevus", 0, 5.0), ("Seborrheic Keratosis", 0, 4.0),
    ("Actinic Keratosis", 1, 3.0), ("Allergic Contact Dermatitis", 2, 4.0),
    ("Folliculitis", 3, 3.0), ("Tinea", 4, 2.5), ("Verruca vulgaris", 1, 2.5),
    ("Lentigo", 0, 1.5), ("Vitiligo", 5, 1.5), ("Alopecia Areata", 5, 1.2), ("Cyst", 1, 1.5),
    ("Hidradenitis", 3, 1.0), ("Rosacea", 3, 1.5), ("Seborrheic Dermatitis", 2, 2.5),
    ("Stasis Dermatitis", 2, 1.0), ("Insect Bite", 3, 1.5),
    ("Post Inflammatory Hyperpigmentation", 0, 1.5), ("Tinea Versicolor", 5, 1.0),
    ("Hemangioma", 6, 0.8), ("Other", 6, 3.0),
)
HIGH_RISK = ("Basal Cell Carcinoma", "Melanoma", "SCC/SCCIS", "Urticaria")
OLDER_CONDITIONS = ("Basal Cell Carcinoma", "SCC/SCCIS", "Actinic Keratosis", "Seborrheic Keratosis")

SKIN_TONES = ("pale white", "white", "beige", "brown", "dark brown", "black")
TONE_RGB = np.array([[0.96, 0.86, 0.80], [0.92, 0.76, 0.66], [0.84, 0.66, 0.52],
                     [0.64, 0.46, 0.33], [0.45, 0.31, 0.22], [0.30, 0.20, 0.15]], np.float32)
# Lesions stand out less on darker skin.
TONE_CONTRAST = np.array([1.0, 1.0, 0.95, 0.75, 0.6, 0.5], np.float32)

# Family look: base colour (RGB), radius, aspect, border frequency, border
# amplitude, edge softness, ring, papule count, texture amplitude.
FAMILIES = (
    ((0.35, 0.20, 0.12), 0.28, 1.2, 5, 0.10, 0.03, 0, 1, 0.10),  # pigmented
    ((0.85, 0.62, 0.60), 0.24, 1.1, 3, 0.06, 0.03, 0, 1, 0.15),  # keratinocyte tumours
    ((0.80, 0.36, 0.30), 0.40, 1.5, 7, 0.20, 0.10, 0, 1, 0.25),  # eczematous
    ((0.85, 0.30, 0.30), 0.10, 1.0, 0, 0.00, 0.03, 0, 5, 0.05),  # papules
    ((0.90, 0.45, 0.50), 0.36, 1.2, 4, 0.08, 0.04, 1, 1, 0.05),  # annular / wheals
    ((0.97, 0.93, 0.88), 0.34, 1.3, 6, 0.15, 0.05, 0, 1, 0.05),  # pigment loss
    ((0.60, 0.15, 0.35), 0.22, 1.0, 2, 0.05, 0.03, 0, 2, 0.10),  # vascular / other
)


def _class_table(num_classes: int) -> dict[str, np.ndarray]:
  """Per-condition appearance, fixed for the world (independent of the seed)."""
  rng = np.random.default_rng(20230615)
  cols = {k: [] for k in ("rgb", "radius", "aspect", "freq", "amp", "soft", "ring", "count", "tex",
                          "shift_sex", "shift_age", "shift_tone")}
  for name, fam, _ in CONDITIONS[:num_classes]:
    rgb, r, asp, fq, amp, soft, ring, cnt, tex = FAMILIES[fam]
    cols["rgb"].append(np.clip(np.asarray(rgb) + rng.normal(0, 0.10, 3), 0.05, 1.0))
    cols["radius"].append(r * rng.uniform(0.75, 1.3))
    cols["aspect"].append(asp * rng.uniform(0.85, 1.25))
    cols["freq"].append(max(0, fq + int(rng.integers(-2, 3))))
    cols["amp"].append(amp * rng.uniform(0.5, 1.8))
    cols["soft"].append(soft * rng.uniform(0.7, 1.4))
    cols["ring"].append(float(ring if rng.uniform() > 0.2 else 1 - ring))
    cols["count"].append(int(max(1, cnt + int(rng.integers(-1, 2)))))
    cols["tex"].append(tex * rng.uniform(0.5, 2.0))
    # How a group changes the presentation of this condition (colour shift).
    cols["shift_sex"].append(rng.normal(0, 0.16, 3))
    cols["shift_age"].append(rng.normal(0, 0.12, 3))
    cols["shift_tone"].append(rng.normal(0, 0.10, 3))
  table = {k: np.asarray(v, np.float32) for k, v in cols.items()}
  if "Melanoma" in [c[0] for c in CONDITIONS[:num_classes]]:
    m = [c[0] for c in CONDITIONS].index("Melanoma")
    table["amp"][m], table["freq"][m], table["tex"][m] = 0.28, 6, 0.35  # irregular, variegated
  return table


# Demographics per domain: P(male), age-bucket weights, tone weights, P(tone unknown).
_DEMOGRAPHICS = {
    "id": (0.35, (16, 17, 15, 15, 15, 12, 10), (2, 22, 45, 20, 8, 3), 0.08),
    "id_eval": (0.5, (1, 1, 1, 1, 1, 1, 1), (1, 2, 2, 2, 2, 1), 0.08),
    "ood1": (0.75, (2, 4, 8, 14, 22, 28, 22), (5, 40, 35, 12, 5, 3), 0.9),
    "ood2": (0.45, (16, 17, 15, 15, 15, 12, 10), (2, 20, 40, 22, 10, 6), 0.3),
}

_CAPTURES = {
    "id": Capture(),
    "ood1": Capture(gain=(1.08, 0.97, 0.86), brightness=0.03, contrast=0.9, blur=0.8, noise=0.03),
    "ood2": Capture(gain=(0.92, 0.98, 1.08), brightness=-0.04, contrast=1.1, blur=0.4, noise=0.05),
}

_RATERS, _RANKS = 3, 3
_FAMILY_OF = np.array([c[1] for c in CONDITIONS], np.int32)

# Hash streams for metadata and rendering.
_S_SEX, _S_AGE, _S_TONE, _S_TONE_OBS, _S_LABEL, _S_RATER = 11, 12, 13, 14, 15, 16
_S_GEOM, _S_TEX, _S_HAIR, _S_BG = 21, 22, 23, 24


class SkinWorld(World):
  """Dermatology-like world (see module docstring)."""

  captures = _CAPTURES

  def __init__(self, data_config):
    super().__init__(data_config)
    k = int(data_config.num_classes)
    if not 2 <= k <= len(CONDITIONS):
      raise SynthMedError(f"data.num_classes={k} for the skin world; choose 2..{len(CONDITIONS)}.")
    names = tuple(c[0] for c in CONDITIONS[:k])
    self.spec = DatasetSpec(
        name="skin", class_names=names, label_kind="softmax",
        attributes=(AttributeSpec("sex", ("female", "male")),
                    AttributeSpec("age_bucket", AGE_BUCKET_NAMES),
                    AttributeSpec("skin_tone", SKIN_TONES)),
        domains=("id", "ood1", "ood2"), channels=3,
        high_risk=tuple(h for h in HIGH_RISK if h in names))
    self.table = _class_table(k)
    self.num_classes = k
    self._prevalence = self._build_prevalence()

  def _build_prevalence(self) -> dict[str, np.ndarray]:
    k = self.num_classes
    base = np.array([c[2] for c in CONDITIONS[:k]], np.float64)
    names = [c[0] for c in CONDITIONS[:k]]
    ood1 = base.copy()
    for n in ("Basal Cell Carcinoma", "SCC/SCCIS", "Actinic Keratosis"):
      if n in names:
        ood1[names.index(n)] *= 8.0
    defaults = {"id": base, "ood1": ood1, "ood2": base * np.linspace(1.2, 0.8, k)}
    return self.prevalence(defaults, f"relative weights of the {k} conditions")

  def metadata(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    domain, stream, _ = unpack_ids(ids)
    b, k = len(ids), self.num_classes
    sex = np.zeros(b, np.int32)
    age = np.zeros(b, np.int32)
    tone = np.zeros(b, np.int32)
    tone_obs = np.zeros(b, np.int32)
    label = np.zeros(b, np.int32)
    u = self.uniform(_S_SEX, ids, 5)
    names = [c[0] for c in CONDITIONS[:k]]
    older = np.array([n in OLDER_CONDITIONS for n in names])
    young = np.array([n in ("Acne", "Folliculitis") for n in names])
    for d in np.unique(domain):
      dname = self.spec.domains[d]
      for is_eval in (False, True):
        sel = (domain == d) & ((stream == TEST) == is_eval)
        if not sel.any():
          continue
        demo = _DEMOGRAPHICS["id_eval" if (dname == "id" and is_eval) else dname]
        p_male, age_w, tone_w, p_unknown = demo
        sex[sel] = (u[sel, 0] < p_male).astype(np.int32)
        age[sel] = rf.categorical(u[sel, 1], np.asarray(age_w, np.float64))
        tone[sel] = rf.categorical(u[sel, 2], np.asarray(tone_w, np.float64))
        tone_obs[sel] = np.where(u[sel, 3] < p_unknown, UNKNOWN, tone[sel])
        # Prevalence differs by group: older people get more keratinocyte
        # lesions, the young more acne; lighter skin more melanoma.
        a = age[sel][:, None].astype(np.float64)
        w = np.broadcast_to(self._prevalence[dname], (sel.sum(), k)).copy()
        w[:, older] *= (0.4 + 0.45 * a)
        w[:, young] *= np.maximum(2.2 - 0.45 * a, 0.1)
        label[sel] = rf.categorical(u[sel, 4], w)
    soft = self._rater_soft_labels(ids, label)
    return {"label": soft, "label_mask": np.ones((b, k), np.float32), "domain": domain,
            "attrs/sex": sex, "attrs/age_bucket": age, "attrs/skin_tone": tone_obs,
            "true_tone": tone, "true_class": label}

  def _rater_soft_labels(self, ids: np.ndarray, label: np.ndarray) -> np.ndarray:
    """3 raters, each a ranked top-3: usually right first, else a look-alike first."""
    b, k = len(ids), self.num_classes
    u = self.uniform(_S_RATER, ids, _RATERS * 2).reshape(b, _RATERS, 2)
    ur = self.uniform(_S_RATER + 1, ids, _RATERS * _RANKS * k).reshape(b, _RATERS, _RANKS, k)
    fam = _FAMILY_OF[:k]
    same_fam = fam[None, :] == fam[label][:, None]  # [B, K]
    rows = np.arange(b)
    choices = np.full((b, _RATERS, _RANKS), -1, np.int32)
    for r in range(_RATERS):
      used = np.zeros((b, k), bool)
      for rank in range(_RANKS):
        # A random unused look-alike (same family) if any, else any unused class.
        cand = same_fam & ~used
        cand[rows, label] = False
        cand = np.where(cand.any(axis=1, keepdims=True), cand, ~used)
        alt = np.argmax(cand + 0.5 * ur[:, r, rank], axis=1).astype(np.int32)
        if rank == 0:
          pick = np.where(u[:, r, 0] < 0.72, label, alt)
        else:
          pick = np.where(used[rows, label], alt, label) if rank == 1 else alt
        choices[:, r, rank] = pick
        used[rows, pick] = True
      # Some raters list fewer than 3 conditions.
      choices[:, r, 2] = np.where(u[:, r, 1] < 0.4, -1, choices[:, r, 2])
    return aggregate_ranked(choices, k)

  def render(self, ids: np.ndarray, meta: Mapping[str, np.ndarray]):
    """Per-example parameters in numpy, pixels in one jitted XLA kernel (`_skin_pixels`)."""
    n, t = self.image_size, self.table
    c = meta["true_class"]
    tone = meta["true_tone"]
    sex = meta["attrs/sex"].astype(np.float32)
    age = meta["attrs/age_bucket"].astype(np.float32)
    # Lesion colour: the condition, how the group presents it, and tone contrast.
    lesion = (t["rgb"][c] + t["shift_sex"][c] * sex[:, None]
              + t["shift_age"][c] * np.maximum(age - 3.0, 0.0)[:, None] / 3.0
              + t["shift_tone"][c] * (tone >= 3)[:, None])
    bg_mean = TONE_RGB[tone]
    lesion = bg_mean + (lesion - bg_mean) * TONE_CONTRAST[tone][:, None]
    mottle, texture = self.bank("mottle", 1, 6), self.bank("texture", 3, max(n // 4, 2))
    m_idx, m_flip = mottle.choice(self.seed, _S_BG, ids)
    t_idx, t_flip = texture.choice(self.seed, _S_TEX, ids)
    shape = np.stack([np.sqrt(t["aspect"][c]), t["radius"][c], t["amp"][c], t["freq"][c], t["soft"][c],
                      t["ring"][c], t["count"][c], t["tex"][c], sex, age], axis=1).astype(np.float32)
    return _skin_pixels(n, self.uniform(_S_GEOM, ids, 16), self.uniform(_S_HAIR, ids, 6), shape,
                        lesion.astype(np.float32), TONE_RGB[tone], mottle.device_fields(), m_idx, m_flip,
                        texture.device_fields(), t_idx, t_flip)


@functools.partial(jax.jit, static_argnums=(0,))
def _skin_pixels(n, g, h, shape, lesion, tone_rgb, mottle_fields, m_idx, m_flip, tex_fields, t_idx, t_flip):
  """float32[B, n, n, 3] skin images in [0, 1] (before capture effects)."""
  soft_step = rf.jsoft_step
  col = lambda v: v[:, None, None]  # noqa: E731  [B] -> [B, 1, 1]
  t = ((jnp.arange(n, dtype=jnp.float32) + 0.5) / n) * 2.0 - 1.0
  x, y = t[None, None, :], t[None, :, None]
  aspect, radius, amp, freq, soft, ring, count, texamp, sex, age = (shape[:, k] for k in range(10))

  # Skin background: tone, mottling, wrinkles with age.
  bg = tone_rgb[:, None, None, :] * (1.0 + 0.05 * rf.take_fields(mottle_fields, m_idx, m_flip))
  # Wrinkle lines where sin(phase) > 0.6, i.e. phase/2pi mod 1 in (0.1024, 0.3976).
  phase = (18.0 * (y + 0.08 * jnp.sin(3.0 * x + col(g[:, 10]) * 6.0)) + col(g[:, 11]) * 6.0) / (2 * jnp.pi)
  turn = phase - jnp.floor(phase)
  wrinkle = (turn > 0.1024) & (turn < 0.3976)
  bg = bg * (1.0 - (col(0.012 * age) * wrinkle)[..., None])

  # Main lesion: rotated ellipse with an irregular border, optionally a ring.
  cx, cy = col(0.5 * g[:, 0] - 0.25), col(0.5 * g[:, 1] - 0.25)
  th = col(jnp.pi * g[:, 2])
  dx, dy = x - cx, y - cy
  xr, yr = dx * jnp.cos(th) + dy * jnp.sin(th), -dx * jnp.sin(th) + dy * jnp.cos(th)
  a = col(aspect)
  d = jnp.sqrt((xr / a) ** 2 + (yr * a) ** 2)
  ang = rf.jfast_atan2(yr, xr)
  r = col(radius * (0.85 + 0.3 * g[:, 3]))
  rb = r * (1.0 + col(amp) * rf.jfast_sin(col(freq) * ang + col(6.3 * g[:, 4])))
  m = soft_step((rb - d) / col(soft))
  m = m * (1.0 - col(ring) * soft_step((0.55 * rb - d) / col(soft)))

  # Papules: several small round lesions for conditions with count > 1.
  rp = col(0.35 * radius + 0.05)
  pm = jnp.zeros_like(m)
  for j in range(5):
    px, py = col(1.2 * g[:, 5 + j % 5] - 0.6), col(1.2 * g[:, (7 + 3 * j) % 16] - 0.6)
    blob = soft_step((rp - jnp.sqrt((x - px) ** 2 + (y - py) ** 2)) / col(soft))
    pm = jnp.maximum(pm, blob * col((j < count).astype(jnp.float32)))
  m = jnp.where(col(count) > 1, pm, m)[..., None]

  tex = rf.take_fields(tex_fields, t_idx, t_flip)
  lesion_img = lesion[:, None, None, :] * (1.0 + texamp[:, None, None, None] * tex)
  img = bg * (1.0 - m) + lesion_img * m

  # Hair strokes (males): three thin dark lines.
  hair = jnp.zeros_like(m[..., 0])
  for j in range(3):
    phi = col(jnp.pi * h[:, j])
    dist = jnp.abs(x * jnp.cos(phi) + y * jnp.sin(phi) - col(1.2 * h[:, 3 + j] - 0.6))
    hair = jnp.maximum(hair, soft_step((0.025 - dist) / 0.01))
  return img * (1.0 - 0.55 * (hair * col(sex))[..., None])
