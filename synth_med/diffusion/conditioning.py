"""The conditioning vector: a label part and one part per sensitive property.

Each part is a fixed-width block of the vector and can be *null* (all zeros) on
its own, as in 002 ("a missing part gets zeros"):

- label, softmax worlds (skin, K classes): the (soft) label, K wide;
- label, multi-label worlds (chest, K findings): a (negative, positive) one-hot
  pair per finding, 2K wide, so "no finding" differs from "no label"; an
  uncertain finding (label_mask 0) gives a zero pair;
- label, binary worlds (tissue): a (negative, positive) one-hot, 2 wide;
- each property (sex, age bucket, skin tone, hospital): a one-hot over its
  values; unknown (-1) gives zeros.

The label part is null for unlabelled examples (`labelled` False), so an
unlabelled tissue patch still carries its hospital. For classifier-free
guidance every part is also dropped independently with `drop_prob` during
training (paper 000 drops with 0.1), and the unconditional model is the
all-null vector.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from synth_med.data.schema import DatasetSpec
from synth_med.errors import SynthMedError


@dataclasses.dataclass(frozen=True)
class ConditioningSpec:
  """Which parts the condition has and how wide each is."""
  label_kind: str  # softmax | multilabel | binary
  num_classes: int  # 0: no label part
  attributes: tuple[tuple[str, int], ...] = ()  # (name, number of values)

  @property
  def label_width(self) -> int:
    if self.num_classes == 0:
      return 0
    return self.num_classes if self.label_kind == "softmax" else 2 * self.num_classes

  @property
  def part_widths(self) -> tuple[int, ...]:
    return ((self.label_width,) if self.label_width else ()) + tuple(n for _, n in self.attributes)

  @property
  def dim(self) -> int:
    return int(sum(self.part_widths))

  @property
  def part_names(self) -> tuple[str, ...]:
    return (("label",) if self.label_width else ()) + tuple(a for a, _ in self.attributes)

  def parts(self, batch: Mapping[str, jax.Array]) -> list[jax.Array]:
    """The parts (float32 [B, width_i]) of a batch in the example schema."""
    out = []
    if self.label_width:
      label = jnp.asarray(batch["label"], jnp.float32)
      present = jnp.asarray(batch["labelled"], jnp.float32)[:, None]
      if self.label_kind == "softmax":
        part = label
      else:
        mask = jnp.asarray(batch.get("label_mask", jnp.ones_like(label)), jnp.float32)
        part = jnp.stack([(1.0 - label) * mask, label * mask], axis=-1).reshape(label.shape[0], -1)
      out.append(part * present)
    for name, n in self.attributes:
      out.append(jax.nn.one_hot(jnp.asarray(batch[f"attrs/{name}"], jnp.int32), n, dtype=jnp.float32))
    return out

  def encode(self, batch: Mapping[str, jax.Array], rng: jax.Array | None = None,
             drop_prob: float = 0.0) -> jax.Array:
    """The condition vector [B, dim]; with `rng`, each part is nulled with `drop_prob`."""
    parts = self.parts(batch)
    if not parts:
      return jnp.zeros((_batch_size(batch), 0), jnp.float32)
    if rng is not None and drop_prob > 0:
      keep = jax.random.bernoulli(rng, 1.0 - drop_prob, (parts[0].shape[0], len(parts)))
      parts = [p * keep[:, i:i + 1] for i, p in enumerate(parts)]
    return jnp.concatenate(parts, axis=-1)


def _batch_size(batch: Mapping[str, jax.Array]) -> int:
  return int(next(iter(batch.values())).shape[0])


def make_spec(spec: DatasetSpec, label: bool, attributes: Sequence[str]) -> ConditioningSpec:
  """The conditioning of a world: the label part if `label`, plus the named properties."""
  known = [a.name for a in spec.attributes]
  bad = [a for a in attributes if a not in known]
  if bad:
    raise SynthMedError(f"diffusion.condition.attributes has {bad}, which the {spec.name} data lack; "
                        f"choose from {known}.")
  return ConditioningSpec(spec.label_kind, spec.num_classes if label else 0,
                          tuple((a, len(spec.attribute(a).values)) for a in attributes))


def condition_table(spec: ConditioningSpec, n: int, labels: np.ndarray | None = None,
                    attrs: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """A batch of `n` conditions in the example schema (labels [n, K] float; attrs [n] int).

  Missing labels make the label part null; missing properties are unknown (-1).
  """
  k = max(spec.num_classes, 1)
  out: dict[str, np.ndarray] = {
      "label": np.zeros((n, k), np.float32) if labels is None else np.asarray(labels, np.float32),
      "labelled": np.full(n, labels is not None),
  }
  out["label_mask"] = np.ones_like(out["label"])
  for name, _ in spec.attributes:
    v = None if attrs is None else attrs.get(name)
    out[f"attrs/{name}"] = np.full(n, -1, np.int32) if v is None else np.asarray(v, np.int32)
  return out
