"""The procedural worlds: determinism, visible labels/attributes, splits, skew, soft labels."""
import numpy as np
import pytest

from synth_med.data.soft_labels import aggregate_ranked, aggregate_rater_lists
from synth_med.data.sources import make_world
from synth_med.data.worlds.base import TRAIN, make_ids, unpack_ids
from synth_med.errors import SynthMedError

WORLDS = ("skin", "chest", "tissue")


def test_soft_label_test_vector():
  # PAPER_NOTES: R1 {A:4, B:3}, R2 {A:3, D:4} -> (A, B, C, D) = (0.5, 0.167, 0, 0.333).
  got = aggregate_rater_lists([{0: 4, 1: 3}, {0: 3, 3: 4}], 4)
  np.testing.assert_allclose(got, [0.5, 1 / 6, 0.0, 1 / 3], atol=1e-6)
  ranked = aggregate_ranked(np.array([[[0, 1, -1], [3, 0, -1]]]), 4)
  np.testing.assert_allclose(ranked[0], got, atol=1e-6)


@pytest.mark.parametrize("world", WORLDS)
def test_examples_are_deterministic_per_id(world, tiny_world_config):
  w = make_world(tiny_world_config(world))
  ids = w.split("train").ids[:12]
  a = w.examples(ids)
  b = w.examples(ids[::-1])  # a different batch order and composition
  c = w.examples(ids[3:4])
  np.testing.assert_array_equal(a["image"], b["image"][::-1])
  np.testing.assert_array_equal(a["image"][3], c["image"][0])
  np.testing.assert_array_equal(a["label"], b["label"][::-1])
  assert a["image"].dtype == np.uint8 and a["image"].shape[1:3] == (16, 16)
  other = make_world(tiny_world_config(world).copy_and_resolve_references())
  np.testing.assert_array_equal(other.examples(ids)["image"], a["image"])


def test_seed_changes_the_world(tiny_world_config):
  c0, c1 = tiny_world_config("skin"), tiny_world_config("skin")
  c1.seed = 1
  ids = make_ids(0, TRAIN, np.arange(8))
  assert not np.array_equal(make_world(c0).examples(ids)["image"], make_world(c1).examples(ids)["image"])


def test_ids_round_trip():
  ids = make_ids(2, 3, np.arange(5))
  d, s, i = unpack_ids(ids)
  assert (d == 2).all() and (s == 3).all() and list(i) == list(range(5))


def _class_means(w, ids):
  ex = w.examples(ids)
  y = ex["label"].argmax(1) if w.spec.label_kind != "binary" else (ex["label"][:, 0] > 0.5).astype(int)
  return ex, y


def test_tissue_label_is_visible(tiny_world_config):
  c = tiny_world_config("tissue")
  c.val_size = 600
  w = make_world(c)
  ids = w.split("val").ids
  ex, y = _class_means(w, ids)
  dark = 255 - ex["image"].astype(float).mean(axis=(1, 2, 3))
  domain = unpack_ids(ids)[0]
  # Tumour patches are denser in nuclei, hence darker, within every hospital ...
  for d in np.unique(domain):
    sel = domain == d
    assert dark[sel & (y == 1)].mean() > dark[sel & (y == 0)].mean() + 2.5
  # ... while the hospitals' stains differ by as much (the confounder skew exposes).
  per_h = [dark[domain == d].mean() for d in np.unique(domain)]
  assert max(per_h) - min(per_h) > 2.5


def test_chest_findings_are_visible(tiny_world_config):
  c = tiny_world_config("chest", 32)
  w = make_world(c)
  ids = w.split("id").ids
  meta = w.metadata(ids)
  img = w.examples(ids)["image"].astype(float)[..., 0]
  # Cardiomegaly widens the heart: more bright pixels in the central band.
  band = img[:, 14:26, 8:22].mean(axis=(1, 2))
  card = meta["present"][:, 2]
  assert band[card].mean() > band[~card].mean() + 3


def test_skin_attributes_are_visible(tiny_world_config):
  w = make_world(tiny_world_config("skin", 32))
  ids = w.split("id").ids
  meta = w.metadata(ids)
  img = w.examples(ids)["image"].astype(float)
  tone = meta["true_tone"]
  brightness = img.mean(axis=(1, 2, 3))
  assert brightness[tone <= 1].mean() > brightness[tone >= 4].mean() + 40


def test_labelled_splits_come_from_id_domains_only(tiny_world_config):
  for world in WORLDS:
    w = make_world(tiny_world_config(world))
    for split in ("train", "val", "id"):
      d, _, _ = unpack_ids(w.split(split).ids)
      names = {w.spec.domains[i] for i in np.unique(d)}
      assert names <= set(w.id_domains), (world, split, names)
    for ood in w.ood_domains:
      d, _, _ = unpack_ids(w.split(ood).ids)
      assert {w.spec.domains[i] for i in np.unique(d)} == {ood}


def test_train_domains_move_the_training_and_validation_splits_only(tiny_world_config):
  """Paper 000's two sites: training and validation images from the OOD site, disjoint from its test split;
  the test splits are those of the study's other models."""
  base = make_world(tiny_world_config("chest"))
  c = tiny_world_config("chest")
  c.train_domains = ("ood1",)
  w = make_world(c)
  for split in ("train", "val"):
    d, _, _ = unpack_ids(w.split(split).ids)
    assert {w.spec.domains[i] for i in np.unique(d)} == {"ood1"}, split
    assert len(w.split(split)) == len(base.split(split)) or split == "train"
  assert not set(w.split("train").ids) & set(w.split("ood1").ids)
  assert not set(w.split("val").ids) & set(w.split("ood1").ids)
  for split in ("id", "ood1"):
    np.testing.assert_array_equal(w.split(split).ids, base.split(split).ids)
  c.train_domains = ("hospital9",)
  with pytest.raises(SynthMedError, match=r"data.train_domains has unknown domain\(s\) \['hospital9'\]"):
    make_world(c).split("train")


def test_no_unlabelled_images_is_an_empty_split(tiny_world_config):
  for world in WORLDS:
    c = tiny_world_config(world)
    c.unlabelled_size = 0
    assert len(make_world(c).split("unlabelled")) == 0, world


def test_unlabelled_domains_follow_the_config(tiny_world_config):
  c = tiny_world_config("skin")
  w = make_world(c)
  d, _, _ = unpack_ids(w.split("unlabelled").ids)
  assert {w.spec.domains[i] for i in np.unique(d)} == {"id", "ood1", "ood2"}
  c.unlabelled_domains = ("ood2",)
  w = make_world(c)
  d, _, _ = unpack_ids(w.split("unlabelled").ids)
  assert {w.spec.domains[i] for i in np.unique(d)} == {"ood2"}
  ex = w.examples(w.split("unlabelled").ids[:4], labelled=False)
  assert not ex["labelled"].any() and ex["label"].sum() == 0
  c.unlabelled_domains = ("mars",)
  with pytest.raises(SynthMedError, match="unknown domain"):
    make_world(c).split("unlabelled")


def test_tissue_unlabelled_keep_hospital(tiny_world_config):
  w = make_world(tiny_world_config("tissue"))
  ex = w.examples(w.split("unlabelled").ids, labelled=False)
  assert (ex["attrs/hospital"] >= 0).all()
  assert set(np.unique(ex["attrs/hospital"])) == {0, 1, 2}


def test_chest_policy_002_moves_uncertain_images_to_unlabelled(tiny_world_config):
  w = make_world(tiny_world_config("chest"))
  train = w.metadata(w.split("train").ids)
  unl = w.metadata(w.split("unlabelled").ids)
  assert not (train["raw_label"] == -1).any()
  assert (unl["raw_label"] == -1).any(axis=1).all()
  d, _, _ = unpack_ids(w.split("unlabelled").ids)
  assert set(np.unique(d)) == {0}  # ID only


def test_chest_policy_000_masks_uncertain(tiny_world_config):
  c = tiny_world_config("chest")
  c.label_policy = "mask_uncertain"
  w = make_world(c)
  meta = w.metadata(w.split("train").ids)
  unc = meta["raw_label"] == -1
  assert unc.any()
  assert (meta["label_mask"][unc] == 0).all() and (meta["label_mask"][~unc] == 1).all()


@pytest.mark.parametrize("setting,frac", [("less", 1157 / 8972), ("more", 115 / 8972)])
def test_skew_caps_the_minority(setting, frac, tiny_world_config):
  c = tiny_world_config("skin")
  c.train_size = 2000
  c.skew.setting = setting
  meta = make_world(c).metadata(make_world(c).split("train").ids)
  males, females = (meta["attrs/sex"] == 1).sum(), (meta["attrs/sex"] == 0).sum()
  assert males == round(frac * females)


def test_skew_settings_order_and_absolute_cap(tiny_world_config):
  counts = {}
  for s in ("none", "less", "more", "most"):
    c = tiny_world_config("tissue")
    c.train_size = 3000
    c.skew.setting = s
    meta = make_world(c).metadata(make_world(c).split("train").ids)
    counts[s] = int(np.isin(meta["attrs/hospital"], [1, 2]).sum())
  assert counts["none"] > counts["less"] > counts["more"] >= counts["most"]
  c.skew.cap = 7
  meta = make_world(c).metadata(make_world(c).split("train").ids)
  assert abs(int(np.isin(meta["attrs/hospital"], [1, 2]).sum()) - 7) <= 1


def test_skin_domains_shift(tiny_world_config):
  c = tiny_world_config("skin")
  c.test_size = c.ood_size = 600
  w = make_world(c)
  idm, ood1 = w.metadata(w.split("id").ids), w.metadata(w.split("ood1").ids)
  assert ood1["attrs/sex"].mean() > idm["attrs/sex"].mean() + 0.15  # mostly male
  assert ood1["attrs/age_bucket"].mean() > idm["attrs/age_bucket"].mean() + 1  # older
  assert (ood1["attrs/skin_tone"] < 0).mean() > 0.8  # tone mostly unknown
  bcc = w.spec.class_names.index("Basal Cell Carcinoma")
  assert (ood1["true_class"] == bcc).mean() > 2 * (idm["true_class"] == bcc).mean()


def test_skin_soft_labels_are_distributions(tiny_world_config):
  w = make_world(tiny_world_config("skin"))
  meta = w.metadata(w.split("train").ids)
  np.testing.assert_allclose(meta["label"].sum(1), 1.0, atol=1e-5)
  agree = (meta["label"].argmax(1) == meta["true_class"]).mean()
  assert 0.75 < agree < 1.0  # raters are mostly, not always, right
  assert len(w.spec.high_risk) == 4


def test_bad_world_settings(tiny_world_config):
  c = tiny_world_config("skin")
  c.num_classes = 40
  with pytest.raises(SynthMedError, match="num_classes"):
    make_world(c)
  c = tiny_world_config("skin")
  c.world = "retina"
  with pytest.raises(SynthMedError, match="choose one of"):
    make_world(c)


def test_domain_prevalence_override(tiny_world_config):
  c = tiny_world_config("tissue")
  c.test_size = 400
  c.domain_prevalence.h0 = (0.9,)
  w = make_world(c)
  assert w.metadata(w.split("id").ids)["label"][:, 0][unpack_ids(w.split("id").ids)[0] == 0].mean() > 0.8
  c.domain_prevalence.h0 = (0.5, 0.5)
  with pytest.raises(SynthMedError, match="domain_prevalence.h0 must be 1"):
    make_world(c)
  c = tiny_world_config("chest")
  c.domain_prevalence.ood1 = (0.0, 0.0, 0.9, 0.0, 0.0)
  meta = make_world(c).metadata(make_world(c).split("ood1").ids)
  assert meta["present"][:, 2].mean() > 0.5 and meta["present"][:, 0].sum() == 0


def test_matrix_blur_matches_scipy():
  from scipy import ndimage

  from synth_med.data import random_fields as rf
  x = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32)
  ref = ndimage.gaussian_filter(x, (0, 1, 1), mode="nearest", truncate=2.5)
  m = rf.blur_matrix(16, 1.0)
  np.testing.assert_allclose((m @ x @ m.T)[:, 3:-3, 3:-3], ref[:, 3:-3, 3:-3], atol=1e-5)
  np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)


def test_field_bank_draw_matches_the_jitted_take():
  from synth_med.data import random_fields as rf
  bank = rf.FieldBank.smooth(0, 5, 8, 4, 3, count=16)
  ids = np.arange(20)
  idx, flip = bank.choice(0, 7, ids)
  assert flip.any() and not flip.all()
  np.testing.assert_allclose(np.asarray(rf.take_fields(bank.device_fields(), idx, flip)),
                             bank.draw(0, 7, ids), atol=1e-6)


def test_chest_race_and_age_decades_follow_their_draws_and_take_the_skew(tiny_world_config):
  """Paper 000's conditioning attributes on the chest world: five race-like groups in each domain's
  proportions, age decades that agree with the age, and the skew knobs as for sex."""
  from synth_med.data.worlds.chest import _P_RACE
  c = tiny_world_config("chest")
  c.train_size = 3000
  w = make_world(c)
  assert [a.name for a in w.spec.attributes] == ["sex", "age_bucket", "age_decade", "race"]
  meta = w.metadata(w.split("train").ids)
  share = np.bincount(meta["attrs/race"], minlength=5) / len(meta["attrs/race"])
  np.testing.assert_allclose(share, _P_RACE["id"], atol=0.03)
  np.testing.assert_array_equal(meta["attrs/age_decade"], np.floor(meta["age"] / 10).astype(int) - 1)
  c.skew.attribute, c.skew.minority_values, c.skew.setting = "race", (1, 2, 3, 4), "more"
  skewed = make_world(c).metadata(make_world(c).split("train").ids)
  white = int((skewed["attrs/race"] == 0).sum())
  assert int((skewed["attrs/race"] > 0).sum()) == round(115 / 8972 * white)
