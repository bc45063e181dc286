"""Workdir artefacts written atomically: JSON results, resolved configs, DONE markers."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

import numpy as np
from synth_med.errors import SynthMedError


def _default(o: Any):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, (set, tuple)):
    return list(o)
  raise TypeError(f"not JSON serialisable: {type(o)}")


def ensure_writable_dir(path: str, what: str = "--workdir") -> str:
  """Creates `path` if needed and proves it writable; SynthMedError names the fix otherwise."""
  try:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write_test-", dir=path)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise SynthMedError(f"{path!r} is not writable ({e.strerror}); pass a writable {what}.") from e
  return path


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "w", suffix: str = "") -> None:
  """Calls write(file) on a temporary file in the same folder, fsyncs, then renames it into place."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
  try:
    with os.fdopen(fd, mode) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temporary file in the same folder, then rename)."""
  atomic_write(path, lambda f: json.dump(obj, f, indent=2, default=_default, allow_nan=False), "w", ".json")


def begin_stage(workdir: str, config: Any, what: str) -> Any | None:
  """A finished stage (DONE + metrics.json) returns its metrics; otherwise the folder is made,
  config.json written, and None returned."""
  metrics_path = os.path.join(workdir, "metrics.json")
  if is_done(workdir) and os.path.exists(metrics_path):
    print(f"{what} in {workdir} is done; skipping (delete DONE to rerun)", flush=True)
    return read_json(metrics_path)
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, "config.json"), config_to_dict(config))
  return None


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def is_done(folder: str) -> bool:
  return os.path.exists(os.path.join(folder, "DONE"))


def mark_done(folder: str) -> None:
  write_json(os.path.join(folder, "DONE"), {"done": True})


def config_to_dict(config: Any) -> Any:
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if isinstance(config, dict):
    return {k: config_to_dict(v) for k, v in config.items()}
  if isinstance(config, (list, tuple)):
    return [config_to_dict(v) for v in config]
  return config
