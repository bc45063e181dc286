"""synth_med/train/host_devices.py: splitting the CPU into XLA devices from the config key cpu_devices."""
import os
import subprocess
import sys

import pytest

from synth_med.errors import SynthMedError
from synth_med.train.host_devices import auto_count, host_device_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_auto_count_is_the_largest_power_of_two_up_to_the_cores_and_the_cap():
  assert [auto_count(c) for c in (1, 2, 3, 4, 6, 8, 12, 64)] == [1, 2, 2, 4, 4, 8, 8, 8]
  assert auto_count(64, cap=16) == 16


def test_flags_one_single_threaded_device_per_core_and_never_override_the_user():
  assert host_device_flags(0, 2, "") == \
      "--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false"
  # Fewer devices than cores: each device keeps its thread pool.
  assert host_device_flags(0, 6, "--xla_cpu_use_onednn=true") == \
      "--xla_cpu_use_onednn=true --xla_force_host_platform_device_count=4"
  assert host_device_flags(1, 16, "") == ""  # 1 = one multi-threaded device, as JAX's default
  assert host_device_flags(3, 2, "") == \
      "--xla_force_host_platform_device_count=3 --xla_cpu_multi_thread_eigen=false"
  user = "--xla_force_host_platform_device_count=8"
  assert host_device_flags(0, 2, user) == user
  with pytest.raises(SynthMedError, match="--config.cpu_devices=-1"):
    host_device_flags(-1, 2, "")


_PROBE = """
import sys, jax
sys.path.insert(0, {root!r})
from synth_med.train.host_devices import configure_host_devices
if {touch}:
  jax.devices()  # the CPU client exists already: the request must be ignored, not crash
configure_host_devices({n})
print("COUNT", jax.device_count())
"""


@pytest.mark.parametrize("n,touch,expected", [(3, False, 3), (1, False, 1), (3, True, 1)])
def test_configure_sets_the_device_count_before_jax_starts(n, touch, expected):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", _PROBE.format(root=ROOT, n=n, touch=touch)],
                        capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"COUNT {expected}" in proc.stdout
  if touch:
    assert "cpu_devices=3 ignored" in proc.stderr


def _batch_sizes(config, prefix=""):
  for k, v in config.items():
    if hasattr(v, "items") and not isinstance(v, dict):
      yield from _batch_sizes(v, f"{prefix}{k}.")
    elif k == "batch_size":
      yield f"{prefix}{k}", int(v)


@pytest.mark.parametrize("name", ["derm_cascade", "cxr_cascade", "histo_study", "derm_diffusion", "cxr_diffusion", "histo_diffusion",
                                  "derm_classifier", "cxr_classifier", "histo_classifier"])
@pytest.mark.parametrize("arg", ["", "full"])
def test_every_batch_splits_over_the_automatic_cpu_device_count(name, arg):
  """cpu_devices=0 may give up to 8 devices; no default or :full batch may then fail to shard."""
  from tests.conftest import load_config
  c = load_config(name, arg)
  sizes = dict(_batch_sizes(c))
  assert c.cpu_devices == 0 and sizes
  assert {k: v for k, v in sizes.items() if v % auto_count(10 ** 6)} == {}


def test_accelerator_expected_from_jax_platforms_or_plugin_and_device_nodes():
  from synth_med.train.host_devices import accelerator_expected
  none = lambda name: False  # noqa: E731
  assert accelerator_expected({"JAX_PLATFORMS": "cuda,cpu"}, none, lambda p: [])
  assert accelerator_expected({"JAX_PLATFORMS": "tpu"}, none, lambda p: [])
  assert not accelerator_expected({"JAX_PLATFORMS": "cpu"}, lambda name: True, lambda p: [p])
  cuda = lambda name: name == "jax_cuda12_plugin"  # noqa: E731
  assert accelerator_expected({}, cuda, lambda p: [p] if "nvidia" in p else [])
  assert not accelerator_expected({}, cuda, lambda p: [])  # the plugin without a GPU: a CPU host
  assert not accelerator_expected({}, none, lambda p: [p])  # device nodes without a plugin
  assert accelerator_expected({}, lambda name: name == "libtpu", lambda p: [p] if "accel" in p else [])
