"""Fault injection for crash tests: environment variables that make a run fail at a chosen moment.

- `HOMESTAR_TEST_KILL_AT="<place>:<n>"`: the process SIGKILLs itself the n-th time it reaches
  `place`, one of PLACES ("micro-batch": after a backward, before the optimizer step;
  "step": after an optimizer step, before its event is logged; "checkpoint-file": between two
  files of a checkpoint being written; "checkpoint-commit": after a checkpoint is renamed into
  place, before older ones are pruned; "event": half-way through writing a metrics.jsonl line).
- `HOMESTAR_TEST_OOM_AT_STEP=N`: once, after the last micro-batch of optimizer step N (counted
  from 1) has run its backward, raise torch.OutOfMemoryError as if the GPU had run out.

Read once, when a trainer starts (`arm_from_env`); unset, every check is one comparison. Knows
nothing of models, engines or files.
"""

from __future__ import annotations

import os
import signal
from typing import Callable

from homestar.errors import ConfigError

PLACES = ("micro-batch", "step", "checkpoint-file", "checkpoint-commit", "event")
KILL_ENV = "HOMESTAR_TEST_KILL_AT"
OOM_ENV = "HOMESTAR_TEST_OOM_AT_STEP"

_kill_place: str | None = None
_kill_left = 0
_oom_step: int | None = None


def arm_from_env() -> None:
    """Read the two variables (a malformed value is a ConfigError, not a silent no-op)."""
    global _kill_place, _kill_left, _oom_step
    _kill_place, _kill_left, _oom_step = None, 0, None
    kill = os.environ.get(KILL_ENV, "").strip()
    if kill:
        place, _, count = kill.partition(":")
        if place not in PLACES or not count.isdigit() or int(count) < 1:
            raise ConfigError(f"{KILL_ENV} must be PLACE:N with PLACE one of {', '.join(PLACES)}, got {kill!r}")
        _kill_place, _kill_left = place, int(count)
    oom = os.environ.get(OOM_ENV, "").strip()
    if oom:
        if not oom.isdigit() or int(oom) < 1:
            raise ConfigError(f"{OOM_ENV} must be a step number, got {oom!r}")
        _oom_step = int(oom)


def reach(place: str, before_kill: Callable[[], None] | None = None) -> None:
    """Count one arrival at `place`; on the chosen one, run `before_kill` and die by SIGKILL."""
    global _kill_left
    if _kill_place != place:
        return
    _kill_left -= 1
    if _kill_left == 0:
        if before_kill is not None:
            before_kill()
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_oom(step: int) -> None:
    """Raise the injected out-of-memory error once, in optimizer step `step` (counted from 1)."""
    global _oom_step
    if _oom_step is not None and _oom_step == step:
        _oom_step = None
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {OOM_ENV} at step {step})")
