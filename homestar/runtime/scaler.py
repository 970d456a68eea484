"""Dynamic loss scaling for fp16, with torch.amp.GradScaler's rules.

The loss is multiplied by `scale` before backward; gradients are multiplied by `inv_scale`
before clipping; a step whose gradients hold inf/nan is skipped and the scale halves; after
`growth_interval` good steps in a row the scale doubles. Plain Python numbers: the engine
already syncs once per step to read the gradient norm. Knows nothing of chunks or models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(kw_only=True, slots=True)
class LossScaler:
    scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    growth_tracker: int = 0
    """Good steps since the last change of scale."""

    @property
    def inv_scale(self) -> float:
        """1/scale computed in double and rounded to fp32, as GradScaler.unscale_ does."""
        return float(torch.tensor(1.0 / self.scale, dtype=torch.float64).float())

    def update(self, found_inf: bool) -> None:
        """After a step: back off on overflow, grow after enough good steps."""
        if found_inf:
            self.scale = _fp32(self.scale * self.backoff_factor)
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.scale = _fp32(self.scale * self.growth_factor)
            self.growth_tracker = 0

    def state_dict(self) -> dict:
        return {"loss_scale": self.scale, "loss_scale_growth_tracker": self.growth_tracker}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state.get("loss_scale", self.scale))
        self.growth_tracker = int(state.get("loss_scale_growth_tracker", 0))


def _fp32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))
