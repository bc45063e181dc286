"""The real + synthetic training stream of 002 Eq. 3/8: each batch slot is real with probability α.

Which slots are real at step s is a pure function of (seed, s, host), and each
source has its own seeded `TrainStream`, so a resumed run sees exactly the
batches an uninterrupted one would. Both sources must hold the same keys
(`classifier_arrays` makes them so); every batch gets a `synthetic` flag.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import grain
import numpy as np

from synth_med.data.pipeline import ArraySource, Source, TrainStream
from synth_med.errors import SynthMedError

CLASSIFIER_KEYS = ("image", "label", "label_mask", "labelled", "weight")


def classifier_arrays(arrays: Mapping[str, np.ndarray], weight: np.ndarray | None = None,
                      attributes: tuple[str, ...] = ()) -> ArraySource:
  """The keys a classifier batch needs (+ the named attributes), with a per-example `weight`."""
  n = len(arrays["image"])
  out = {k: np.asarray(arrays[k]) for k in ("image", "label", "label_mask", "labelled")}
  out["labelled"] = out["labelled"].astype(bool)
  out["weight"] = np.ones(n, np.float32) if weight is None else np.asarray(weight, np.float32)
  for a in attributes:
    out[f"attrs/{a}"] = np.asarray(arrays.get(f"attrs/{a}", np.full(n, -1)), np.int32)
  return ArraySource(out)


def check_alpha(alpha: float) -> float:
  alpha = float(alpha)
  if not 0.0 <= alpha <= 1.0 or not np.isfinite(alpha):
    raise SynthMedError(f"mix.alpha={alpha} must lie in [0, 1] (the probability that an example is "
                        "real; 1 = real data only, 0 = synthetic only).")
  return alpha


class MixedStream:
  """Like `TrainStream`, but slot i of a batch is real w.p. `alpha` and synthetic otherwise."""

  def __init__(self, real: Source | None, synthetic: Source | None, alpha: float, global_batch: int,
               seed: int, num_threads: int = 2, prefetch: int = 4, process_index: int | None = None,
               process_count: int | None = None):
    self.alpha = check_alpha(alpha)
    if self.alpha > 0 and (real is None or len(real) == 0):
      raise SynthMedError("mix.alpha > 0 but there are no real training examples.")
    if self.alpha < 1 and (synthetic is None or len(synthetic) == 0):
      raise SynthMedError("mix.alpha < 1 but there are no synthetic examples; run the generation stage "
                          "first or set mix.alpha=1.")
    kw = dict(num_threads=0, process_index=process_index, process_count=process_count)
    self.real = TrainStream(real, global_batch, seed, **kw) if self.alpha > 0 else None
    self.synthetic = TrainStream(synthetic, global_batch, seed + 7919, **kw) if self.alpha < 1 else None
    first = self.real or self.synthetic
    self.process_index, self.local_batch = first.process_index, first.local_batch
    self.seed, self.num_threads, self.prefetch = int(seed), num_threads, prefetch
    if self.real is not None and self.synthetic is not None:
      rk, sk = set(real.fetch(np.arange(1))), set(synthetic.fetch(np.arange(1)))
      if rk != sk:
        raise SynthMedError(f"real and synthetic examples have different keys: {sorted(rk ^ sk)}.")

  def is_real(self, step: int) -> np.ndarray:
    """This host's slots at `step` that hold real examples."""
    rng = np.random.default_rng([self.seed, int(step), self.process_index])
    return rng.random(self.local_batch) < self.alpha

  def batch(self, step: int) -> dict[str, np.ndarray]:
    real = self.is_real(step)
    parts = []
    if real.any():
      parts.append((real, self.real.source.fetch(self.real.rows(step)[real])))
    if (~real).any():
      parts.append((~real, self.synthetic.source.fetch(self.synthetic.rows(step)[~real])))
    out = {}
    for k, v in parts[0][1].items():
      arr = np.empty((self.local_batch,) + v.shape[1:], v.dtype)
      for mask, part in parts:
        arr[mask] = part[k]
      out[k] = arr
    out["synthetic"] = ~real
    return out

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    ds = grain.MapDataset.range(start_step, start_step + (1 << 40)).map(self.batch)
    if self.num_threads > 0:
      return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=self.num_threads,
                                                       prefetch_buffer_size=self.prefetch)))
    return (ds[i] for i in range(len(ds)))
