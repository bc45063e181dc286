"""Reports as data (paper 003, EMIXER): the tokenizer and vocabulary, the chest world's reports, MIMIC-CXR's
report sections and a CSV's report column."""
import os

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from synth_med.data import reports
from synth_med.data.sources import make_world
from synth_med.data.tables import load_table, save_vocabulary
from synth_med.data.tables.chest_xray import report_sections
from synth_med.data.tables.table_world import TableWorld
from synth_med.data.worlds.chest import FINDINGS
from synth_med.errors import SynthMedError
from tests import fake_datasets as fake
from tests.test_real_data import data_cfg


def test_vocabulary_encodes_decodes_saves_and_cuts_keeping_the_end(tmp_path):
  vocab = reports.Vocabulary.build(["No effusion. Mild edema.", "mild edema, small effusion"])
  ids = vocab.encode(["Mild edema, no effusion.", "mild zebra"], 12)
  assert ids.shape == (2, 12) and ids.dtype == np.int32
  assert vocab.decode(ids[0]) == "mild edema, no effusion."
  assert vocab.decode(ids[1]) == "mild <unk>"
  cut = vocab.encode(["mild edema no effusion"], 4)[0]  # <bos> mild edema <eos>
  assert vocab.decode(cut) == "mild edema" and cut[-1] == vocab.index[reports.EOS]
  vocab.save(str(tmp_path / "v.json"))
  assert reports.Vocabulary.load(str(tmp_path / "v.json")).tokens == vocab.tokens
  with pytest.raises(SynthMedError, match="report_length"):
    vocab.encode(["x"], 2)


def _chest(report_length=96, policy="mask_uncertain"):
  from configs import common
  c = common.data_config("chest", 16)
  c.report_length, c.label_policy = report_length, policy
  return make_world(c)


def test_chest_reports_are_fixed_per_image_and_describe_every_drawn_finding():
  world = _chest()
  ids = world.split("train").ids[:400]
  first, again = world.examples(ids[:50])["report"], _chest().examples(ids[:50])["report"]
  np.testing.assert_array_equal(first, again)  # the same image always gets the same report
  meta = world.metadata(ids)
  texts = world.report_texts(ids, meta)
  np.testing.assert_array_equal(world.report_vocabulary().encode(texts[:50], 96), first)
  assert len(set(texts)) > 300  # real variation
  for text, raw in zip(texts, meta["raw_label"]):
    low = text.lower()
    assert low.startswith("findings:") and "impression:" in low
    for k, name in enumerate(FINDINGS):
      if raw[k] != 0:
        assert any(w in low for w in reports.FINDING_KEYWORDS[name]), (name, text)
  assert (world.examples(ids[:50])["report"] == world.report_vocabulary().index[reports.UNK]).sum() == 0


def test_the_laterality_word_matches_the_side_the_effusion_is_drawn_on():
  """Images whose report puts the effusion on the patient's left (the image's right) are brighter in the
  image's lower right than those whose report says right."""
  world = _chest(policy="drop_uncertain")
  ids = world.split("train").ids[:1500]
  meta = world.metadata(ids)
  has = meta["present"][:, FINDINGS.index("Effusion")]
  ids = ids[has]
  texts = world.report_texts(ids, world.metadata(ids))
  side = np.array(["left sided" in t or "left costophrenic" in t or "left pleural" in t or "left lung base" in t
                   for t in texts])
  named_right = np.array(["right sided" in t or "right costophrenic" in t or "right pleural" in t
                          or "right lung base" in t for t in texts])
  img = world.examples(ids)["image"][..., 0].astype(np.float32)
  n = img.shape[1]
  lower = img[:, n // 2:, :]
  right_minus_left = lower[:, :, n // 2:].mean((1, 2)) - lower[:, :, :n // 2].mean((1, 2))
  assert side.sum() > 10 and named_right.sum() > 10
  assert right_minus_left[side].mean() > right_minus_left[named_right].mean() + 5.0


def _bag_of_words(world, ids):
  meta = world.metadata(ids)
  tokens = world.report_vocabulary().encode(world.report_texts(ids, meta), 96)
  x = np.zeros((len(ids), len(world.report_vocabulary())), np.float32)
  for i, row in enumerate(tokens):
    np.add.at(x[i], row[row > 0], 1.0)
  return x, meta["label"], meta["label_mask"]


def test_a_bag_of_words_reads_the_findings_well_but_not_perfectly():
  """Logistic regression on word counts, fitted on 2,000 training reports, on 1,000 ID test reports: mean
  AUC over the findings > 0.95 (chance 0.5; with shuffled training labels < 0.6), but it misreads some
  (shared wording such as 'opacity at the lung base' or 'vascular congestion', impressions that name at
  most two findings): accuracy below 0.995 on the findings with shared wording."""
  world = _chest()
  x, y, m = _bag_of_words(world, world.split("train").ids[:2000])
  xt, yt, mt = _bag_of_words(world, world.split("id").ids[:1000])
  rng = np.random.default_rng(0)
  aucs, shuffled, accuracy = [], [], {}
  for k, name in enumerate(FINDINGS):
    keep, keep_t = m[:, k] > 0, mt[:, k] > 0
    p = LogisticRegression(max_iter=2000).fit(x[keep], y[keep, k]).predict_proba(xt[keep_t])[:, 1]
    aucs.append(roc_auc_score(yt[keep_t, k], p))
    accuracy[name] = np.mean((p > 0.5) == yt[keep_t, k])
    q = LogisticRegression(max_iter=2000).fit(x[keep], rng.permutation(y[keep, k])).predict_proba(xt[keep_t])[:, 1]
    shuffled.append(roc_auc_score(yt[keep_t, k], q))
  assert np.mean(aucs) > 0.95 and np.mean(shuffled) < 0.6
  assert min(accuracy[f] for f in ("Atelectasis", "Effusion", "Edema")) < 0.995, accuracy


def test_a_world_without_reports_says_so():
  from configs import common
  c = common.data_config("skin", 16)
  c.report_length = 32
  with pytest.raises(SynthMedError, match="writes no reports"):
    make_world(c).examples(np.arange(2))


def test_mimic_cxr_reads_the_findings_and_impression_of_each_study(tmp_path):
  text = ("FINAL REPORT\n EXAMINATION: CHEST\n\n FINDINGS:\n Mild\n edema.\n\n IMPRESSION:\n Edema.\n"
          " RECOMMENDATION(S): follow up.\n")
  assert report_sections(text) == "FINDINGS: Mild edema. IMPRESSION: Edema."
  assert report_sections("INDICATION: cough.") == ""
  root, patients = fake.write_mimic(str(tmp_path / "mimic"), reports=True)
  cfg = data_cfg("mimic_cxr", root, tmp_path, mimic_patients_csv=patients, report_length=24)
  table = load_table(cfg)
  study = [int(p.split("/")[3][1:]) - 50000000 for p in table.paths]
  for s, r in zip(study, table.reports):
    assert r == ("" if s == 11 else f"FINDINGS: Study {s}: mild pulmonary edema. No effusion. IMPRESSION: Edema, case {s}.")
  world = TableWorld(cfg, table)
  ex = world.examples(world.split("train").ids)
  assert ex["report"].shape == (len(world.split("train")), 24)
  assert world.report_vocabulary().decode(ex["report"][0]).startswith("findings: study")
  save_vocabulary(world, str(tmp_path / "run"))
  assert reports.Vocabulary.load(str(tmp_path / "run" / "report_vocabulary.json")).tokens == world.report_vocabulary().tokens
  # no reports folder: asking for reports is a clear error naming the fix
  bare, _ = fake.write_mimic(str(tmp_path / "bare"))
  with pytest.raises(SynthMedError, match="mimic-cxr-reports"):
    TableWorld(data_cfg("mimic_cxr", bare, tmp_path, report_length=24), load_table(data_cfg("mimic_cxr", bare, tmp_path)))


def test_a_csv_report_column_reaches_the_examples(tmp_path):
  import pandas as pd
  path = fake.write_custom_csv(str(tmp_path / "csv"))
  df = pd.read_csv(path)
  df["notes"] = [f"lesion {i % 3} with border" if i % 7 else "" for i in range(len(df))]
  df.to_csv(path, index=False)
  cfg = data_cfg("csv", str(tmp_path / "csv"), tmp_path, modality="skin", csv=path, report_length=8)
  cfg.columns.update({"image": "file", "label": "diagnosis", "attributes": "tone,sex", "domain": "site",
                      "patient": "patient_id", "report": "notes"})
  world = TableWorld(cfg, load_table(cfg))
  ids = world.split("train").ids
  got = [world.report_vocabulary().decode(r) for r in world.examples(ids)["report"]]
  assert got == [t.lower() for t in df["notes"].fillna("").to_numpy()[ids]]
