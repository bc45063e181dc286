"""Optimizers and learning-rate schedules from the config (optax)."""
from __future__ import annotations

from typing import Any

import optax

from synth_med.errors import SynthMedError

OPTIMIZERS = ("adam", "adamw", "momentum", "sgd", "lion")
SCHEDULES = ("constant", "cosine", "linear")


def make_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
  lr, warmup = float(cfg.lr), int(cfg.warmup_steps)
  if cfg.schedule not in SCHEDULES:
    raise SynthMedError(f"train.optimizer.schedule={cfg.schedule!r}; choose one of {list(SCHEDULES)}.")
  decay_steps = max(total_steps - warmup, 1)
  if cfg.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps)
  else:
    main = optax.linear_schedule(lr, 0.0, decay_steps)
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer, schedule) for `train.optimizer`."""
  sched = make_schedule(cfg, total_steps)
  name, wd = cfg.name, float(cfg.weight_decay)
  b1, b2 = float(cfg.get("b1", 0.9)), float(cfg.get("b2", 0.999))  # prog-GAN: 0, 0.99
  if name == "adam":
    tx = optax.adam(sched, b1=b1, b2=b2)
    if wd:
      tx = optax.chain(optax.add_decayed_weights(wd), tx)
  elif name == "adamw":
    tx = optax.adamw(sched, b1=b1, b2=b2, weight_decay=wd)
  elif name == "lion":  # Chen et al. 2023; paper 000's classifier (lr 1e-5, weight decay 3e-4)
    tx = optax.lion(sched, weight_decay=wd)
  elif name in ("momentum", "sgd"):
    tx = optax.sgd(sched, momentum=0.9 if name == "momentum" else None, nesterov=False)
    if wd:
      tx = optax.chain(optax.add_decayed_weights(wd), tx)
  else:
    raise SynthMedError(f"train.optimizer.name={name!r}; choose one of {list(OPTIMIZERS)}.")
  if float(cfg.grad_clip) > 0:
    tx = optax.chain(optax.clip_by_global_norm(float(cfg.grad_clip)), tx)
  every = int(cfg.get("every_k_steps", 1) or 1)
  if every > 1:  # one update every k steps from the mean of their gradients (e.g. a GAN's D:G = 2:1)
    tx = optax.MultiSteps(tx, every_k_schedule=every).gradient_transformation()
  return tx, sched
