"""Classifier train-step throughput (images/s) for a config's BiT-ResNet, augmentation included.

  python bench/classifier_step.py [--config derm_classifier] [--arg ''] [--steps 10]
"""
import argparse
import importlib
import time


if __name__ == "__main__":  # as launch/main.py: huge pages for XLA's step buffers (SYNTH_MED_HUGE_PAGES=0: off)
  from synth_med.train.host_memory import reexec_with_huge_pages  # noqa: E402
  reexec_with_huge_pages()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from synth_med.data.augment import make_augment  # noqa: E402
from synth_med.data.sources import make_world  # noqa: E402
from synth_med.experiments.classifier import build_model  # noqa: E402
from synth_med.objectives.classification import ClassifierTask  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="derm_classifier")
  ap.add_argument("--arg", default="")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--batch", type=int, default=0)
  args = ap.parse_args()
  config = importlib.import_module(f"configs.{args.config}").get_config(args.arg)
  world = make_world(config.data)
  bs = args.batch or int(config.train.batch_size)
  batch = world.examples(np.resize(world.split("val").ids, bs))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  model = build_model(config, world.spec)
  for aug_kind in ("none", config.data.augment):
    task = ClassifierTask(model, world.spec.label_kind, augment=make_augment(world.spec.name, aug_kind))
    params = task.init(jax.random.key(0), batch)
    tx = optax.sgd(1e-3, momentum=0.9)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch, key):
      (loss, _), g = jax.value_and_grad(task.loss, has_aux=True)(params, batch, key)
      upd, opt = tx.update(g, opt, params)
      return optax.apply_updates(params, upd), opt, loss

    params, opt, loss = step(params, opt, batch, jax.random.key(0))
    loss.block_until_ready()
    t0 = time.perf_counter()
    for i in range(args.steps):
      params, opt, loss = step(params, opt, batch, jax.random.key(i))
    loss.block_until_ready()
    dt = time.perf_counter() - t0
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"{args.config}:{args.arg or 'default'} {config.data.image_size}px batch {bs} augment={aug_kind}: "
          f"{args.steps * bs / dt:.1f} img/s ({args.steps / dt:.2f} steps/s, {n_params / 1e6:.2f}M params, "
          f"{jax.devices()[0].platform})")


if __name__ == "__main__":
  main()
