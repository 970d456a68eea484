"""Fault injection for crash tests: environment variables that make a run fail at a chosen moment.

- `HOMESTAR_TEST_KILL_AT="<place>:<n>"`: the process SIGKILLs itself the n-th time it reaches
  `place`, one of PLACES ("micro-batch": after a backward, before the optimizer step;
  "step": after an optimizer step, before its event is logged; "checkpoint-file": between two
  files of a checkpoint being written; "checkpoint-commit": after a checkpoint is renamed into
  place, before older ones are pruned; "event": half-way through writing a metrics.jsonl line).
- `HOMESTAR_TEST_OOM_AT_STEP=N`: once, after the last micro-batch of optimizer step N (counted
  from 1) has run its backward, raise torch.OutOfMemoryError as if the GPU had run out.
- `HOMESTAR_TEST_SQUEEZE_AT_STEP="N"` or `"N:FRACTION"` (default 0.5): at the start of optimizer
  step N, take GPU memory away with one plain tensor kept for the rest of the process, so that
  only FRACTION of what earlier steps of this process needed above their resting memory stays
  allocatable, and the next forward/backward really fails to allocate (the arithmetic is in
  `allocatable_bytes` and `squeeze_bytes`). N >= 2, and not the first step the process trains
  (nothing measured yet); CUDA runs only (a ConfigError on the CPU).

Read once, when a trainer starts (`arm_from_env`); unset, every check is one comparison. Knows
nothing of models, engines or files.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from typing import Callable

from homestar.errors import ConfigError

PLACES = ("micro-batch", "step", "checkpoint-file", "checkpoint-commit", "event")
KILL_ENV = "HOMESTAR_TEST_KILL_AT"
OOM_ENV = "HOMESTAR_TEST_OOM_AT_STEP"
SQUEEZE_ENV = "HOMESTAR_TEST_SQUEEZE_AT_STEP"
DEFAULT_SQUEEZE_FRACTION = 0.5
GIB = 2**30
_SEGMENT_ROUND = 2 * 2**20
"""The CUDA caching allocator rounds large allocations to 2 MiB: a squeeze of a multiple of it
is charged exactly its size against the per-process cap."""


@dataclass(kw_only=True, slots=True)
class Squeeze:
    """A planned squeeze of GPU memory and what the steps before it were seen to need."""

    step: int
    """Optimizer step (counted from 1) at whose start the memory is taken."""
    fraction: float = DEFAULT_SQUEEZE_FRACTION
    """Share of the measured step headroom left allocatable after the squeeze, in [0, 1)."""
    headroom: int = 0
    """Most GPU memory an earlier step needed above its resting memory (bytes), as the engine
    reported it (its peak less its memory at the step's end)."""
    seen: int = 0
    """Earlier steps of this process whose need was reported."""

    def __post_init__(self) -> None:
        if self.step < 2:
            raise ConfigError(f"{SQUEEZE_ENV} needs a step of 2 or more: the squeeze is sized from "
                              f"the memory earlier steps needed, got step {self.step}")
        if not 0.0 <= self.fraction < 1.0:
            raise ConfigError(f"{SQUEEZE_ENV}: the fraction left allocatable must be in [0, 1), got {self.fraction}")


_kill_place: str | None = None
_kill_left = 0
_oom_step: int | None = None
_squeeze: Squeeze | None = None
_squeezed: list = []
"""The tensors a squeeze took: held for the rest of the process."""


def arm_from_env() -> None:
    """Read the variables (a malformed value is a ConfigError, not a silent no-op)."""
    global _kill_place, _kill_left, _oom_step, _squeeze
    _kill_place, _kill_left, _oom_step, _squeeze = None, 0, None, None
    kill = os.environ.get(KILL_ENV, "").strip()
    if kill:
        place, _, count = kill.partition(":")
        if place not in PLACES or not count.isdecimal() or int(count) < 1:
            raise ConfigError(f"{KILL_ENV} must be PLACE:N with PLACE one of {', '.join(PLACES)}, got {kill!r}")
        _kill_place, _kill_left = place, int(count)
    oom = os.environ.get(OOM_ENV, "").strip()
    if oom:
        if not oom.isdecimal() or int(oom) < 1:
            raise ConfigError(f"{OOM_ENV} must be a step number, got {oom!r}")
        _oom_step = int(oom)
    squeeze = os.environ.get(SQUEEZE_ENV, "").strip()
    if squeeze:
        _squeeze = parse_squeeze(squeeze)


def parse_squeeze(text: str) -> Squeeze:
    """"N" or "N:FRACTION" -> Squeeze (ConfigError when malformed)."""
    step, colon, fraction = text.strip().partition(":")
    try:
        if not step.strip().isdecimal():  # isdigit() would pass '²', which int() refuses
            raise ValueError(step)
        value = float(fraction) if colon else DEFAULT_SQUEEZE_FRACTION
    except ValueError:
        raise ConfigError(f"{SQUEEZE_ENV} must be STEP or STEP:FRACTION (e.g. 6 or 6:0.5), got {text!r}") from None
    return Squeeze(step=int(step), fraction=value)


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


def allocatable_bytes(*, cap: int, reserved: int, allocated: int, device_free: int) -> tuple[int, int]:
    """(fresh, allocatable): the bytes new segments can still get, and all the bytes allocations can
    still get, read after torch.cuda.empty_cache().

    The caching allocator refuses a new segment when reserved + size > cap (cap = the device's
    total_memory times the per-process fraction; the whole card when none is set), and the driver
    cannot give more than `device_free`: fresh = min(cap - reserved, device_free). Free pieces of
    segments that still hold live blocks (reserved - allocated, once empty_cache has returned every
    wholly free segment) can be handed out too: allocatable = fresh + (reserved - allocated)."""
    fresh = max(min(cap - reserved, device_free), 0)
    return fresh, fresh + max(reserved - allocated, 0)


def squeeze_bytes(*, fresh: int, allocatable: int, headroom: int, fraction: float) -> int:
    """Bytes to take so that only `fraction` of `headroom` stays allocatable:
    allocatable - fraction * headroom, at most `fresh` (the squeeze is one new segment), rounded
    down to the allocator's 2 MiB granularity (so it is charged exactly its size); 0 when the
    card is already that tight."""
    take = min(allocatable - int(fraction * headroom), fresh)
    return max(take, 0) // _SEGMENT_ROUND * _SEGMENT_ROUND


def maybe_squeeze(step: int, device: str, needed: int | None) -> None:
    """At the start of optimizer step `step` (counted from 1): note `needed`, what the previous
    step needed above its resting memory (None: no step before it in this process), and on the
    chosen step take GPU memory away for good. The figure comes from the engine's own report:
    engines reset torch's peak counters as they measure, so those cannot be read here.
    Unset: one comparison. Cost when set: on the chosen step an empty_cache (a device
    synchronisation) and one allocation."""
    global _squeeze
    if _squeeze is None:
        return
    if not device.startswith("cuda"):
        raise ConfigError(f"{SQUEEZE_ENV} squeezes GPU memory and needs a CUDA run; this run trains on {device}")
    spec = _squeeze
    if needed is not None:
        spec.headroom = max(spec.headroom, needed)
        spec.seen += 1
    if step < spec.step:
        return
    _squeeze = None
    if step > spec.step:
        return  # resumed past it
    if spec.seen == 0:
        raise ConfigError(f"{SQUEEZE_ENV}={spec.step}: step {step} is the first this process trains, so there is "
                          "no earlier step to size the squeeze from; pick a later step")
    _take_gpu_memory(spec)


def _take_gpu_memory(spec: Squeeze) -> None:
    import torch

    torch.cuda.empty_cache()  # note: device sync; cached free segments would otherwise hide the squeeze
    index = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    cap = int(torch.cuda.get_per_process_memory_fraction(index) * total)  # as the allocator computes it
    reserved, allocated = torch.cuda.memory_reserved(index), torch.cuda.memory_allocated(index)
    device_free, _ = torch.cuda.mem_get_info(index)
    fresh, allocatable = allocatable_bytes(cap=cap, reserved=reserved, allocated=allocated, device_free=device_free)
    take = squeeze_bytes(fresh=fresh, allocatable=allocatable, headroom=spec.headroom, fraction=spec.fraction)
    if take:
        _squeezed.append(_hold(take, index))
    print(f"homestar: {SQUEEZE_ENV}: took {take / GIB:.2f} GiB of GPU memory at the start of step {spec.step}; "
          f"{(allocatable - take) / GIB:.2f} GiB stays allocatable under the {cap / GIB:.2f} GiB cap "
          f"({spec.fraction:g} of the {spec.headroom / GIB:.2f} GiB earlier steps needed above their resting memory)",
          file=sys.stderr)


def _hold(nbytes: int, index: int):
    """One plain device tensor of `nbytes` (a new segment; allocated, never written)."""
    import torch

    return torch.empty(nbytes, dtype=torch.uint8, device=torch.device("cuda", index))
