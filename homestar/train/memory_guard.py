"""Host memory guards: the run's share of `--cpu-mem-gib`, and a pause while the machine runs short.

`--cpu-mem-gib` caps the whole training process (pinned buffers included), so the chunk runtime
gets what is left of it after what the process already holds, what a checkpoint needs to stage,
activations, and (on a CPU-only machine) the simulated device, whose bytes are host bytes too.
`MemoryGuard` is polled between steps: when other programs have grown until the machine's
available memory falls under a threshold, training waits (saying so) instead of pushing the
desktop into swap, and goes on once memory is back. Knows RunConfig, psutil and the planner's
host figures (checkpoint staging, working reserve); nothing of
engines, chunks or models.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil

from homestar.errors import BudgetError
from homestar.model import GPTConfig
from homestar.planner.memory import WORKING_RESERVE, checkpoint_staging

GIB = 2**30
MIN_AVAILABLE_ENV = "HOMESTAR_MIN_AVAILABLE_GIB"
"""Overrides the available-memory threshold under which training pauses (GiB, 0 turns it off)."""

POLL_SECONDS = 1.0
"""Seconds between two looks at available memory while training waits for it."""


def host_chunk_budget(config, *, rss: int) -> int | None:
    """Bytes of host memory the chunk runtime may allocate under --cpu-mem-gib (None: no cap).

    `rss` is what the process holds now (interpreter, torch, data). BudgetError when nothing
    would be left for chunks."""
    if config.cpu_mem_gib is None:
        return None
    cap = int(config.cpu_mem_gib * GIB)
    simulated = int(config.gpu_mem_gib * GIB) if config.device == "cpu" and config.gpu_mem_gib else 0
    staging = checkpoint_staging(GPTConfig(**config.model))
    overhead = rss + simulated + staging + _activation_bytes(config) + WORKING_RESERVE
    if cap - overhead <= 0:
        raise BudgetError(f"--cpu-mem-gib {config.cpu_mem_gib:g} leaves nothing for the model: the process already "
                          f"holds {rss / GIB:.2f} GiB and needs {(overhead - rss) / GIB:.2f} GiB more besides its "
                          f"chunks; raise --cpu-mem-gib to at least {overhead / GIB + 0.05:.2f}")
    return cap - overhead


def _activation_bytes(config) -> int:
    """Rough fp32 activations of one micro-batch when the CPU computes (on a GPU they live there)."""
    if config.device != "cpu":
        return 0
    m = config.model
    per_token = 34 * m["d_model"] * m["n_layer"] + 3 * m["vocab_size"]
    return 4 * config.micro_batch * config.seq_len * per_token


def default_threshold() -> int:
    """Pause below this many available bytes: the env override, else 5% of RAM capped at 1 GiB."""
    text = os.environ.get(MIN_AVAILABLE_ENV, "").strip()
    if text:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not value >= 0:
            raise BudgetError(f"{MIN_AVAILABLE_ENV} must be a number of GiB (0 turns the pause off), got {text!r}")
        return int(value * GIB)
    return min(GIB, psutil.virtual_memory().total // 20)


@dataclass(kw_only=True, slots=True)
class MemoryGuard:
    """Waits while the machine's available memory is under `threshold` bytes."""

    threshold: int
    interval: float = field(default_factory=lambda: POLL_SECONDS)
    """Seconds between two looks while waiting (one psutil call each); POLL_SECONDS as it is when
    the guard is built."""
    available: Callable[[], int] = lambda: psutil.virtual_memory().available

    def short(self) -> bool:
        return self.threshold > 0 and self.available() < self.threshold

    def wait(self, *, should_stop: Callable[[], bool]) -> str:
        """Sleep until memory is back ("running") or a stop is asked for ("stop")."""
        while self.short():
            if should_stop():
                return "stop"
            time.sleep(self.interval)
        return "running"
