"""Optimizer settings and step reports shared by every training engine.

Plain data: the trainer fills these in, the plain-PyTorch engine and the chunk runtime both obey
them, so AdamW behaves the same whichever engine runs the step. Knows nothing of models or chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """AdamW hyper-parameters, applied exactly as torch.optim.AdamW does."""

    lr: float = 3e-4
    """Peak learning rate; the schedule scales it each step through `step(lr=...)`."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Applied to matrices only; norms, biases and embeddings get none (see `no_decay`)."""
    grad_clip: float = 1.0
    """Global L2 norm clip; 0 disables clipping."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.eps <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("lr and eps must be positive, weight_decay and grad_clip non-negative")


def no_decay(name: str, param: torch.Tensor) -> bool:
    """True for parameters AdamW must not decay: norms, biases (1-D) and embeddings."""
    parts = name.split(".")
    return param.ndim < 2 or any(part in _EMBEDDING_NAMES for part in parts)


_EMBEDDING_NAMES = frozenset({"wte", "wpe", "embedding", "embeddings"})


@dataclass(kw_only=True, slots=True)
class StepReport:
    """What one optimizer step did."""

    grad_norm: float
    """Global gradient L2 norm before clipping (inf/nan when the step overflowed)."""
    skipped: bool = False
    """True when the step was skipped (fp16 overflow); weights and moments are unchanged."""
    timings: dict[str, float] = field(default_factory=dict)
    """Optional breakdown in seconds (forward, backward, optimizer, transfer_wait...)."""
