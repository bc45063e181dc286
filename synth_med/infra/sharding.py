"""Device mesh, regex sharding rules from the config, and global batches.

Mesh axes come from the config in order, e.g. {'data': -1, 'model': 1}; -1 takes
the remaining devices. Parameters (and every train-state leaf) are replicated
unless the first matching regex rule gives a PartitionSpec. Batches are split
over 'data'; each process feeds its own shard and global arrays are assembled
with `jax.make_array_from_process_local_data`.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from synth_med.errors import SynthMedError

DATA_AXIS = "data"


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the mesh named by the config; errors name the sizes and the device count."""
  devices = list(devices if devices is not None else jax.devices())
  names = tuple(mesh_config.keys())
  sizes = [int(v) for v in mesh_config.values()]
  if DATA_AXIS not in names:
    raise SynthMedError(f"mesh config {dict(mesh_config)} needs a '{DATA_AXIS}' axis, e.g. "
                        "--config.mesh.data=-1.")
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise SynthMedError(f"mesh config {dict(mesh_config)}: sizes must be positive, with at most one -1.")
  fixed = int(np.prod([s for s in sizes if s != -1]))
  n = len(devices)
  if -1 in sizes:
    if n % fixed:
      raise SynthMedError(f"mesh {dict(mesh_config)} does not fit {n} devices: {n} is not divisible by "
                          f"{fixed}. Choose axis sizes whose product divides {n}.")
    sizes[sizes.index(-1)] = n // fixed
  if int(np.prod(sizes)) != n:
    raise SynthMedError(f"mesh {dict(mesh_config)} needs {int(np.prod(sizes))} devices but {n} are "
                        f"available; set one axis to -1 or make the product {n}.")
  return Mesh(np.asarray(devices).reshape(sizes), names)


def data_size(mesh: Mesh) -> int:
  return int(mesh.shape[DATA_AXIS])


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def path_str(path: Sequence[Any]) -> str:
  """'params/block1/unit01/a/standardized_conv2d/kernel' for a pytree key path."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[Sequence[Any]]) -> Any:
  """NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs) from regex rules.

  Each rule is (regex, spec) with spec a tuple of mesh-axis names or None per
  dimension; the first rule whose regex matches the leaf's path (re.search)
  wins; no match means replicated. A spec that does not divide the leaf's shape
  is an error naming the leaf and the rule.
  """
  compiled = []
  for rule in rules:
    if len(rule) != 2:
      raise SynthMedError(f"sharding rule {rule!r} must be (regex, partition spec tuple).")
    pattern, spec = rule
    try:
      compiled.append((re.compile(pattern), tuple(spec), pattern))
    except re.error as e:
      raise SynthMedError(f"sharding rule regex {pattern!r} is invalid: {e}") from e

  def one(path, leaf):
    name = path_str(path)
    shape = tuple(getattr(leaf, "shape", ()))
    for regex, spec, pattern in compiled:
      if regex.search(name):
        if len(spec) > len(shape):
          continue  # a rule for matrices does not apply to scalars (e.g. optimizer counts)
        for dim, axis in zip(shape, spec):
          if axis is None:
            continue
          if axis not in mesh.shape:
            raise SynthMedError(f"sharding rule {pattern!r} names mesh axis {axis!r}; the mesh has "
                                f"{list(mesh.shape)}.")
          if dim % mesh.shape[axis]:
            raise SynthMedError(f"sharding rule {pattern!r} splits {name} (shape {shape}) over "
                                f"'{axis}' of size {mesh.shape[axis]}, which does not divide {dim}.")
        return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, tree)


def to_global(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over 'data'."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "train.batch_size") -> int:
  """Returns the per-process batch; errors if the batch does not split evenly."""
  d = data_size(mesh)
  if global_batch % d or global_batch % jax.process_count():
    raise SynthMedError(f"{what}={global_batch} must be divisible by the '{DATA_AXIS}' mesh axis "
                        f"({d} devices) and the process count ({jax.process_count()}).")
  return global_batch // jax.process_count()
