"""Paper 003's report generator F(image) (EMIXER §3; the hierarchical decoder of Jing et al. 2018):

  image features -> a sentence LSTM that, per sentence, emits a topic vector and a stop probability
                 -> a word LSTM (3 layers in 003) that writes each sentence from its topic.

Reports are token ids (`data.reports`); `blocks_from_tokens` cuts them into [sentences, words] at the
'.' token. Training is teacher-forced (`loss`: word cross-entropy over the real words + the stop flags' BCE);
`generate` decodes greedily. The image encoder is a small strided CNN (the cascade's resolutions on CPU).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax



def blocks_from_tokens(tokens: jax.Array, period: int, eos: int, sentences: int, words: int) -> jax.Array:
  """int32[B, L] report ids -> [B, sentences, words]: each report's sentences (<bos> and <eos> dropped; each
  sentence keeps its '.' as its last word), one per row, cut or 0-padded. A sentence without '.' (the last)
  ends at <eos>. Runs inside a jitted step."""
  body = tokens[:, 1:]
  length = body.shape[1]
  valid = jnp.cumsum((body == eos) | (body == 0), axis=1) == 0
  is_period = (body == period) & valid
  sentence = jnp.cumsum(is_period, axis=1) - is_period  # a '.' belongs to the sentence it ends
  index = jnp.arange(length)[None, :]
  after_period = jnp.concatenate([jnp.ones_like(is_period[:, :1]), is_period[:, :-1]], axis=1)
  start = jax.lax.cummax(jnp.where(after_period, index, 0), axis=1)
  position = index - start
  keep = valid & (sentence < sentences) & (position < words)
  flat = jnp.where(keep, sentence * words + position, sentences * words)  # out of range: dropped
  out = jnp.zeros((tokens.shape[0], sentences * words + 1), tokens.dtype)
  out = jax.vmap(lambda o, f, t: o.at[f].set(t))(out, flat, jnp.where(keep, body, 0))
  return out[:, :-1].reshape(tokens.shape[0], sentences, words)


def join_sentences(blocks: np.ndarray) -> np.ndarray:
  """The inverse of `blocks_from_tokens` for one report [sentences, words] -> its word ids in order."""
  return np.asarray([t for sentence in np.asarray(blocks) for t in sentence if t != 0], np.int32)


class _Encoder(nn.Module):
  width: int

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = images
    for k in range(3):
      x = nn.relu(nn.Conv(self.width * 2 ** k, (3, 3), strides=(2, 2), name=f"conv{k}")(x))
    return nn.Dense(self.width * 4, name="proj")(x.mean((1, 2)))


class Model(nn.Module):
  """F(image) -> per-sentence stop logits [B, S] and word logits [B, S, W, V] (teacher-forced)."""
  vocab_size: int
  sentences: int = 8
  words: int = 16
  width: int = 32
  hidden: int = 128
  word_layers: int = 3

  def setup(self):
    self.encoder = _Encoder(self.width)
    self.sentence_cell = nn.LSTMCell(self.hidden, name="sentence_lstm")
    self.topic = nn.Dense(self.hidden, name="topic")
    self.stop = nn.Dense(1, name="stop")
    self.embed = nn.Embed(self.vocab_size, self.hidden, name="embed")
    self.word_rnns = [nn.RNN(nn.LSTMCell(self.hidden), name=f"word_lstm{k}") for k in range(self.word_layers)]
    self.out = nn.Dense(self.vocab_size, name="out")

  def topics(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(topic vectors [B, S, H], stop logits [B, S]) from the sentence LSTM run S steps on the image."""
    v = self.encoder(images)
    carry = self.sentence_cell.initialize_carry(jax.random.key(0), v.shape)
    topics, stops = [], []
    for _ in range(self.sentences):
      carry, h = self.sentence_cell(carry, v)
      topics.append(jnp.tanh(self.topic(h)))
      stops.append(self.stop(h)[..., 0])
    return jnp.stack(topics, 1), jnp.stack(stops, 1)

  def __call__(self, images: jax.Array, blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
    topics, stops = self.topics(images)
    b, s, w = blocks.shape
    t = topics.reshape(b * s, -1)
    words = blocks.reshape(b * s, w)
    # the topic is the first input (the first word is predicted from it alone), then the previous words
    x = jnp.concatenate([t[:, None, :], self.embed(words[:, :-1])], 1)
    for rnn in self.word_rnns:  # every layer starts from the sentence's topic
      x = rnn(x, initial_carry=(t, t))
    return stops, self.out(x).reshape(b, s, w, -1)


def _free_run(model: Model, params: Any, images: jax.Array, feed: Any) -> tuple[jax.Array, jax.Array]:
  """Runs the word LSTM free for `model.words` steps per sentence: `feed(logits) -> (next input embedding,
  emitted)`. Returns (the emitted values [B, S, W, ...], stop logits [B, S])."""
  topics, stops = model.apply({"params": params}, images, method=Model.topics)
  b, s, h = topics.shape
  t = topics.reshape(b * s, h)
  cell = nn.LSTMCell(model.hidden)
  dense = nn.Dense(model.vocab_size)

  def step(carries, x):
    new = []
    for k in range(model.word_layers):
      carry, x = cell.apply({"params": params[f"word_lstm{k}"]["cell"]}, carries[k], x)
      new.append(carry)
    logits = dense.apply({"params": params["out"]}, x)
    nxt, emitted = feed(logits)
    return tuple(new), (nxt, emitted)

  carries = tuple((t, t) for _ in range(model.word_layers))
  carries, (x, first) = step(carries, t)

  def body(carry, _):
    carries, x = carry
    carries, (x, emitted) = step(carries, x)
    return (carries, x), emitted
  _, rest = jax.lax.scan(body, (carries, x), None, length=model.words - 1)
  emitted = jnp.concatenate([first[None], rest], 0)  # [W, B*S, ...]
  emitted = jnp.moveaxis(emitted, 0, 1)
  return emitted.reshape((b, s, model.words) + emitted.shape[2:]), stops


def loss(model: Model, params: Any, images: jax.Array, blocks: jax.Array, weight: jax.Array | None = None
         ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean word cross-entropy over the real words and each sentence's end (the 0 after its last word) + the
  stop flags' BCE (a sentence exists: 0, else 1 at the first missing one), per report weighted by `weight`."""
  stops, logits = model.apply({"params": params}, images, blocks)
  words = jnp.sum(blocks > 0, -1)  # [B, S]
  exists = (words > 0).astype(jnp.float32)
  # the real words, and the 0 after a sentence's last word (so decoding learns where a sentence ends)
  position = jnp.arange(blocks.shape[-1])[None, None, :]
  word_mask = ((blocks > 0) | ((position == words[..., None]) & (words[..., None] > 0))).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, blocks)
  w = jnp.ones(blocks.shape[0]) if weight is None else weight
  word_loss = jnp.sum(ce * word_mask * w[:, None, None]) / jnp.maximum(jnp.sum(word_mask * w[:, None, None]), 1.0)
  # stop after the last sentence: 0 while sentences exist, 1 at the first that does not; later ones unscored
  scored = jnp.concatenate([jnp.ones_like(exists[:, :1]), exists[:, :-1]], 1)
  stop_loss = jnp.sum(optax.sigmoid_binary_cross_entropy(stops, 1.0 - exists) * scored * w[:, None]) / jnp.maximum(
      jnp.sum(scored * w[:, None]), 1.0)
  accuracy = jnp.sum((jnp.argmax(logits, -1) == blocks) * word_mask) / jnp.maximum(jnp.sum(word_mask), 1.0)
  return word_loss + stop_loss, {"word_loss": word_loss, "stop_loss": stop_loss, "word_accuracy": accuracy}


def generate(model: Model, params: Any, images: jax.Array) -> jax.Array:
  """Greedy reports: word blocks [B, S, W]; a sentence ends at its first 0 (or after W words), and the
  sentences from the first whose stop probability exceeds 1/2 on are 0."""
  embedding = params["embed"]["embedding"]

  def feed(logits):
    token = jnp.argmax(logits, -1)
    return embedding[token], token
  blocks, stops = _free_run(model, params, images, feed)
  ended = jnp.cumsum((blocks == 0).astype(jnp.int32), -1) > 0
  blocks = jnp.where(ended, 0, blocks)
  stopped = jnp.cumsum((jax.nn.sigmoid(stops) > 0.5).astype(jnp.int32), -1) > 0
  return jnp.where(stopped[..., None], 0, blocks)


def soft_generate(model: Model, params: Any, images: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Free-running reports as word distributions [B, sentences * words, V], differentiable in the image and
  the parameters: each word is the softmax of its logits / temperature, fed back as its expected
  embedding; a sentence's words are scaled by the probability that no earlier stop fired, the rest of
  the mass going to <pad> (id 0), as a real report's padding."""
  embedding = params["embed"]["embedding"]

  def feed(logits):
    probs = jax.nn.softmax(logits / temperature, -1)
    return probs @ embedding, probs
  words, stops = _free_run(model, params, images, feed)
  b, s = stops.shape
  go_on = jnp.cumprod(1.0 - jax.nn.sigmoid(stops), axis=1)
  alive = jnp.concatenate([jnp.ones_like(go_on[:, :1]), go_on[:, :-1]], axis=1)[..., None, None]
  pad = jax.nn.one_hot(0, words.shape[-1], dtype=words.dtype)
  return (alive * words + (1.0 - alive) * pad).reshape(b, s * model.words, -1)


def load(path: str) -> Any:
  """Parameters saved by `save` (an .npz of the flattened tree)."""
  from flax import traverse_util
  with np.load(path) as z:
    return traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(z[k]) for k in z.files})


__all__ = ["Model", "blocks_from_tokens", "generate", "join_sentences", "load", "loss", "soft_generate"]
