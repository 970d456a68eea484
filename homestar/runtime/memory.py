"""Memory spaces: where chunk bytes live, what they cost, and how they move.

A space allocates plain tensors and keeps the books (bytes in use, peak, budget). The host space
pools its buffers: once allocated (pinned, on a CUDA machine) a buffer is reused, never freed
before `close`. A device space also owns the copy primitive between it and the host: the
simulated device here copies synchronously inside CPU memory; `cuda.CudaDevice` uses side
streams and events. Everything above this module is the same for both. Knows nothing of chunks'
meaning, models or training.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any

import torch

from homestar.errors import BudgetError
from homestar.runtime.phases import PhaseClock

GIB = float(1 << 30)


def budget_slack(budget: int) -> int:
    """Bytes of a CUDA budget left to the caching allocator beyond what the runtime counts:
    1/32 of it, at least 64 MiB and at most 1 GiB. What the runtime counts (chunks, activations,
    free pieces of partly used segments) can sit within a few MiB of the cap while the
    allocator's reserved memory, which the cap limits, is a little higher (seen: the 4b preset
    under an 8 GiB cap ran out of memory in its second step with 7.87 GiB counted and a 5%
    margin over its activations)."""
    return min(max(budget // 32, 64 << 20), 1 << 30)


def fmt_bytes(nbytes: float) -> str:
    return f"{nbytes / GIB:.3f} GiB" if nbytes >= (1 << 26) else f"{nbytes / (1 << 20):.2f} MiB"


class MemorySpace:
    """Byte accounting for one kind of memory, with an optional budget."""

    name = "cpu"

    def __init__(self, device: torch.device, budget: int | None) -> None:
        self.device = device
        self.budget = budget
        self.used = 0
        self.peak = 0

    def room(self, reserve: int = 0) -> float:
        """Bytes still allocatable while keeping `reserve` bytes free for others."""
        return float("inf") if self.budget is None else self.budget - reserve - self.used

    def alloc(self, numel: int, dtype: torch.dtype, *, zero: bool = False) -> torch.Tensor:
        nbytes = numel * dtype.itemsize
        self._charge(nbytes)
        try:
            out = self._new(numel, dtype)
        except BaseException:
            self.used -= nbytes  # nothing was allocated (a device out of memory): the books stay true
            raise
        return out.zero_() if zero else out

    def free(self, tensor: torch.Tensor) -> None:
        self.used -= tensor.numel() * tensor.element_size()

    def _charge(self, nbytes: int) -> None:
        if self.budget is not None and self.used + nbytes > self.budget:
            raise BudgetError(
                f"{self.name} budget of {fmt_bytes(self.budget)} exceeded: "
                f"{fmt_bytes(self.used)} in use, {fmt_bytes(nbytes)} more needed"
            )
        self.used += nbytes
        self.peak = max(self.peak, self.used)

    def _new(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype, device=self.device)


class HostMemory(MemorySpace):
    """Host memory for chunks; buffers are pooled and reused (pinned when `pin`).

    Pinned buffers are page-locked at their exact size (`cuda.PinnedHost`), not through torch's
    caching host allocator, which rounds every allocation up to a power of two: for chunk sizes
    just above one, that nearly doubled the host memory of a run."""

    name = "cpu"

    def __init__(self, budget: int | None, *, pin: bool) -> None:
        super().__init__(torch.device("cpu"), budget)
        self.pin = pin
        self._pool: dict[tuple[int, torch.dtype], list[torch.Tensor]] = defaultdict(list)
        self._pinned = None
        if pin:
            from homestar.runtime.cuda import PinnedHost  # CUDA-only code stays out of CPU runs

            self._pinned = PinnedHost()

    def alloc(self, numel: int, dtype: torch.dtype, *, zero: bool = False) -> torch.Tensor:
        pooled = self._pool[(numel, dtype)]
        out = pooled.pop() if pooled else super().alloc(numel, dtype)
        return out.zero_() if zero else out

    def free(self, tensor: torch.Tensor) -> None:
        """Return a buffer to the pool; it stays allocated (and counted) for reuse."""
        self._pool[(tensor.numel(), tensor.dtype)].append(tensor)

    def release(self, tensor: torch.Tensor) -> None:
        """Give a buffer back for good (its bytes stop counting against the budget)."""
        super().free(tensor)
        if self._pinned is not None:
            self._pinned.unpin(tensor)

    def close(self) -> None:
        self._pool.clear()
        if self._pinned is not None:
            self._pinned.close()
        self.used = 0

    def _new(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if self._pinned is not None:
            return self._pinned.empty(numel, dtype)
        return torch.empty(numel, dtype=dtype)


class DeviceSpace(MemorySpace):
    """The compute side: allocation plus the copy primitive to and from the host.

    Events are opaque: None means "already complete". `fetch` and `write_back` take the event
    of the chunk's last transfer (`after`) and order themselves behind it.
    """

    name = "gpu"
    clock = None
    """A `phases.PhaseClock` timing every copy ("h2d", "d2h"), when one is set."""
    slack = 0
    """Bytes of the budget the runtime never plans into (CUDA: the caching allocator's own
    rounding and fragmentation, see `budget_slack`); 0 on the simulated device."""

    def room(self, reserve: int = 0) -> float:
        return super().room(reserve + self.slack)

    @property
    def usable(self) -> float:
        """The budget less the slack: what device homes may fill (inf without a budget)."""
        return float("inf") if self.budget is None else float(self.budget - self.slack)

    def fetch(self, src: torch.Tensor | None, numel: int, dtype: torch.dtype, after: Any) -> tuple[torch.Tensor, Any]:
        """A new device tensor holding `src` (a host buffer), or zeros when `src` is None."""
        raise NotImplementedError

    def write_back(self, dev: torch.Tensor, host: torch.Tensor, after: Any) -> Any:
        """Copy a device tensor into its host buffer; returns the copy's event."""
        return self.download_into([(host, dev)], after)

    def upload_into(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], after: Any) -> Any:
        """Copy each (device dst, host src) pair once `after` completed; returns one event for
        them all (compute must `compute_wait` on it before reading a dst)."""
        raise NotImplementedError

    def download_into(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], after: Any) -> Any:
        """Copy each (host dst, device src) pair once compute's work so far and `after`
        completed; returns one event for them all."""
        raise NotImplementedError

    def compute_wait(self, event: Any, tensor: torch.Tensor) -> None:
        """Make compute wait for `event` before it uses `tensor` (no host sync)."""

    def host_wait(self, event: Any) -> None:
        """Block the host until `event` completes (a sync: call only before host access)."""

    def done(self, event: Any) -> bool:
        return event is None

    def nonmodel_bytes(self) -> int:
        """Device bytes in use that are not chunks (activations, workspace)."""
        return 0

    def nonmodel_peak(self) -> int:
        """Highest non-model bytes since the last `open_window` (at least those in use now):
        what a moment charges for the time since the previous one."""
        return self.nonmodel_bytes()

    def open_window(self) -> None:
        """Start a new window for `nonmodel_peak`, after the runtime's own allocations."""

    def allocator_peak(self) -> int:
        """Highest memory the device allocator held (0 when it does not say)."""
        return 0

    def allocator_held(self) -> int:
        """Memory the device allocator holds now (0 when it does not say)."""
        return 0

    def synchronize(self) -> None:
        """Wait for all queued device work (used at close and for state export)."""

    def lane(self) -> "DeviceSpace":
        """Copies and kernels for work another thread queues beside this thread's compute (the
        streamed AdamW beside the next forward): `upload_into`, `download_into`, `compute_wait`
        and `running()` (the context its kernels run in), on streams of their own where the
        device has streams, ordered behind the calling thread's compute so far (call it on the
        thread whose compute the lane follows). Here, where copies are synchronous: this device
        itself."""
        return self

    @contextlib.contextmanager
    def running(self):
        """The context a lane's kernels are queued in (see `lane`)."""
        yield

    def stopwatch(self) -> "Stopwatch":
        """Started now: times the work queued from here on until its `stop` (see `Stopwatch`).
        Here, where copies and kernels run as they are queued: the host clock."""
        return Stopwatch(PhaseClock(cuda=False))

    def join(self, lane: "DeviceSpace") -> None:
        """Order this device's later compute behind everything `lane` has queued (no host sync)."""

    def close(self) -> None:
        self.used = 0


class Stopwatch:
    """How long a device (or lane) took for the work queued between start and `stop`, on a
    `PhaseClock`: the host's clock, or on CUDA timing events on the streams where the work
    starts (`first`) and ends (`last`); read `seconds` once that work is known to be done."""

    def __init__(self, clock: PhaseClock, first: Any = None, last: Any = None) -> None:
        self._clock, self._last, self._end = clock, last, None
        self._begin = clock.start(first)

    def stop(self) -> None:
        self._end = self._clock.stop("work", self._begin, self._last)

    def seconds(self) -> float:
        if self._end is None:
            return 0.0
        if self._clock.cuda:
            self._end.synchronize()  # sync: read once the work is known done; returns at once then
        return self._clock.take()["work"]


class SimulatedDevice(DeviceSpace):
    """A device memory space simulated in CPU memory: budgets and copies are real, speed is not.

    Only chunks are charged here (activations live in ordinary CPU memory), so the accounted bytes
    are exactly the resident chunks, plus what `simulate_nonmodel` says non-model memory is (tests
    play activations rising and falling between moments with it).
    """

    def __init__(self, budget: int | None) -> None:
        super().__init__(torch.device("cpu"), budget)
        self.simulated = 0
        self._window_peak = 0
        self.overrun = 0
        """Largest excess of chunks plus simulated non-model bytes over the budget seen."""

    def simulate_nonmodel(self, nbytes: int) -> None:
        """Pretend `nbytes` of non-model memory are in use from now on."""
        self.simulated = nbytes
        self._window_peak = max(self._window_peak, nbytes)
        if self.budget is not None:
            self.overrun = max(self.overrun, self.used + nbytes - self.budget)

    def _charge(self, nbytes: int) -> None:
        super()._charge(nbytes)
        if self.budget is not None:
            self.overrun = max(self.overrun, self.used + self.simulated - self.budget)

    def nonmodel_bytes(self) -> int:
        return self.simulated

    def nonmodel_peak(self) -> int:
        return max(self._window_peak, self.simulated)

    def open_window(self) -> None:
        self._window_peak = self.simulated

    def fetch(self, src: torch.Tensor | None, numel: int, dtype: torch.dtype, after: Any) -> tuple[torch.Tensor, Any]:
        dev = self.alloc(numel, dtype, zero=src is None)
        if src is not None:
            self._copies([(dev, src)], "h2d")
        return dev, None

    def upload_into(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], after: Any) -> Any:
        return self._copies(pairs, "h2d")

    def download_into(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], after: Any) -> Any:
        return self._copies(pairs, "d2h")

    def _copies(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], phase: str) -> None:
        begin = self.clock.start() if self.clock else None
        for dst, src in pairs:
            dst.copy_(src)  # synchronous copies between the two simulated spaces
        if self.clock:
            self.clock.stop(phase, begin)


