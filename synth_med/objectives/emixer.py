"""Paper 003's EMIXER as one task on the shared loop: parameters {generator, decoder, d_image, d_report,
d_joint}; the generator and the report decoder F train with `train.optimizer`, the three discriminators
with `train.critic_optimizer` (003: Adam, G 5e-5, D 2e-4, D:G steps 2:1 through the generator optimizer's
`every_k_steps: 2`).

One step, from the same parameters (each player's gradient from its own loss, as in `objectives.gan`):
  L_D = Σ_{image, report, joint} [softplus(−D(real)) + softplus(D(sg(fake)))]
        + the rotation cross-entropy of D_image on rotated real images (self-supervision, labelled or not)
        + (our addition) softplus(D_joint(real image, another real image's report)) / 2: mismatched pairs
          count as fake, so D_joint judges whether a report belongs to its image (Reed et al. 2016);
  L_G = Σ softplus(−D(fake)) with D held fixed + α × the rotation cross-entropy of rotated generated images
        (003's value function) + F's teacher-forced loss on the real pairs (F also learns from the
        discriminators through its soft reports, `report_decoder.soft_generate`).
fake = (G(z, y), F(G(z, y))) with y the batch's labels; an unlabelled image (003's semi-supervised
setting) has y = 0 and no projection term in D_image.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from synth_med.models import emixer, report_decoder


class EmixerTask:
  param_groups = {"generator": "optimizer", "decoder": "optimizer", "d_image": "critic_optimizer",
                  "d_report": "critic_optimizer", "d_joint": "critic_optimizer"}

  def __init__(self, model: emixer.Model, period: int, eos: int, rotation_weight: float = 1.0,
               mismatch_weight: float = 0.5, temperature: float = 1.0):
    self.model, self.period, self.eos = model, int(period), int(eos)
    self.rotation_weight, self.mismatch_weight, self.temperature = (float(rotation_weight), float(mismatch_weight),
                                                                    float(temperature))

  @property
  def cache_key(self) -> tuple:
    return ("EmixerTask", repr(self.model), self.period, self.eos, self.rotation_weight, self.mismatch_weight,
            self.temperature)

  def _inputs(self, batch: Mapping[str, jax.Array]):
    m = self.model
    x = batch["image"].astype(jnp.float32) / 127.5 - 1.0
    y = (batch["label"] * batch["label_mask"]).astype(jnp.float32)
    labelled = batch["labelled"].astype(jnp.float32)
    blocks = report_decoder.blocks_from_tokens(batch["report"], self.period, self.eos, m.decoder.sentences,
                                               m.decoder.words)
    words = jax.nn.one_hot(blocks.reshape(blocks.shape[0], -1), m.vocab_size, dtype=jnp.float32)
    return x, y * labelled[:, None], labelled, blocks, words

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> Any:
    m = self.model
    x, y, labelled, blocks, words = self._inputs(batch)
    x, y, labelled, blocks, words = x[:1], y[:1], labelled[:1], blocks[:1], words[:1]
    keys = jax.random.split(rng, 5)
    z = jnp.zeros((1, m.z_dim), jnp.float32)
    return {"generator": m.generator.init(keys[0], z, y)["params"],
            "decoder": m.decoder.init(keys[1], x, blocks)["params"],
            "d_image": m.d_image.init(keys[2], x, y, labelled)["params"],
            "d_report": m.d_report.init(keys[3], words)["params"],
            "d_joint": m.d_joint.init(keys[4], x, words)["params"]}

  def generate(self, params: Any, z: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(images in [-1, 1], greedy report word blocks [B, sentences, words]) for noise z and labels y."""
    images = self.model.generator.apply({"params": params["generator"]}, z, y)
    return images, report_decoder.generate(self.model.decoder, params["decoder"], images)

  def loss(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
    m = self.model
    x, y, labelled, blocks, words = self._inputs(batch)
    b = x.shape[0]
    z_rng, r_rng, f_rng = jax.random.split(rng, 3)
    z = jax.random.normal(z_rng, (b, m.z_dim))
    fake = m.generator.apply({"params": params["generator"]}, z, y)
    fake_words = report_decoder.soft_generate(m.decoder, params["decoder"], fake, self.temperature)
    sg = jax.lax.stop_gradient

    def d_image(p, images):
      return m.d_image.apply({"params": p}, images, y, labelled)

    def rotation_ce(p, images, key):
      k = jax.random.randint(key, (), 0, emixer.ROTATIONS)
      rotated = jax.lax.switch(k, [lambda a, r=r: emixer.rotate(a, r) for r in range(emixer.ROTATIONS)], images)
      _, logits = d_image(p, rotated)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.full((b,), k)))

    d_report = lambda p, w: m.d_report.apply({"params": p}, w)  # noqa: E731
    d_joint = lambda p, i, w: m.d_joint.apply({"params": p}, i, w)  # noqa: E731
    sp = jax.nn.softplus
    # discriminators
    real_i, _ = d_image(params["d_image"], x)
    fake_i, _ = d_image(params["d_image"], sg(fake))
    l_image = jnp.mean(sp(-real_i)) + jnp.mean(sp(fake_i))
    l_rot_d = rotation_ce(params["d_image"], x, r_rng)
    l_report = jnp.mean(sp(-d_report(params["d_report"], words))) + jnp.mean(sp(d_report(params["d_report"], sg(fake_words))))
    shuffled = jnp.roll(words, 1, axis=0)  # every image with another image's report
    l_joint = (jnp.mean(sp(-d_joint(params["d_joint"], x, words))) + jnp.mean(sp(d_joint(params["d_joint"], sg(fake), sg(fake_words))))
               + self.mismatch_weight * jnp.mean(sp(d_joint(params["d_joint"], x, shuffled))))
    l_d = l_image + self.rotation_weight * l_rot_d + l_report + l_joint
    # generator and decoder (discriminators held fixed)
    g_image, _ = d_image(sg(params["d_image"]), fake)
    l_g = (jnp.mean(sp(-g_image)) + jnp.mean(sp(-d_report(sg(params["d_report"]), fake_words)))
           + jnp.mean(sp(-d_joint(sg(params["d_joint"]), fake, fake_words)))
           + self.rotation_weight * rotation_ce(sg(params["d_image"]), fake, f_rng))
    l_f, f_metrics = report_decoder.loss(m.decoder, params["decoder"], x, blocks)
    metrics = {"d_image": l_image, "d_report": l_report, "d_joint": l_joint, "rotation": l_rot_d,
               "generator": l_g, "decoder": l_f, "decoder_accuracy": f_metrics["word_accuracy"]}
    return l_d + l_g + l_f, metrics
