"""Free-text radiology reports as data (paper 003, EMIXER): a tokenizer, a vocabulary saved beside the data,
fixed-length token ids for the example schema (`report`: int32[L], 0-padded), and the procedural chest
world's report writer.

The writer turns an image's findings and the geometry the renderer drew into a radiology-style report:
several sentence templates per finding, laterality and severity words that match the drawing, hedged
wording for uncertain findings, negations for some absent findings, a short impression and distractor
sentences. Every choice is drawn from the image's own uniforms, so the same image always gets the same
report, and no single fixed sentence gives the label away.
"""
from __future__ import annotations

import functools
import json
import os
import re
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

from synth_med.errors import SynthMedError
from synth_med.infra.artifacts import atomic_write

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[.,;:]")


def tokenize(text: str) -> list[str]:
  """Lower-cased words and the punctuation . , ; : as tokens."""
  return _TOKEN.findall(text.lower())


class Vocabulary:
  """Token <-> id; ids 0..3 are <pad>, <bos>, <eos>, <unk>."""

  def __init__(self, tokens: Sequence[str]):
    words = [t for t in tokens if t not in SPECIALS]
    self.tokens = list(SPECIALS) + list(dict.fromkeys(words))
    self.index = {t: i for i, t in enumerate(self.tokens)}

  def __len__(self) -> int:
    return len(self.tokens)

  @classmethod
  def build(cls, texts: Iterable[str], min_count: int = 1) -> "Vocabulary":
    """The tokens of `texts` seen at least `min_count` times, most frequent first (ties alphabetical)."""
    counts = Counter(t for text in texts for t in tokenize(text))
    return cls([t for t, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count])

  def encode(self, texts: Sequence[str], length: int) -> np.ndarray:
    """int32[N, length]: <bos> tokens <eos>, cut to `length` (the <eos> kept) and padded with 0."""
    if length < 3:
      raise SynthMedError(f"data.report_length={length}: a report needs at least 3 tokens (<bos>, a word, <eos>).")
    out = np.zeros((len(texts), length), np.int32)
    unk = self.index[UNK]
    for i, text in enumerate(texts):
      ids = [self.index[BOS]] + [self.index.get(t, unk) for t in tokenize(text)][:length - 2] + [self.index[EOS]]
      out[i, :len(ids)] = ids
    return out

  def decode(self, ids: Sequence[int]) -> str:
    """Token ids back to text, stopping at <eos> and dropping <pad> / <bos>."""
    words = []
    for i in np.asarray(ids).tolist():
      tok = self.tokens[i] if 0 <= i < len(self.tokens) else UNK
      if tok == EOS:
        break
      if tok not in (PAD, BOS):
        words.append(tok)
    text = " ".join(words)
    return re.sub(r" ([.,;:])", r"\1", text)

  def save(self, path: str) -> None:
    atomic_write(path, lambda f: json.dump({"tokens": self.tokens}, f), mode="w", suffix=".json")

  @classmethod
  def load(cls, path: str) -> "Vocabulary":
    if not os.path.exists(path):
      raise SynthMedError(f"report vocabulary {path!r} does not exist; it is written beside the data "
                          "(report_vocabulary.json) by the run that read the reports.")
    with open(path) as f:
      return cls(json.load(f)["tokens"])


# --- the procedural chest world's reports -----------------------------------------------------------------

_FINDING_SENTENCES = {
    "Atelectasis": ("{sev} {side} basilar atelectasis.", "linear opacity at the {side} lung base, consistent with "
                    "{sev} atelectasis.", "there is {sev} subsegmental atelectasis in the {side} lower lobe.",
                    "{sev} opacity at the {side} lung base."),
    "Consolidation": ("focal consolidation in the {side} {zone} zone.", "{sev} airspace opacity in the {side} lung, "
                      "concerning for consolidation.", "there is a {sev} consolidation of the {side} {zone} lung.",
                      "patchy opacity in the {side} {zone} zone."),
    "Cardiomegaly": ("the heart is {sevly} enlarged.", "{sev} cardiomegaly.", "the cardiac silhouette is {sevly} "
                     "enlarged, in keeping with cardiomegaly.", "{sev} vascular congestion."),
    "Effusion": ("{sev} {side} pleural effusion.", "blunting of the {side} costophrenic angle with a {sev} "
                 "effusion.", "there is a {sev} {side} sided pleural effusion with a meniscus.",
                 "{sev} opacity at the {side} lung base."),
    "Edema": ("{sev} pulmonary edema.", "bilateral perihilar haziness, consistent with {sev} interstitial edema.",
              "vascular congestion with {sev} pulmonary edema.", "{sev} vascular congestion."),
}
_NEGATIONS = {
    "Atelectasis": ("no atelectasis.", "no volume loss."),
    "Consolidation": ("no focal consolidation.", "the lungs are clear without consolidation."),
    "Cardiomegaly": ("the heart size is normal.", "normal cardiac silhouette."),
    "Effusion": ("no pleural effusion.", "no effusion is seen."),
    "Edema": ("no pulmonary edema.", "no signs of edema."),
}
_HEDGES = ("possible {text}", "cannot exclude {text}", "questionable {text}")
_DISTRACTORS = ("no pneumothorax.", "the mediastinal contours are within normal limits.",
                "degenerative changes of the thoracic spine.", "the osseous structures are intact.",
                "single frontal view of the chest.", "no acute osseous abnormality.",
                "the trachea is midline.", "surgical clips in the upper abdomen.")
_ABNORMAL_IMPRESSIONS = ("findings as above.", "see findings; clinical correlation recommended.")
_NORMAL_IMPRESSIONS = ("no acute cardiopulmonary process.", "normal chest radiograph.",
                       "no acute findings.")
_SEVERITY = ("mild", "moderate")
_SEVERITY_ADVERB = ("mildly", "moderately")
# Words that show a finding is described (every template of a finding has one of them). The fourth template
# of some findings is shared with another finding ("opacity at the lung base": atelectasis or effusion;
# "vascular congestion": cardiomegaly or edema), as radiologists' wording often is.
FINDING_KEYWORDS = {"Atelectasis": ("atelectasis", "opacity at the"), "Consolidation": ("consolidation", "patchy opacity"),
                    "Cardiomegaly": ("cardiomegaly", "enlarged", "vascular congestion"),
                    "Effusion": ("effusion", "opacity at the"), "Edema": ("edema", "vascular congestion")}
_ZONES = ("upper", "mid", "lower")


def _pick(options: Sequence[str], u: float) -> str:
  return options[min(int(u * len(options)), len(options) - 1)]


def report_uniforms(num_findings: int) -> int:
  """How many uniforms `chest_report` reads per image."""
  return 4 * num_findings + 1 + len(_DISTRACTORS) + (num_findings + 3) + num_findings + 3


def chest_report(findings: Sequence[str], raw: np.ndarray, side_left: bool, severity: np.ndarray, zone: float,
                 u: np.ndarray) -> str:
  """One report. `raw` [F]: 1 present, 0 absent, -1 uncertain (drawn as present); `side_left` is the
  patient's side the lateral findings are drawn on; `severity` [F] in [0, 1] from the drawing; `zone` in
  [0, 1] where a consolidation sits (top to bottom); `u` [`report_uniforms(F)`] this image's uniforms."""
  side = "left" if side_left else "right"
  sentences, mentioned = [], []
  for k, name in enumerate(findings):
    uk = u[4 * k:4 * k + 4]
    if raw[k] != 0:
      templates = _FINDING_SENTENCES[name]  # the last, shared wording 40 % of the time
      template = templates[-1] if uk[0] < 0.4 else _pick(templates[:-1], (uk[0] - 0.4) / 0.6)
      text = template.format(
          side=side, sev=_SEVERITY[int(severity[k] >= 0.5)], sevly=_SEVERITY_ADVERB[int(severity[k] >= 0.5)],
          zone=_pick(_ZONES, zone))
      if raw[k] < 0:  # uncertain: hedged
        text = _pick(_HEDGES, uk[1]).format(text=text)
      sentences.append(text)
      mentioned.append(name.lower() if raw[k] > 0 else f"possible {name.lower()}")
    elif uk[2] < 0.5:  # some absent findings are negated
      sentences.append(_pick(_NEGATIONS[name], uk[3]))
  rest = u[4 * len(findings):]
  n_distract = 1 + int(rest[0] * 3)
  sentences += [_DISTRACTORS[i] for i in np.argsort(rest[1:1 + len(_DISTRACTORS)])[:n_distract]]
  shuffle = rest[1 + len(_DISTRACTORS):1 + len(_DISTRACTORS) + len(sentences)]
  sentences = [sentences[i] for i in np.argsort(shuffle, kind="stable")]
  if mentioned and rest[-2] < 0.5:  # the impression names at most two of them
    named = [mentioned[i] for i in sorted(np.argsort(rest[-3 - len(mentioned):-3])[:2])]
    impression = " and ".join(named) + "."
  elif mentioned:
    impression = _pick(_ABNORMAL_IMPRESSIONS, rest[-1])
  else:
    impression = _pick(_NORMAL_IMPRESSIONS, rest[-1])
  body = " ".join(s[0].upper() + s[1:] for s in sentences)
  return f"FINDINGS: {body} IMPRESSION: {impression[0].upper() + impression[1:]}"


@functools.lru_cache(maxsize=None)
def chest_vocabulary(findings: tuple[str, ...]) -> Vocabulary:
  """Every token the chest writer can produce, in a fixed order: the procedural world's vocabulary."""
  texts = [s for name in findings for s in _FINDING_SENTENCES[name] + _NEGATIONS[name]]
  texts += list(_HEDGES) + list(_DISTRACTORS) + list(_NORMAL_IMPRESSIONS) + list(_ABNORMAL_IMPRESSIONS) + list(_SEVERITY) + list(_ZONES)
  texts += list(_SEVERITY_ADVERB)
  texts += ["left right possible and findings : impression :"] + [name.lower() for name in findings]
  return Vocabulary(sorted({t for text in texts for t in tokenize(re.sub(r"\{\w+\}", " ", text))}))
