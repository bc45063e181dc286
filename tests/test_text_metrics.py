"""Report metrics (evaluation/text_metrics.py) against hand computations and the library they wrap."""
import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from synth_med.errors import SynthMedError
from synth_med.evaluation.text_metrics import per_report_cider, report_scores

REFS = ["Mild pulmonary edema. No effusion.", "The heart is enlarged.", "No acute cardiopulmonary process."]
HYPS = ["mild pulmonary edema and effusion.", "the heart is normal.", "no acute cardiopulmonary process."]


def test_bleu_one_is_clipped_unigram_precision_times_the_brevity_penalty():
  """One pair: hypothesis 'the heart is normal .' (5 tokens) against 'the heart is enlarged .' (5):
  4 of 5 unigrams match, no brevity penalty: BLEU-1 = 0.8; 2 of 4 bigrams: BLEU-2 = sqrt(0.8 * 2/4)."""
  s = report_scores(["The heart is enlarged."], ["the heart is normal."])
  assert s["bleu1"] == pytest.approx(0.8, abs=1e-6)
  assert s["bleu2"] == pytest.approx(np.sqrt(0.8 * 0.5), abs=1e-6)
  assert report_scores(["a b c d"], ["a b c d"])["bleu4"] == pytest.approx(1.0, abs=1e-6)


def test_scores_equal_the_coco_caption_scorers_on_fixed_strings():
  s = report_scores(REFS, HYPS)
  gts = {0: ["mild pulmonary edema . no effusion ."], 1: ["the heart is enlarged ."],
         2: ["no acute cardiopulmonary process ."]}
  res = {0: ["mild pulmonary edema and effusion ."], 1: ["the heart is normal ."],
         2: ["no acute cardiopulmonary process ."]}
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  cider, per = Cider().compute_score(gts, res)
  assert [s[f"bleu{n}"] for n in range(1, 5)] == pytest.approx(bleu)
  assert s["cider"] == pytest.approx(cider)
  np.testing.assert_allclose(per_report_cider(REFS, HYPS), per)
  assert per[2] > per[1] > 0  # the exact report scores highest
  assert report_scores(REFS, list(reversed(HYPS)))["cider"] < s["cider"]  # mismatched reports score lower


def test_mismatched_lengths_are_a_clear_error():
  with pytest.raises(SynthMedError, match="one reference set per generated report"):
    report_scores(REFS, HYPS[:2])
