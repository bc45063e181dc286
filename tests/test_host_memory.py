"""synth_med/train/host_memory.py: restarting with glibc.malloc.hugetlb=1 so XLA's big buffers get huge pages."""
import os
import subprocess
import sys

import pytest

from synth_med.train import host_memory
from synth_med.train.host_memory import huge_pages_possible, thp_mode, tunables_with_huge_pages, wants_reexec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tunable_is_added_once_and_other_tunables_and_user_choices_are_kept():
  assert tunables_with_huge_pages("") == "glibc.malloc.hugetlb=1"
  assert tunables_with_huge_pages("glibc.malloc.arena_max=2") == \
      "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert tunables_with_huge_pages("glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2") == \
      "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2"  # the user's own value wins
  once = tunables_with_huge_pages("glibc.malloc.arena_max=2")
  assert tunables_with_huge_pages(once) == once


def test_restart_only_where_it_can_work_and_is_not_opted_out_or_done():
  assert huge_pages_possible((2, 36), "madvise") and huge_pages_possible((2, 35), "always")
  assert not huge_pages_possible((2, 34), "always")  # the tunable arrived in glibc 2.35
  assert not huge_pages_possible((2, 36), "never") and not huge_pages_possible(None, "always")
  assert wants_reexec({}, (2, 36), "madvise")
  assert not wants_reexec({"SYNTH_MED_HUGE_PAGES": "0"}, (2, 36), "madvise")
  assert not wants_reexec({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, (2, 36), "madvise")
  assert not wants_reexec({}, (2, 36), None)


def test_thp_mode_reads_the_bracketed_kernel_setting(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert thp_mode(str(f)) == "madvise"
  assert thp_mode(str(tmp_path / "missing")) is None


_PROBE = """
import os, resource, sys
sys.path.insert(0, {root!r})
from synth_med.train.host_memory import reexec_with_huge_pages
print("start", sys.argv[1:], flush=True)
reexec_with_huge_pages()
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
n = 64 * 2**20  # far above glibc's mmap threshold, as XLA's step buffers are (numpy madvises by itself)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(n), 1, n)
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print("tunables", os.environ.get("GLIBC_TUNABLES", ""), "faults", after - before)
"""


@pytest.mark.skipif(not huge_pages_possible(host_memory.glibc_version(), thp_mode()),
                    reason="needs Linux, glibc >= 2.35 and transparent huge pages in madvise/always mode")
def test_the_restarted_process_keeps_its_arguments_and_faults_far_fewer_pages(tmp_path):
  script = tmp_path / "probe.py"
  script.write_text(_PROBE.format(root=ROOT))

  def run(**env):
    e = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "SYNTH_MED_HUGE_PAGES")}
    out = subprocess.run([sys.executable, str(script), "--flag=x", "y"], env={**e, **env},
                         capture_output=True, text=True, check=True).stdout.split("\n")
    starts = [line for line in out if line.startswith("start")]
    last = next(line for line in out if line.startswith("tunables")).split()
    return starts, last

  starts, last = run()
  # Restarted exactly once, with the same arguments, and with the tunable set.
  assert starts == ["start ['--flag=x', 'y']"] * 2, starts
  assert last[1] == "glibc.malloc.hugetlb=1"
  huge_faults = int(last[3])
  starts, last = run(SYNTH_MED_HUGE_PAGES="0")
  assert len(starts) == 1 and last[1] == "faults"  # opted out: no restart, no tunable
  small_faults = int(last[2])
  # 64 MiB is 16,384 pages of 4 KiB but 32 of 2 MiB.
  assert small_faults > 10_000, small_faults
  assert huge_faults < small_faults / 8, (huge_faults, small_faults)
