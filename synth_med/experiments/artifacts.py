"""Workdir artefacts written atomically: JSON results, resolved configs, DONE markers."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np


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
  from synth_med.errors import SynthMedError  # pylint: disable=import-outside-toplevel
  try:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write_test-", dir=path)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise SynthMedError(f"{path!r} is not writable ({e.strerror}); pass a writable {what}.") from e
  return path


def write_json(path: str, obj: Any) -> None:
  """Writes JSON to a temporary file in the same folder, then renames it into place."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=2, default=_default, allow_nan=False)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


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
