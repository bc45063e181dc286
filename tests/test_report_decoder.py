"""Paper 003's report generator (models/report_decoder.py, objectives/report_generation.py): sentence blocks,
overfitting one batch, and resume on the shared loop."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from synth_med.data import reports
from synth_med.data.pipeline import ArraySource, TrainStream
from synth_med.data.sources import make_world
from synth_med.models import report_decoder as rd
from synth_med.objectives.report_generation import ReportTask
from synth_med.train.loop import train
from tests.conftest import assert_trees_equal, killed_and_resumed, loop_config


def sentence_blocks(tokens: np.ndarray, period: int, eos: int, sentences: int, words: int) -> np.ndarray:
  """The reference loop for `rd.blocks_from_tokens`: int32[N, sentences, words]: each report's sentences (<bos> and <eos> dropped; each sentence keeps its
  '.' as its last word), one per row, cut or 0-padded. A sentence without '.' (the last) ends at <eos>."""
  tokens = np.asarray(tokens)
  out = np.zeros((len(tokens), sentences, words), np.int32)
  for i, row in enumerate(tokens):
    s, w = 0, 0
    for t in row[1:]:
      if t == eos or t == 0 or s >= sentences:
        break
      if w < words:
        out[i, s, w] = t
      w += 1
      if t == period:
        s, w = s + 1, 0
  return out



def _chest(n, report_length=96):
  from configs import common
  c = common.data_config("chest", 16)
  c.report_length = report_length
  world = make_world(c)
  return world, world.examples(world.split("train").ids[:n])


def test_sentence_blocks_cut_reports_at_full_stops_in_numpy_and_in_jax():
  world, ex = _chest(64, report_length=40)  # some reports cut: the last sentence has no '.'
  v = world.report_vocabulary()
  period, eos = v.index["."], v.index[reports.EOS]
  for s, w in ((8, 16), (3, 5)):
    blocks = sentence_blocks(ex["report"], period, eos, s, w)
    np.testing.assert_array_equal(np.asarray(rd.blocks_from_tokens(jnp.asarray(ex["report"]), period, eos, s, w)),
                                  blocks)
  blocks = sentence_blocks(ex["report"], period, eos, 12, 40)
  for row, b in zip(ex["report"], blocks):  # nothing lost when the blocks are large enough
    body = [t for t in row[1:] if t not in (0, eos)]
    np.testing.assert_array_equal(rd.join_sentences(b), body)
    full = [sentence[sentence > 0] for sentence in b if (sentence > 0).any()]
    assert all(sentence[-1] == period for sentence in full[:-1])  # every sentence but the last ends at '.'


@pytest.mark.slow
def test_the_decoder_overfits_one_batch_and_writes_it_back():
  """Four reports, 400 Adam steps: the loss falls to about 0 and greedy decoding gives the reports back."""
  world, ex = _chest(4)
  v = world.report_vocabulary()
  blocks = jnp.asarray(sentence_blocks(ex["report"], v.index["."], v.index[reports.EOS], 8, 16))
  model = rd.Model(len(v), 8, 16, width=8, hidden=64, word_layers=3)
  images = jnp.asarray(ex["image"], jnp.float32) / 127.5 - 1.0
  params = model.init(jax.random.key(0), images, blocks)["params"]
  tx = optax.adam(3e-3)

  @jax.jit
  def steps(params, state):
    def body(_, carry):
      p, s = carry
      grads = jax.grad(lambda q: rd.loss(model, q, images, blocks)[0])(p)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s
    return jax.lax.fori_loop(0, 400, body, (params, state))
  first = float(rd.loss(model, params, images, blocks)[0])
  params, _ = steps(params, tx.init(params))
  last, metrics = rd.loss(model, params, images, blocks)
  assert first > 4.0 and float(last) < 0.1 and float(metrics["word_accuracy"]) == 1.0
  np.testing.assert_array_equal(np.asarray(rd.generate(model, params, images)), np.asarray(blocks))


def test_a_killed_report_generator_run_resumes_to_the_same_parameters(tmp_path):
  world, ex = _chest(32)
  v = world.report_vocabulary()
  task = ReportTask(rd.Model(len(v), 4, 8, width=8, hidden=32, word_layers=2), v.index["."], v.index[reports.EOS])
  keys = ("image", "report", "label", "label_mask", "labelled")
  stream = lambda: TrainStream(ArraySource({k: ex[k] for k in keys}), 8, seed=0, num_threads=0)  # noqa: E731
  cfg = loop_config(steps=10, batch=8, lr=0.05)
  full = train(task, cfg, stream(), str(tmp_path / "full"))
  resumed = killed_and_resumed(task, cfg, stream, str(tmp_path / "killed"), kill_at=6)
  assert resumed.start_step == 4
  assert_trees_equal(full.state.params, resumed.state.params)
  assert full.state.step == 10
