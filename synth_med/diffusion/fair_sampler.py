"""Fair sampling (002 §3.1 step 2): the conditions for which synthetic images are generated.

- The label part keeps the label prevalence of the labelled training data:
  labels are the training examples' own label vectors (soft, one-hot or
  multi-hot), each drawn floor(n / N) or ceil(n / N) times, so class
  prevalence (and, for chest, the co-occurrence of findings) matches training
  up to rounding.
- `mode='label_property'`: the chosen property is uniform over the values the
  generator knows (`draw_values`: every value seen in the labelled *or*
  unlabelled training data, see `known_values`), independently of the label,
  and exactly so within every label group (values are dealt round-robin within
  each group), so p(a|y) is uniform too. A value that the skew removed from the
  labelled set but that the generator learnt from unlabelled images is still
  drawn: that is why 002 trains the generator on unlabelled data.
- `mode='label'`: the properties are null (-1); the model's own p(a|y) applies.
- `replica_conditions` (paper 000's label-matched replicas): every labelled training example's
  label, mask and attributes, copied k times, copy-major, so the first c·N rows are exactly c
  copies of the training set (a store made at the largest k serves every smaller one).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from synth_med.errors import SynthMedError
from synth_med.objectives.reweighting import label_keys

MODES = ("label", "label_property")
REPLICA_SOURCE, REPLICA_COPY = "replica/source", "replica/copy"  # a replica row's training example and copy


def property_values(attrs: np.ndarray) -> list[int]:
  """The known values (>= 0) of a property in the training data, sorted."""
  return sorted(int(v) for v in np.unique(attrs) if v >= 0)


def known_values(*attr_arrays: np.ndarray, requested: Sequence[int] = (),
                 value_names: Sequence[str] = ()) -> list[int]:
  """The property values to draw: every value seen in any of `attr_arrays` (labelled and unlabelled
  training data), or `requested` when given, each of which must have been seen."""
  seen = sorted({v for a in attr_arrays for v in property_values(np.asarray(a))})
  if not requested:
    return seen
  name = lambda v: value_names[v] if 0 <= v < len(value_names) else str(v)  # noqa: E731
  unseen = [int(v) for v in requested if int(v) not in seen]
  if unseen:
    raise SynthMedError(f"fair sampling was asked for property value(s) {[name(v) for v in unseen]}, which no "
                        f"labelled or unlabelled training image has, so the generator never learnt them; "
                        f"choose from {[name(v) for v in seen]} (generate.property_values).")
  return sorted({int(v) for v in requested})


def fair_conditions(labelled: Mapping[str, np.ndarray], label_kind: str, n: int, seed: int, mode: str,
                    attribute: str | None = None, attribute_names: Sequence[str] = (),
                    draw_values: Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """n conditions in the example schema (label, label_mask, labelled, attrs/*).

  `labelled` holds the labelled training examples (label, label_mask, attrs/*);
  `attribute_names` lists every property of the data (all get -1 except the
  fair one in 'label_property' mode). `draw_values` are the values to draw
  the fair property from (`known_values`); None takes those of `labelled`.
  """
  if mode not in MODES:
    raise SynthMedError(f"fair sampling mode {mode!r}; choose one of {list(MODES)}.")
  labels = np.asarray(labelled["label"], np.float32)
  total = len(labels)
  if total == 0:
    raise SynthMedError("fair sampling needs labelled training examples; the labelled split is empty.")
  if n <= 0:
    raise SynthMedError(f"the number of synthetic examples must be > 0, got {n}.")
  rng = np.random.default_rng(seed)
  reps = -(-n // total)
  rows = np.concatenate([rng.permutation(total) for _ in range(reps)])[:n]
  out: dict[str, np.ndarray] = {
      "label": labels[rows],
      "label_mask": np.asarray(labelled.get("label_mask", np.ones_like(labels)), np.float32)[rows],
      "labelled": np.ones(n, bool),
  }
  for name in attribute_names:
    out[f"attrs/{name}"] = np.full(n, -1, np.int32)
  if mode == "label_property":
    if not attribute:
      raise SynthMedError("fair sampling with label_property needs the property's name.")
    key = f"attrs/{attribute}"
    if key not in labelled:
      raise SynthMedError(f"the data have no property {attribute!r}; choose from "
                          f"{[k[6:] for k in labelled if k.startswith('attrs/')]}.")
    values = list(draw_values) if draw_values is not None else known_values(labelled[key])
    if not values:
      raise SynthMedError(f"no training example has a known {attribute!r}; cannot sample it fairly.")
    keys = label_keys(out["label"], label_kind)
    codes = np.empty(n, np.int32)
    for k in np.unique(keys):
      idx = np.flatnonzero(keys == k)
      start = int(rng.integers(len(values)))
      codes[idx] = np.asarray(values)[(start + np.arange(len(idx))) % len(values)]
    out[key] = codes
  order = rng.permutation(n)
  return {k: v[order] for k, v in out.items()}


def replica_conditions(labelled: Mapping[str, np.ndarray], copies: int,
                       attribute_names: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """Paper 000: `copies` label-matched replicas of every labelled training example (label, label mask and
  every attribute as the example has them), copy-major: rows [c·N, (c+1)·N) are copy c. `replica/source`
  is the row's training example and `replica/copy` its copy; each row is its own image (its own noise)."""
  labels = np.asarray(labelled["label"], np.float32)
  total = len(labels)
  if total == 0:
    raise SynthMedError("replicas need labelled training examples; the labelled split is empty.")
  if int(copies) < 1:
    raise SynthMedError(f"the number of replicas per training example must be >= 1, got {copies}.")
  source = np.tile(np.arange(total), int(copies))
  out: dict[str, np.ndarray] = {
      "label": labels[source],
      "label_mask": np.asarray(labelled.get("label_mask", np.ones_like(labels)), np.float32)[source],
      "labelled": np.ones(len(source), bool),
      REPLICA_SOURCE: source.astype(np.int32),
      REPLICA_COPY: np.repeat(np.arange(int(copies)), total).astype(np.int32),
  }
  for name in attribute_names:
    key = f"attrs/{name}"
    out[key] = np.asarray(labelled[key], np.int32)[source] if key in labelled else np.full(len(source), -1, np.int32)
  return out


def held_out(arrays: Mapping[str, np.ndarray], every: int) -> np.ndarray:
  """bool[N]: the replica rows set aside for validation, those of every `every`-th training example
  (paper 000 holds out 10 % of the training set, real and synthetic alike)."""
  if REPLICA_SOURCE not in arrays:
    raise SynthMedError("a replica hold-out needs a replica store (no 'replica/source' in it).")
  return np.asarray(arrays[REPLICA_SOURCE]) % int(every) == 0


def first_copies(arrays: Mapping[str, np.ndarray], copies: int) -> dict[str, np.ndarray]:
  """The rows of a replica store that belong to its first `copies` copies (all rows of other stores
  with copies = 0)."""
  if int(copies) <= 0:
    return dict(arrays)
  if REPLICA_COPY not in arrays:
    raise SynthMedError("mix.synthetic_copies is set but the store holds no replicas (no 'replica/copy'); "
                        "make it with generate.modes containing 'replica', or set mix.synthetic_copies=0.")
  have = int(np.max(arrays[REPLICA_COPY])) + 1
  if int(copies) > have:
    raise SynthMedError(f"mix.synthetic_copies={copies} but the store holds {have} copies of the training set; "
                        f"generate at least {copies} (generate.replica_copies) or ask for fewer.")
  keep = np.asarray(arrays[REPLICA_COPY]) < int(copies)
  return {k: np.asarray(v)[keep] for k, v in arrays.items()}
