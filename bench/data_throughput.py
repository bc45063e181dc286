"""Procedural data throughput: images/s per world on ONE core (target: 5,000 img/s per core at 64 px).

  python bench/data_throughput.py [--size 64] [--batch 256] [--repeats 5]
"""
import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# The renderers' pixel work runs in jitted XLA kernels: keep XLA on one thread too.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import numpy as np  # noqa: E402

from configs import common  # noqa: E402
from synth_med.data.sources import make_world  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", type=int, default=64)
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()
  print(f"procedural worlds at {args.size} px, batch {args.batch}, one thread")
  for name in ("skin", "chest", "tissue"):
    world = make_world(common.data_config(name, args.size))
    ids = world.split("train").ids
    ids = np.resize(ids, args.batch * (args.repeats + 1))
    world.examples(ids[:args.batch])  # warm-up
    t0 = time.perf_counter()
    meta_t = 0.0
    for r in range(1, args.repeats + 1):
      chunk = ids[r * args.batch:(r + 1) * args.batch]
      t1 = time.perf_counter()
      world.metadata(chunk)
      meta_t += time.perf_counter() - t1
      world.examples(chunk)
    dt = time.perf_counter() - t0
    n = args.batch * args.repeats
    print(f"{name:7s} {n / dt:8.0f} img/s per core   (metadata alone {n / meta_t:9.0f} ex/s)")


if __name__ == "__main__":
  main()
