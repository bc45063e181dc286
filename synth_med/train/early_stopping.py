"""Early stopping on a score where lower is better (paper 001 stops its GANs on FID)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class EarlyStopping:
  """Stop after `patience` evaluations without a new best value, but never before `min_steps`.

  `update(step, value)` records one evaluation and returns True when training should stop; `best_step`
  and `best_value` name the checkpoint to keep. `history` holds every (step, value), so a resumed run
  replays its state from a saved history (`from_history`)."""
  patience: int = 2
  min_steps: int = 0
  best_value: float = float("inf")
  best_step: int = -1
  bad: int = 0
  history: list[tuple[int, float]] = dataclasses.field(default_factory=list)

  def __post_init__(self):
    if self.patience < 1:
      raise ValueError(f"early stopping patience={self.patience} must be >= 1")

  def update(self, step: int, value: float) -> bool:
    self.history.append((int(step), float(value)))
    if value < self.best_value:
      self.best_value, self.best_step, self.bad = float(value), int(step), 0
    else:
      self.bad += 1
    return self.bad >= self.patience and step >= self.min_steps

  @property
  def improved(self) -> bool:
    """Whether the last update set a new best."""
    return bool(self.history) and self.history[-1][0] == self.best_step

  @classmethod
  def from_history(cls, patience: int, min_steps: int, history: list) -> "EarlyStopping":
    stopper = cls(patience, min_steps)
    for step, value in history:
      stopper.update(step, value)
    return stopper
