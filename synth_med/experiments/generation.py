"""The generation job: n images for a table of conditions, written as resumable shards.

`run_generation` writes `manifest.json` (what is being generated) and
shard-00000.npz, shard-00001.npz, ... each with `shard_size` images and their
conditions (label, label_mask, labelled, attrs/*), `index` (the image's number
k in the job), `seed` and `generator_step`. Image k depends only on (seed, k).
A killed job rerun with the same arguments skips every finished shard (shards
are written atomically) and writes only the missing ones; different arguments
in the same folder are refused. A DONE marker ends the job.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Mapping

import numpy as np

from synth_med.data import shards
from synth_med.errors import SynthMedError
from synth_med.infra import artifacts
from synth_med.infra.progress import Progress


def conditions_digest(conditions: Mapping[str, np.ndarray]) -> str:
  h = hashlib.sha256()
  for k in sorted(conditions):
    a = np.ascontiguousarray(conditions[k])
    h.update(k.encode())
    h.update(str(a.dtype).encode() + str(a.shape).encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def run_generation(generator: Any, conditions: Mapping[str, np.ndarray], out_dir: str, seed: int,
                   shard_size: int, generator_step: int,
                   on_shard: Callable[[int], None] | None = None) -> str:
  """Generates len(conditions) images into `out_dir`; returns `out_dir`.

  `generator` has `generate(conditions, n, seed, start_index)`. `on_shard(i)` is
  called after shard i is on disk (tests use it to kill the job).
  """
  n = int(len(np.asarray(conditions["label"])))
  if shard_size <= 0:
    raise SynthMedError(f"generate.shard_size={shard_size} must be > 0.")
  artifacts.ensure_writable_dir(out_dir, "generation folder")
  manifest = {"num_images": n, "seed": int(seed), "shard_size": int(shard_size),
              "generator_step": int(generator_step), "conditions": conditions_digest(conditions),
              "image_shape": list(generator.image_shape)}
  path = os.path.join(out_dir, "manifest.json")
  if os.path.exists(path):
    old = artifacts.read_json(path)
    if old != manifest:
      diff = {k: (old.get(k), v) for k, v in manifest.items() if old.get(k) != v}
      raise SynthMedError(f"{out_dir!r} holds a generation job with other settings {diff} (old, new); "
                          "use a new folder, or delete the old one to regenerate.")
  else:
    artifacts.write_json(path, manifest)
  if artifacts.is_done(out_dir):
    print(f"generation in {out_dir} is done; skipping", flush=True)
    return out_dir
  num_shards = -(-n // shard_size)
  todo = [i for i in range(num_shards) if not os.path.exists(shards.shard_path(out_dir, i))]
  if len(todo) < num_shards:
    print(f"resuming generation: {num_shards - len(todo)} of {num_shards} shards already on disk",
          flush=True)
  size = lambda i: min((i + 1) * shard_size, n) - i * shard_size  # noqa: E731
  prog = Progress("generating", n, unit="image", start=n - sum(size(i) for i in todo))
  for i in todo:
    lo, hi = i * shard_size, min((i + 1) * shard_size, n)
    rows = {k: np.asarray(v)[lo:hi] for k, v in conditions.items()}
    images = generator.generate(rows, hi - lo, seed=seed, start_index=lo)
    out = dict(rows)
    out.update(image=images, index=np.arange(lo, hi, dtype=np.int64),
               seed=np.full(hi - lo, seed, np.int64), generator_step=np.full(hi - lo, generator_step, np.int64),
               domain=np.full(hi - lo, -1, np.int32))
    shards.write_shard(shards.shard_path(out_dir, i), out)
    prog.update(prog.done + (hi - lo))
    if on_shard is not None:
      on_shard(i)
  artifacts.mark_done(out_dir)
  return out_dir
