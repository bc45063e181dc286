"""Paper 003's report generator F(image) as a task on the shared loop: teacher-forced word cross-entropy
and stop BCE (`models.report_decoder.loss`) on batches with 'image' (uint8) and 'report' (token ids);
a batch 'weight' (e.g. real against synthetic pairs) weighs each report."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from synth_med.models import report_decoder


class ReportTask:
  """init/loss for the loop (synth_med.train.loop.Task) of a `report_decoder.Model`."""

  def __init__(self, model: report_decoder.Model, period: int, eos: int):
    self.model, self.period, self.eos = model, int(period), int(eos)

  @property
  def cache_key(self) -> tuple:
    return ("ReportTask", repr(self.model), self.period, self.eos)

  def images(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    return batch["image"].astype(jnp.float32) / 127.5 - 1.0

  def blocks(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    return report_decoder.blocks_from_tokens(batch["report"], self.period, self.eos, self.model.sentences,
                                             self.model.words)

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> Any:
    return self.model.init(rng, self.images(batch)[:1], self.blocks(batch)[:1])["params"]

  def loss(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
    del rng
    return report_decoder.loss(self.model, params, self.images(batch), self.blocks(batch), batch.get("weight"))

  def generate(self, params: Any, images: jax.Array) -> jax.Array:
    """Greedy word blocks [B, sentences, words] for uint8 images."""
    return report_decoder.generate(self.model, params, images.astype(jnp.float32) / 127.5 - 1.0)
