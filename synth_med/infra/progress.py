"""Progress lines with step rate and ETA for long work (training, rendering, sampling)."""
from __future__ import annotations

import sys
import time


class Progress:
  """Prints 'what: k/n (x.x it/s, ETA mm:ss)' at most every `every_s` seconds."""

  def __init__(self, what: str, total: int, start: int = 0, every_s: float = 10.0, unit: str = "step",
               stream=None):
    self.what, self.total, self.unit = what, int(total), unit
    self.start = self.done = int(start)
    self.every_s = every_s
    self.t0 = self.last = time.perf_counter()
    self.stream = stream or sys.stdout

  @property
  def rate(self) -> float:
    dt = time.perf_counter() - self.t0
    return (self.done - self.start) / dt if dt > 0 else 0.0

  def eta_s(self) -> float:
    r = self.rate
    return (self.total - self.done) / r if r > 0 else float("inf")

  def update(self, done: int, extra: str = "", force: bool = False) -> None:
    self.done = int(done)
    now = time.perf_counter()
    if force or now - self.last >= self.every_s or self.done >= self.total:
      self.last = now
      eta = self.eta_s()
      eta_txt = "?" if eta == float("inf") else f"{int(eta // 60):d}:{int(eta % 60):02d}"
      msg = (f"{self.what}: {self.done}/{self.total} {self.unit}s ({self.rate:.1f} {self.unit}/s, "
             f"ETA {eta_txt}){' ' + extra if extra else ''}")
      print(msg, file=self.stream, flush=True)
