"""Jitted functions shared by equal runs in one process.

A study trains dozens of classifiers (methods x seeds) in one process. Each
`jax.jit` of a fresh closure re-traces and re-lowers the BiT train step (about
5 s on a 2-core CPU) even when the persistent compilation cache then finds the
executable. Runs whose tasks and optimizers are equal share one jitted
function instead, so only the first traces.

A key must name everything the jitted closure reads; a task opts in by
defining `cache_key` (see `ClassifierTask`). Without one nothing is shared.
"""
from __future__ import annotations

import collections
import json
from typing import Any, Callable, Hashable, TypeVar

import jax

T = TypeVar("T")
MAX_ENTRIES = 32
_CACHE: "collections.OrderedDict[Hashable, Any]" = collections.OrderedDict()


def tree_key(tree: Any) -> Hashable:
  """A hashable key for a pytree of hashable leaves (e.g. shardings): (treedef, leaves)."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple(leaves)


def config_key(cfg: Any) -> str:
  """A canonical string for a ConfigDict / dict of plain values."""
  as_dict = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  return json.dumps(as_dict, sort_keys=True, default=str)


def task_key(task: Any) -> Hashable | None:
  """The task's `cache_key`, or None when it has none (then nothing is shared)."""
  return getattr(task, "cache_key", None)


def shared(key: Hashable | None, build: Callable[[], T]) -> T:
  """`build()` once per key in this process (LRU of MAX_ENTRIES); a None key always builds."""
  if key is None:
    return build()
  if key in _CACHE:
    _CACHE.move_to_end(key)
    return _CACHE[key]
  value = build()
  _CACHE[key] = value
  while len(_CACHE) > MAX_ENTRIES:
    _CACHE.popitem(last=False)
  return value


def clear() -> None:
  _CACHE.clear()
