"""Transparent huge pages for XLA's per-step buffers on Linux CPUs.

XLA's CPU runtime allocates each execution's buffers afresh. glibc serves the
large ones with `mmap` and unmaps them on free, so every train step faults in
its working set again, 4 KiB at a time: about 52k page faults per 1M-parameter
UNet step and 115k per 9M step on this project's 2-core machine (a third of a
second of kernel time a step at 9M). glibc's tunable `glibc.malloc.hugetlb=1`
(glibc >= 2.35) makes malloc `madvise(MADV_HUGEPAGE)` those chunks, so a kernel
whose transparent huge pages are in `madvise` or `always` mode backs them with
2 MiB pages: 5-6x fewer faults, and the UNet train step 1.1-1.4x faster
(measured with `bench/unet.py`). Other allocations are unchanged.

The tunable is read by the dynamic loader when a process starts, so
`reexec_with_huge_pages` restarts the interpreter once, with the same
arguments, before anything heavy is imported. `launch/main.py`,
`bench/unet.py` and `bench/classifier_step.py` call it first thing. It does
nothing on a GPU/TPU host (`host_devices.accelerator_expected`), where the tunable
cannot work (not Linux, glibc older than 2.35,
transparent huge pages off), when it is already set, or when the environment
says `SYNTH_MED_HUGE_PAGES=0`.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Mapping

from synth_med.train.host_devices import accelerator_expected

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "SYNTH_MED_HUGE_PAGES"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the C library this process runs on, or None when it is not glibc."""
  try:
    name = os.confstr("CS_GNU_LIBC_VERSION") or ""
  except (AttributeError, ValueError, OSError):
    return None
  m = re.fullmatch(r"glibc (\d+)\.(\d+).*", name)
  return (int(m.group(1)), int(m.group(2))) if m else None


def thp_mode(path: str = _THP_MODE) -> str | None:
  """The kernel's transparent-huge-page mode (`always`, `madvise` or `never`), None if unknown."""
  try:
    with open(path, encoding="ascii") as f:
      m = re.search(r"\[(\w+)\]", f.read())
  except OSError:
    return None
  return m.group(1) if m else None


def huge_pages_possible(glibc: tuple[int, int] | None, mode: str | None) -> bool:
  """Whether glibc.malloc.hugetlb=1 can take effect: glibc >= 2.35 and THP not off."""
  return glibc is not None and glibc >= (2, 35) and mode in ("always", "madvise")


def tunables_with_huge_pages(current: str) -> str:
  """GLIBC_TUNABLES with `glibc.malloc.hugetlb=1` added, keeping every other tunable.

  A hugetlb value the user already chose is kept as it is.
  """
  parts = [p for p in current.split(":") if p]
  if any(p.split("=", 1)[0] == TUNABLE for p in parts):
    return current
  return ":".join(parts + [f"{TUNABLE}=1"])


def wants_reexec(environ: Mapping[str, str], glibc: tuple[int, int] | None, mode: str | None) -> bool:
  """Whether to restart the process with the tunable: possible, not opted out, not yet set."""
  if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
    return False
  current = environ.get("GLIBC_TUNABLES", "")
  return huge_pages_possible(glibc, mode) and tunables_with_huge_pages(current) != current


def reexec_with_huge_pages() -> None:
  """Restarts this Python process with glibc.malloc.hugetlb=1 when that helps (see module doc).

  Returns only when no restart is needed; otherwise it replaces the process
  (same interpreter, same interpreter options and arguments).
  """
  if accelerator_expected() or not wants_reexec(os.environ, glibc_version(), thp_mode()):
    return
  os.environ["GLIBC_TUNABLES"] = tunables_with_huge_pages(os.environ.get("GLIBC_TUNABLES", ""))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, sys.orig_argv)
