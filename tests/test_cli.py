"""launch/main.py: config arguments, overrides, and clear errors for bad input."""
import os
import subprocess
import sys

import pytest

from synth_med import configuration
from synth_med.errors import SynthMedError
from tests.conftest import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "launch", "main.py")


def run_main(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, MAIN, *args], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=timeout)


@pytest.mark.parametrize("name", ["derm_classifier", "cxr_classifier", "histo_classifier"])
@pytest.mark.parametrize("arg", ["smoke", "", "full", "smoke,less", "more"])
def test_configs_load_lock_and_validate(name, arg):
  c = load_config(name, arg)
  configuration.validate(c)
  with pytest.raises(AttributeError):
    c.not_a_key = 1  # locked
  if "smoke" in arg:
    assert c.data.image_size <= 32 and c.train.steps <= 10


def test_full_configs_hold_table_e1():
  derm, cxr, histo = (load_config(n, "full") for n in ("derm_classifier", "cxr_classifier",
                                                        "histo_classifier"))
  assert (derm.model.depth, derm.model.width, derm.train.batch_size, derm.train.steps) == (101, 3.0, 96, 10_000)
  assert (derm.train.optimizer.name, derm.train.optimizer.lr, derm.train.optimizer.weight_decay) == (
      "momentum", 0.01, 1e-4)
  assert (cxr.model.depth, cxr.model.width, cxr.train.optimizer.lr, cxr.train.steps) == (152, 2.0, 1e-5, 50_000)
  assert (histo.model.depth, histo.train.optimizer.name, histo.train.batch_size, histo.train.steps) == (
      152, "adam", 32, 200_000)


def test_unknown_config_argument():
  with pytest.raises(ValueError, match="valid arguments"):
    load_config("derm_classifier", "smokey")


def test_bad_choice_names_key_and_choices():
  c = load_config("derm_classifier")
  c.train.optimizer.name = "adagrad"
  with pytest.raises(SynthMedError, match=r"train\.optimizer\.name='adagrad'.*adam"):
    configuration.validate(c)
  c = load_config("derm_classifier")
  c.mesh.data = 0
  with pytest.raises(SynthMedError, match="mesh.data"):
    configuration.validate(c)


@pytest.mark.slow
def test_cli_unknown_key_wrong_type_bad_mesh_and_workdir(tmp_path):
  cfg = "--config=configs/derm_classifier.py:smoke"
  r = run_main(cfg, "--config.train.stpes=3", f"--workdir={tmp_path}/a")
  assert r.returncode == 2 and "unknown config key --config.train.stpes" in r.stderr
  assert "train.steps" in r.stderr and "Traceback" not in r.stderr
  r = run_main(cfg, "--config.train.steps=three", f"--workdir={tmp_path}/b")
  assert r.returncode == 2 and "config.train.steps" in r.stderr and "wrong type" in r.stderr
  r = run_main(cfg, "--config.mesh.data=3", f"--workdir={tmp_path}/c")
  assert r.returncode == 1 and "mesh" in r.stderr and "devices" in r.stderr
  blocker = tmp_path / "file"
  blocker.write_text("x")
  r = run_main(cfg, f"--workdir={blocker}/sub")
  assert r.returncode == 1 and "writable --workdir" in r.stderr and "Traceback" not in r.stderr
  r = run_main(cfg, "--config.data.world=retina", f"--workdir={tmp_path}/d")
  assert r.returncode == 1 and "data.world='retina'" in r.stderr and "skin" in r.stderr


@pytest.mark.slow
def test_cli_bad_config_argument_and_missing_config_file_are_one_line(tmp_path):
  r = run_main("--config=configs/derm_classifier.py:smok", f"--workdir={tmp_path}/a")
  assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
  assert "unknown config argument(s) ['smok']" in r.stderr and "smoke" in r.stderr
  r = run_main("--config=configs/nope.py", f"--workdir={tmp_path}/b")
  assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
  assert "'configs/nope.py' does not exist" in r.stderr and "configs/derm_cascade.py" in r.stderr


@pytest.mark.slow
def test_main_finds_the_configs_package_from_any_folder(tmp_path):
  """Config files import `configs.common`: launch/main.py loads them from another working folder, with
  only the synth_med package itself importable (as after `pip install`), not the checkout's root."""
  site = tmp_path / "site"
  site.mkdir()
  (site / "synth_med").symlink_to(os.path.join(ROOT, "synth_med"))
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(site))
  r = subprocess.run([sys.executable, MAIN, f"--config={ROOT}/configs/derm_classifier.py:smok",
                      f"--workdir={tmp_path}/w"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
  assert r.returncode == 2 and "unknown config argument(s) ['smok']" in r.stderr, r.stderr


def test_the_ci_scripts_python_checks_run():
  """Every `python -c` line in .ci/run imports what exists (a renamed module fails CI in 25 s)."""
  import re
  import shlex
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    lines = [l.strip() for l in f if l.strip().startswith("python -c ")]
  assert len(lines) >= 2
  for line in lines:
    code = shlex.split(line)[2]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 0, (line, proc.stderr[-2000:])
    assert re.search(r"\S", proc.stdout), line
