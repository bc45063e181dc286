"""Report-generation metrics (paper 003): BLEU-1..4 and CIDEr through pycocoevalcap, the coco-caption
reference implementation that report-generation papers score with (its BLEU and CIDEr-D scorers are pure
Python; its Java tokenizer is not used: texts are tokenized by `data.reports.tokenize`, the same rule the
vocabulary uses)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from synth_med.data.reports import tokenize
from synth_med.errors import SynthMedError


def _prepared(references: Sequence[str | Sequence[str]], hypotheses: Sequence[str]) -> tuple[dict, dict]:
  if len(references) != len(hypotheses) or not hypotheses:
    raise SynthMedError(f"report metrics need one reference set per generated report; got {len(references)} "
                        f"references and {len(hypotheses)} reports.")
  gts, res = {}, {}
  for i, (ref, hyp) in enumerate(zip(references, hypotheses)):
    refs = [ref] if isinstance(ref, str) else list(ref)
    gts[i] = [" ".join(tokenize(r)) for r in refs]
    res[i] = [" ".join(tokenize(hyp))]
  return gts, res


def report_scores(references: Sequence[str | Sequence[str]], hypotheses: Sequence[str]) -> dict[str, float]:
  """Corpus BLEU-1..4 and CIDEr of generated reports against their references (a string or a list of
  strings each): {'bleu1', ..., 'bleu4', 'cider'}."""
  gts, res = _prepared(references, hypotheses)
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  cider, _ = Cider().compute_score(gts, res)
  return {**{f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}, "cider": float(cider)}


def per_report_cider(references: Sequence[str | Sequence[str]], hypotheses: Sequence[str]) -> np.ndarray:
  """CIDEr of each generated report (the corpus score is their mean), for group comparisons."""
  gts, res = _prepared(references, hypotheses)
  _, scores = Cider().compute_score(gts, res)
  return np.asarray(scores, np.float64)
