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
