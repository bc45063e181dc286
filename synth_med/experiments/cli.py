"""Command-line parsing for launch/main.py: clear errors instead of tracebacks.

`--config=path.py:arg` loads an ml_collections config file (locked), and
`--config.a.b=value` overrides it. An unknown key, a wrong type, a bad config
argument or any SynthMedError is printed as one message naming the key and the
valid choices, and the process exits with status 2 (1 for run-time errors).
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from typing import Any, Sequence

from absl import flags

from synth_med.errors import SynthMedError
from synth_med.experiments.run import run
from synth_med.train.host_devices import configure_host_devices


def _keys(config: Any, prefix: str = "") -> list[str]:
  out = []
  for k, v in config.items():
    out.append(prefix + k)
    if hasattr(v, "items") and not isinstance(v, dict):
      out.extend(_keys(v, prefix + k + "."))
  return out


def prepare_config_file(path: str) -> None:
  """Stops with a clear error if the config file is missing. Config files import their siblings as a
  package (`from configs import common`): when the file's folder is a package, the folder holding it
  goes on sys.path, wherever the command runs from."""
  if not os.path.isfile(path):
    raise SynthMedError(f"config file {path!r} does not exist; the configs are the files in configs/ "
                        "(e.g. --config=configs/derm_cascade.py).")
  folder = os.path.dirname(os.path.abspath(path))
  root = os.path.dirname(folder)
  if os.path.isfile(os.path.join(folder, "__init__.py")) and root not in sys.path:
    sys.path.insert(0, root)


def load_config_file(spec: str) -> Any:
  """Loads 'path.py[:arg]' by calling the file's get_config(arg)."""
  path, _, arg = spec.partition(":")
  prepare_config_file(path)
  module_spec = importlib.util.spec_from_file_location("_synth_med_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _config_from_argv(argv: Sequence[str]) -> tuple[Any, str | None]:
  """(the config named by --config=..., or None; an error text if it cannot be loaded)."""
  for arg in argv[1:]:
    if arg.startswith("--config="):
      try:
        return load_config_file(arg[len("--config="):]), None
      except Exception as e:  # noqa: BLE001 - reported as such
        return None, f"cannot load {arg}: {e}".splitlines()[0]
  return None, None


def _unknown_key_message(argv: Sequence[str], config: Any) -> str | None:
  """Finds the first --config.x override that is not a key and explains it."""
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    key = arg[len("--config."):].split("=", 1)[0]
    if config is None:
      return f"--config.{key}: the config file could not be loaded"
    node, ok = config, True
    for part in key.split("."):
      if hasattr(node, "keys") and part in node.keys():
        node = node[part]
      else:
        ok = False
        break
    if not ok:
      parent = key.rsplit(".", 1)[0] if "." in key else ""
      valid = [k for k in _keys(config)
               if k != parent and (k.rsplit(".", 1)[0] == parent or (not parent and "." not in k))]
      close = difflib.get_close_matches(key, _keys(config), n=3)
      hint = f" Did you mean {', '.join(close)}?" if close else ""
      return (f"unknown config key --config.{key}.{hint} Valid keys"
              f"{' under ' + parent if parent else ''}: {', '.join(sorted(valid))}")
  return None


def _wrong_type_message(argv: Sequence[str], config: Any, text: str) -> str:
  """Adds the key's expected type and current value to absl's parse error."""
  for arg in argv[1:]:
    if arg.startswith("--config.") and arg.split("=", 1)[0] in text and config is not None:
      key = arg[len("--config."):].split("=", 1)[0]
      node = config
      for part in key.split("."):
        node = node[part]
      return (f"{text} -- wrong type for --config.{key}: expected {type(node).__name__} "
              f"(default {node!r})")
  return text


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flags parser with readable errors for config mistakes."""
  for arg in argv[1:]:  # ml_collections defers a missing file's error to the first use of the config
    if arg.startswith("--config="):
      try:
        prepare_config_file(arg[len("--config="):].partition(":")[0])
      except SynthMedError as e:
        sys.stderr.write(f"synth_med: bad command line: {e}\n")
        sys.exit(2)
  try:
    return flags.FLAGS(list(argv))
  except Exception as e:  # noqa: BLE001 - absl raises several types here
    config, load_error = _config_from_argv(argv)
    text = str(e).strip().replace("\\n", " ")
    if load_error is not None:
      msg = load_error
    elif isinstance(e, flags.IllegalFlagValueError):
      msg = _wrong_type_message(argv, config, text) if config is not None else text
    else:
      msg = _unknown_key_message(argv, config) or text
    sys.stderr.write(f"synth_med: bad command line: {msg}\n")
    sys.exit(2)


def enable_compilation_cache() -> None:
  """XLA's persistent compilation cache, so reruns, seeds and methods that share a program compile
  it once ($JAX_COMPILATION_CACHE_DIR, else ~/.cache/synth_med/xla; SYNTH_MED_NO_CACHE=1 turns it off)."""
  import jax  # pylint: disable=import-outside-toplevel
  if os.environ.get("SYNTH_MED_NO_CACHE") == "1":
    return
  path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "synth_med", "xla")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return  # an unwritable home: run without the cache
  jax.config.update("jax_compilation_cache_dir", path)


def run_main(config: Any, workdir: str) -> None:
  """Runs the experiment; user-facing errors print without a traceback."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; keep our progress readable
    absl_logging.set_verbosity(absl_logging.WARNING)
  try:
    configure_host_devices(int(config.cpu_devices))  # before anything creates a device
    enable_compilation_cache()
    run(config, workdir)
  except SynthMedError as e:
    sys.stderr.write(f"synth_med: error: {e}\n")
    sys.exit(1)
