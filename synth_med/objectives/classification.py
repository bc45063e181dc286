"""Classification losses and the classifier task for the shared training loop.

- softmax heads: cross-entropy against one-hot or soft labels (derm raters);
- multilabel heads: sigmoid BCE per finding, masked where the label is
  uncertain/unknown (`label_mask`);
- binary heads: sigmoid BCE on one logit;
- focal loss (Lin et al. 2017) for any head, with `gamma`.
Per-example weights (`batch['weight']`, default 1: w1 for real and w2 for
synthetic examples, 002 Eq. 8) multiply the per-example losses, and the sum is
divided by the number of labelled examples in the batch, not by the sum of the
weights: with slots drawn real w.p. α this is an unbiased estimate of Eq. 8.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from synth_med.data.augment import AugmentFn
from synth_med.errors import SynthMedError

LOSSES = ("ce", "focal")


def softmax_loss(logits: jax.Array, labels: jax.Array, gamma: float = 0.0) -> jax.Array:
  """Per-example soft-label CE; gamma > 0 gives the focal form."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  if gamma > 0:
    logp = logp * (1.0 - jnp.exp(logp)) ** gamma
  labels = labels / jnp.maximum(labels.sum(-1, keepdims=True), 1e-12)
  return -jnp.sum(labels * logp, axis=-1)


def sigmoid_terms(logits: jax.Array, labels: jax.Array, gamma: float = 0.0) -> jax.Array:
  """Each output's BCE [B, L]; gamma > 0 gives the focal form."""
  bce = optax.sigmoid_binary_cross_entropy(logits, labels)
  if gamma > 0:
    p = jax.nn.sigmoid(logits)
    pt = labels * p + (1.0 - labels) * (1.0 - p)
    bce = bce * (1.0 - pt) ** gamma
  return bce


def sigmoid_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array, gamma: float = 0.0) -> jax.Array:
  """Per-example BCE summed over the unmasked outputs, divided by their count."""
  bce = sigmoid_terms(logits, labels, gamma)
  return jnp.sum(bce * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def probabilities(logits: jax.Array, label_kind: str) -> jax.Array:
  """Class probabilities: softmax for 'softmax' heads, sigmoid otherwise."""
  if label_kind == "softmax":
    return jax.nn.softmax(logits, axis=-1)
  return jax.nn.sigmoid(logits)


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float [0, 1]."""
  return images.astype(jnp.float32) / 255.0


class ClassifierTask:
  """A classifier (any Flax model returning (logits, features)) as a loop `Task`."""

  def __init__(self, model: Any, label_kind: str, loss: str = "ce", focal_gamma: float = 2.0,
               augment: AugmentFn | None = None, pretrained_npz: str = "", load_fn: Any = None):
    if loss not in LOSSES:
      raise SynthMedError(f"loss.name={loss!r}; choose one of {list(LOSSES)}.")
    self.model, self.label_kind = model, label_kind
    self.gamma = float(focal_gamma) if loss == "focal" else 0.0
    self.augment = augment
    self.pretrained_npz, self.load_fn = pretrained_npz, load_fn

  @property
  def cache_key(self) -> tuple | None:
    """What the jitted step reads (model, head, loss, augmentation); None if the augmentation is unnamed.

    Equal keys share one jitted train step and predict fn (`train.jit_cache`); the
    pretrained weights are loaded outside jit and are not part of it.
    """
    aug = None if self.augment is None else getattr(self.augment, "cache_name", None)
    if self.augment is not None and aug is None:
      return None
    return ("ClassifierTask", repr(self.model), self.label_kind, self.gamma, aug)

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> Any:
    return self.model.init(rng, preprocess(batch["image"][:1]) * 2.0 - 1.0)["params"]

  def load_pretrained(self, params: Any) -> Any | None:
    if not self.pretrained_npz:
      return None
    return self.load_fn(params, self.pretrained_npz)

  def logits(self, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(logits, features) for uint8 images."""
    x = preprocess(images) * 2.0 - 1.0
    return self.model.apply({"params": params}, x)

  def per_example_loss(self, logits: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
    labels = batch["label"].astype(jnp.float32)
    mask = batch["label_mask"].astype(jnp.float32)
    if self.label_kind == "softmax":
      return softmax_loss(logits, labels, self.gamma)
    return sigmoid_loss(logits, labels, mask, self.gamma)

  def loss(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
    images = preprocess(batch["image"])
    if self.augment is not None:
      images = self.augment(images, rng)
    logits, _ = self.model.apply({"params": params}, images * 2.0 - 1.0, train=True)
    per_ex = self.per_example_loss(logits, batch)
    labelled = batch["labelled"].astype(jnp.float32)
    w = batch.get("weight", jnp.ones(per_ex.shape, jnp.float32)) * labelled
    loss = jnp.sum(per_ex * w) / jnp.maximum(jnp.sum(labelled), 1.0)
    metrics = {}
    if self.label_kind == "softmax":
      target = jnp.argmax(batch["label"], axis=-1)
      metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == target)
    if "synthetic" in batch:
      metrics["synthetic_fraction"] = jnp.mean(batch["synthetic"].astype(jnp.float32))
    return loss, metrics
