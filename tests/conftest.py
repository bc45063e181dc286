"""Shared fixtures: tiny configs and a fast toy task for the training loop."""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

# One persistent XLA compilation cache for the whole test session (also inherited by the
# launch/main.py subprocesses): the smoke runs compile the same programs many times. Unless the
# user names one, it is a temporary folder removed when the session ends (~50 MB a full run).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="synth_med_jax_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
# Subprocesses (launch/main.py, bench scripts) import this tree, whatever synth_med is installed.
os.environ["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def load_config(name: str, arg: str = "smoke") -> ConfigDict:
  import importlib
  mod = importlib.import_module(f"configs.{name}")
  return mod.get_config(arg)


class LinearTask:
  """Softmax regression on flattened images: a fast Task for loop tests."""

  def __init__(self, num_classes: int = 3):
    self.k = num_classes

  def init(self, rng, batch):
    d = int(np.prod(batch["image"].shape[1:]))
    return {"w": jax.random.normal(rng, (d, self.k)) * 0.01, "b": jnp.zeros((self.k,))}

  def loss(self, params, batch, rng):
    x = batch["image"].reshape(batch["image"].shape[0], -1).astype(jnp.float32) / 255.0
    noise = 0.01 * jax.random.normal(rng, x.shape)  # uses the step rng: resume must reproduce it
    logits = (x + noise) @ params["w"] + params["b"]
    loss = -jnp.mean(jnp.sum(batch["label"] * jax.nn.log_softmax(logits), -1))
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(batch["label"], -1))}


def toy_arrays(n: int = 96, k: int = 3, size: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
  """Images whose mean brightness pattern encodes the class."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, k, n)
  img = rng.integers(0, 60, (n, size, size, 1)).astype(np.int32)
  for c in range(k):
    img[y == c, c % size, :, 0] += 150
  return {"image": img.astype(np.uint8), "label": np.eye(k, dtype=np.float32)[y],
          "label_mask": np.ones((n, k), np.float32), "labelled": np.ones(n, bool),
          "domain": np.zeros(n, np.int32), "index": np.arange(n, dtype=np.int64)}


def loop_config(steps: int = 8, batch: int = 16, lr: float = 0.5) -> ConfigDict:
  from configs import common
  c = ConfigDict()
  c.seed = 0
  c.mesh = common.mesh_config()
  c.sharding_rules = ()
  c.train = common.train_config(steps=steps, batch_size=batch, optimizer="sgd", lr=lr, schedule="constant")
  c.train.log_every = 2
  c.train.checkpoint_every = 4
  c.train.ema_decay = 0.9
  return c


def killed_and_resumed(task, cfg, make_stream, workdir: str, kill_at: int):
  """Trains `task` until a hook kills it after step `kill_at`, then reruns it in the same workdir to the end
  (resuming from the last checkpoint); returns the resumed run's LoopResult."""
  from synth_med.train.loop import train

  def crash(step, state):
    if step == kill_at:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    train(task, cfg, make_stream(), workdir, hooks=[crash])
  return train(task, cfg, make_stream(), workdir)


def assert_trees_equal(a, b) -> None:
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def tiny_world_config():
  from configs import common
  def make(world: str, image_size: int = 16):
    c = common.data_config(world, image_size)
    c.train_size, c.val_size, c.test_size, c.ood_size, c.unlabelled_size = 400, 50, 100, 100, 60
    return c
  return make
