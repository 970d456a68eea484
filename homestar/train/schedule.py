"""Learning-rate schedule: linear warmup, then cosine decay to a floor, then flat.

The horizon (`decay_steps`) belongs to the run, not to how many steps one invocation trains, so a
run stopped at step 20 and extended to 40 follows exactly the curve of a 40-step run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(kw_only=True, slots=True, frozen=True)
class Schedule:
    lr: float
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float
    """Floor reached at `decay_steps` and kept after."""
    warmup_steps: int
    decay_steps: int
    """Step at which the cosine reaches `min_lr`."""

    def __post_init__(self) -> None:
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError("need lr > 0 and 0 <= min_lr <= lr")
        if self.warmup_steps < 0 or self.decay_steps < 1:
            raise ValueError("warmup_steps must be >= 0 and decay_steps >= 1")

    def __call__(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if step >= self.decay_steps:
            return self.min_lr
        span = max(1, self.decay_steps - self.warmup_steps)
        progress = (step - self.warmup_steps) / span
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))
