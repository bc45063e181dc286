"""A classifier trained jointly with a network that weights its synthetic examples, as one task on the
shared loop: paper 004's IDS (Wang et al., information-bottleneck re-weighting; `objectives.ids`) or its
baseline MW-Net (`objectives.meta_weight`).

Parameters {'classifier': Θ, 'weighting': θ}, each with its own optimizer (`param_groups`: the classifier's
`train.optimizer`, the weighting network's `train.weighting_optimizer`). One step updates both from the same
parameters (004's alternating updates, applied together):
  θ  on the weighting objective (IDS: the VIB of the batch's synthetic examples; MW-Net: the real examples'
     loss after a virtual head step), with the classifier held fixed;
  Θ  on the classifier loss with the weights held fixed (stop-gradient): real examples weigh 1 (or g with
     `reweight_real`, 004's option), synthetic example j weighs g_j (× the mix's fixed w2), and the sum is
     divided by the batch's labelled examples as in `classification.ClassifierTask`.
Weights: one per example for softmax and binary heads; one per finding for multi-label heads (004 §3),
each multiplying that finding's BCE term.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from synth_med.errors import SynthMedError
from synth_med.objectives import ids as ids_lib
from synth_med.objectives import meta_weight
from synth_med.objectives.classification import ClassifierTask, preprocess, sigmoid_terms, softmax_loss

METHODS = ("ids", "mwnet")
WEIGHT_INPUTS = ("features", "image")


class WeightNet(nn.Module):
  """g_θ: the classifier's features (held fixed) or the pooled image, with the label the image was made
  for -> weights [B, L] in [0, 1]. 004's g_θ sees the image alone; without the label it cannot tell an
  image that renders its condition from a good image of another class (our addition)."""
  num_slots: int
  hidden: int = 64

  @nn.compact
  def __call__(self, v: jax.Array) -> jax.Array:
    h = nn.relu(nn.Dense(self.hidden, name="hidden")(v))
    return jax.nn.sigmoid(nn.Dense(self.num_slots, name="out")(h))


def slot_targets(batch: Mapping[str, jax.Array], label_kind: str) -> tuple[jax.Array, jax.Array, int]:
  """(class index per (example, slot) [B, L], labelled mask [B, L], classes per slot): one slot with the
  argmax class for softmax heads; for sigmoid heads one slot per output with classes {0, 1}."""
  labelled = batch["labelled"].astype(jnp.float32)[:, None]
  if label_kind == "softmax":
    return jnp.argmax(batch["label"], -1)[:, None], labelled, batch["label"].shape[-1]
  return (batch["label"] > 0.5).astype(jnp.int32), batch["label_mask"].astype(jnp.float32) * labelled, 2


def slot_losses(logits: jax.Array, batch: Mapping[str, jax.Array], label_kind: str, gamma: float) -> jax.Array:
  """Per (example, slot) losses [B, L]: the softmax CE as one slot, or each output's BCE."""
  if label_kind == "softmax":
    return softmax_loss(logits, batch["label"].astype(jnp.float32), gamma)[:, None]
  return sigmoid_terms(logits, batch["label"].astype(jnp.float32), gamma)


class LearntWeightsTask:
  """`classifier` (a ClassifierTask) trained on learnt weights of its synthetic examples (module docstring)."""
  param_groups = {"classifier": "optimizer", "weighting": "weighting_optimizer"}
  needs_step = True

  def __init__(self, classifier: ClassifierTask, num_classes: int, method: str = "ids", weight_input: str = "features",
               hidden: int = 64, epoch_steps: int = 1, temperature: float = 0.1, input_size: int = 8,
               reweight_real: bool = False, virtual_lr: float = 1.0, weighted_vib: bool = True,
               entropy: float = 0.1):
    if method not in METHODS:
      raise SynthMedError(f"reweight.method={method!r}; choose one of {list(METHODS)}.")
    if weight_input not in WEIGHT_INPUTS:
      raise SynthMedError(f"reweight.input={weight_input!r}; choose one of {list(WEIGHT_INPUTS)}.")
    self.classifier, self.method, self.weight_input = classifier, method, weight_input
    self.label_kind = classifier.label_kind
    self.num_slots = 1 if self.label_kind in ("softmax", "binary") else int(num_classes)
    self.slot_classes = int(num_classes) if self.label_kind == "softmax" else 2
    self.hidden, self.input_size = int(hidden), int(input_size)
    self.reweight_real, self.virtual_lr = bool(reweight_real), float(virtual_lr)
    self.ids = ids_lib.IDSWeighting(self.num_slots, self.slot_classes, epoch_steps, temperature, input_size, weighted_vib,
                                    entropy)
    self.net = WeightNet(self.num_slots, self.hidden) if method == "ids" else meta_weight.LossToWeight()

  @property
  def cache_key(self) -> tuple | None:
    base = self.classifier.cache_key
    return None if base is None else ("LearntWeightsTask", base, self.method, self.weight_input, self.num_slots,
                                      self.slot_classes, self.hidden, self.input_size, self.reweight_real,
                                      self.virtual_lr, self.ids.epoch_steps, self.ids.temperature, self.ids.weighted,
                                      self.ids.entropy)

  # -- what the rest of the project reads from a classifier task ----------------------------------------
  def logits(self, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(logits, features) of the classifier part, for uint8 images."""
    return self.classifier.logits(params["classifier"], images)

  def load_pretrained(self, params: Any) -> Any | None:
    loaded = self.classifier.load_pretrained(params["classifier"])
    return None if loaded is None else {**params, "classifier": loaded}

  # -- the loop's Task -----------------------------------------------------------------------------------
  def _weight_net_input(self, images: jax.Array, features: jax.Array, labels: jax.Array) -> jax.Array:
    """[image or features, the requested label (one-hot, or multi-hot with unknown findings 0)]."""
    v = (ids_lib.pooled_inputs(images, self.input_size) * 2.0 - 1.0 if self.weight_input == "image"
         else ids_lib.unit_vectors(jax.lax.stop_gradient(features)))
    return jnp.concatenate([v, labels.astype(jnp.float32)], -1)

  def _labels(self, batch: Mapping[str, Any]) -> jax.Array:
    if self.label_kind == "softmax":
      return batch["label"]
    return batch["label"] * batch["label_mask"]

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> Any:
    c_rng, w_rng = jax.random.split(rng)
    classifier = self.classifier.init(c_rng, batch)
    if self.method == "mwnet":
      weighting = self.net.init(w_rng, jnp.zeros((1, self.num_slots), jnp.float32))["params"]
    else:
      _, features = jax.eval_shape(self.classifier.logits, classifier, batch["image"][:1])
      images = preprocess(batch["image"][:1])
      v = self._weight_net_input(images, jnp.zeros(features.shape, jnp.float32), self._labels(batch)[:1])
      weighting = self.net.init(w_rng, v)["params"]
    return {"classifier": classifier, "weighting": weighting}

  def init_statistics(self, batch: Mapping[str, jax.Array]) -> Any:
    if self.method != "ids":
      return {}
    params = jax.eval_shape(self.classifier.init, jax.random.key(0), batch)
    _, features = jax.eval_shape(self.classifier.logits, params, batch["image"][:1])
    input_dim = ids_lib.pooled_inputs(jnp.zeros((1,) + batch["image"].shape[1:], jnp.float32),
                                      self.input_size).shape[-1]
    return self.ids.init_statistics(input_dim, features.shape[-1])

  def weights(self, params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """The learnt weights [B, L] of a batch of examples (uint8 'image', 'label', 'label_mask'): IDS's
    g_θ(x̂, ŷ), or MW-Net's V of the classifier's loss on each."""
    logits, features = self.logits(params, batch["image"])
    if self.method == "mwnet":
      losses = slot_losses(logits, batch, self.label_kind, self.classifier.gamma)
      return self.net.apply({"params": params["weighting"]}, losses)
    return self.net.apply({"params": params["weighting"]},
                          self._weight_net_input(preprocess(batch["image"]), features, self._labels(batch)))

  def loss(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
    clf = self.classifier
    images = preprocess(batch["image"])
    augmented = clf.augment(images, rng) if clf.augment is not None else images
    logits, features = clf.model.apply({"params": params["classifier"]}, augmented * 2.0 - 1.0, train=True)
    targets, mask, _ = slot_targets(batch, self.label_kind)
    synthetic = batch.get("synthetic", jnp.zeros(mask.shape[:1], bool))
    syn = synthetic.astype(jnp.float32)[:, None]
    losses = slot_losses(logits, batch, self.label_kind, clf.gamma)
    metrics: dict[str, Any] = {}
    if self.method == "ids":
      g = self.net.apply({"params": params["weighting"]}, self._weight_net_input(images, features, self._labels(batch)))
      real_w = g if self.reweight_real else jnp.ones_like(g)
      w_loss, w_metrics, stats = self.ids.loss(g, images, features, targets, mask, synthetic, batch["statistics"],
                                               batch["step"], real_w)
      metrics["statistics"] = stats
    else:
      head = params["classifier"]["head"]

      def head_losses(h, f):
        return slot_losses(f @ h["kernel"] + h["bias"], batch, self.label_kind, clf.gamma)
      w_loss, g = meta_weight.meta_loss(self.net, params["weighting"], head, features, head_losses, mask, synthetic,
                                        self.virtual_lr)
      real_w, w_metrics = jnp.ones_like(g), {"meta_loss": w_loss}
      metrics["statistics"] = batch["statistics"]  # none
    weight = jax.lax.stop_gradient(syn * g + (1.0 - syn) * real_w)  # [B, L]
    per_example = jnp.sum(losses * mask * weight, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
    fixed = batch.get("weight", jnp.ones(per_example.shape, jnp.float32))
    labelled = batch["labelled"].astype(jnp.float32)
    clf_loss = jnp.sum(per_example * fixed * labelled) / jnp.maximum(jnp.sum(labelled), 1.0)
    syn_pairs = syn * mask
    metrics.update(w_metrics, classifier_loss=clf_loss,
                   synthetic_weight=jnp.sum(g * syn_pairs) / jnp.maximum(jnp.sum(syn_pairs), 1.0))
    if self.label_kind == "softmax":
      metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == targets[:, 0])
    return clf_loss + w_loss, metrics
