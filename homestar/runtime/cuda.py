"""The CUDA device space: real GPU memory, copies on side streams, events for ordering.

Uploads (host -> GPU) run on one side stream, write-backs (GPU -> host) on another; compute
stays on the current stream. Ordering uses events and stream waits, never a device-wide sync;
the host blocks only on one chunk's event, right before it touches that chunk's host buffer.
Tensors used on a stream other than the one that allocated them are `record_stream`ed so the
caching allocator cannot hand their memory out early. Host buffers are pinned (see
`memory.HostMemory`); copies from pageable memory would be ~6x slower. This is the only module
that calls CUDA APIs; the rest of the runtime is shared with the simulated device.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from typing import Any

import torch

from homestar.runtime.memory import DeviceSpace, Stopwatch, budget_slack
from homestar.runtime.phases import PhaseClock

_ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"
_MAPPING_STEP = 20 << 20
"""Growable segments map device memory in steps of this size (torch's large-block size)."""


def cap_allocator(nbytes: int) -> None:
    """Make torch's caching allocator refuse memory beyond `nbytes`, as a card of that size
    would. The fraction is set one mapping step lower: growable segments map memory in 20 MiB
    steps and were seen holding a few MiB past the fraction (8.01 GiB reserved under a fraction
    of exactly 8 GiB, the 6.7b preset)."""
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, max(nbytes - _MAPPING_STEP, 0) / total))


class PinnedHost:
    """Page-locked host buffers of exactly the size asked for.

    Each buffer is its own anonymous mapping (page-aligned, so no two buffers share a page),
    registered with the driver (`cudaHostRegister`): copies from and to it run asynchronously at
    full PCIe speed, like torch's pinned memory, without that allocator's rounding to a power of
    two. Buffers stay registered until `unpin` or `close`; a tensor still viewing one afterwards
    keeps valid (then pageable) memory.
    """

    def __init__(self) -> None:
        self._registered: dict[int, int] = {}
        """Pointer -> bytes of each registered buffer."""

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = max(numel * dtype.itemsize, 1)
        region = mmap.mmap(-1, nbytes)  # anonymous, zero-filled, committed page by page
        out = torch.frombuffer(region, dtype=dtype, count=numel) if numel else torch.empty(0, dtype=dtype)
        if numel:
            # cost: a driver call that faults in and locks every page; once per buffer
            err = torch.cuda.cudart().cudaHostRegister(out.data_ptr(), nbytes, 0)
            if int(err) != 0:
                raise torch.OutOfMemoryError(
                    f"could not lock {nbytes / 2**20:.0f} MiB of pinned memory (cudaHostRegister error {int(err)})")
            self._registered[out.data_ptr()] = nbytes
        return out

    def unpin(self, tensor: torch.Tensor) -> None:
        if self._registered.pop(tensor.data_ptr(), None) is not None:
            torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())

    def close(self) -> None:
        for ptr in self._registered:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        self._registered.clear()


class CudaDevice(DeviceSpace):
    """GPU memory with chunk budgets, an upload stream and an offload stream."""

    def __init__(self, budget: int | None) -> None:
        if _ALLOC_CONF not in os.environ:
            # Chunks of hundreds of MiB allocated and freed on three streams fragment fixed
            # segments until a budget that holds them on paper fails (seen: the 2.7b preset at
            # 8 GiB, step 6); growable segments map pages as needed. Applies to new segments.
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")
        device = torch.device("cuda", torch.cuda.current_device())
        if budget is None:
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free) + torch.cuda.memory_allocated(device)
        super().__init__(device, budget)
        self.slack = budget_slack(budget)
        self._low = 0
        """Lowest chunk bytes since the window opened (chunks freed inside a window)."""
        self._reserved_peak = 0
        self.upload_stream = torch.cuda.Stream(device)
        self.offload_stream = torch.cuda.Stream(device)
        self._lane: CudaLane | None = None
        self.blocking_waits = True
        """The host sleeps in `host_wait` instead of spinning, leaving the core to other work (the
        CPU's AdamW runs beside the wait for the streamed one). Throughput is the same either way
        on the H200 (`bench/host_contention.py`, BENCHMARKS.md): host memory bounds both engines."""

    def _compute(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def fetch(self, src: torch.Tensor | None, numel: int, dtype: torch.dtype, after: Any) -> tuple[torch.Tensor, Any]:
        if src is None:
            # zeros allocated and filled on the compute stream: ordered before their use
            return self.alloc(numel, dtype, zero=True), None
        stream = self.upload_stream
        with torch.cuda.stream(stream):
            dev = self.alloc(numel, dtype)  # allocated on the upload stream
        # `after`: a pending write-back into src lands first
        return dev, _upload(stream, [(dev, src)], after, self.clock, self.blocking_waits)

    def upload_into(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], after: Any) -> Any:
        return _upload(self.upload_stream, pairs, after, self.clock, self.blocking_waits)

    def download_into(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], after: Any) -> Any:
        return _download(self.offload_stream, self._compute(), pairs, after, self.clock, self.blocking_waits)

    def lane(self) -> "CudaLane":
        if self._lane is None:
            self._lane = CudaLane(self)  # made once: its streams are reused by every step
        # stream wait, on the calling thread's compute stream: what the lane reads (grads,
        # steps, the clip coefficient, params updated in place) is written there first
        self._lane.compute.wait_stream(self._compute())
        return self._lane

    def join(self, lane: DeviceSpace) -> None:
        if lane is not self:
            self._compute().wait_stream(lane.compute)  # stream wait: the lane's kernels (and the uploads they waited for)

    def compute_wait(self, event: Any, tensor: torch.Tensor) -> None:
        _compute_wait(self._compute(), event, tensor)

    def host_wait(self, event: Any) -> None:
        if event is not None:
            event.synchronize()  # host sync on one chunk's transfer

    def done(self, event: Any) -> bool:
        return event is None or event.query()  # non-blocking query

    def free(self, tensor: torch.Tensor) -> None:
        super().free(tensor)
        self._low = min(self._low, self.used)

    def nonmodel_bytes(self) -> int:
        # host-side counters, no sync; the nested-dict query costs ~20 us where
        # torch.cuda.memory_allocated() flattens every statistic in Python (~0.3 ms).
        # Inactive split bytes are free pieces of segments still partly in use: the allocator
        # cannot give them back, so under a per-process memory cap they count as used.
        stats = torch.cuda.memory_stats_as_nested_dict(self.device)
        held = stats["allocated_bytes"]["all"]["current"] + stats["inactive_split_bytes"]["all"]["current"]
        return max(held - self.used, 0)

    def nonmodel_peak(self) -> int:
        # the allocator's peaks since `open_window` (one ~20 us query, no sync): catches the
        # transient peaks between two moments (logits and their grad in the head's backward,
        # a weight's grad before its hook, kernel workspaces). Chunk bytes did not grow inside
        # the window (the runtime allocates only at moments), so `_low` is what they were.
        stats = torch.cuda.memory_stats_as_nested_dict(self.device)
        self._reserved_peak = max(self._reserved_peak, stats["reserved_bytes"]["all"]["peak"])
        held = stats["allocated_bytes"]["all"]["peak"] + stats["inactive_split_bytes"]["all"]["peak"]
        return max(held - self._low, 0)

    def open_window(self) -> None:
        # resets torch's peak counters (max_memory_allocated/reserved): read `allocator_peak`
        # instead, which keeps the highest reserved figure across windows (`nonmodel_peak`,
        # always called before this, folded the closing window's figure in)
        torch.cuda.reset_peak_memory_stats(self.device)  # host-side counters, no sync
        self._low = self.used

    def allocator_peak(self) -> int:
        return max(self._reserved_peak, torch.cuda.max_memory_reserved(self.device))

    def allocator_held(self) -> int:
        return torch.cuda.memory_reserved(self.device)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)  # full sync: state export and close only


def _upload(stream: torch.cuda.Stream, pairs: list[tuple[torch.Tensor, torch.Tensor]], after: Any, clock,
            blocking: bool) -> Any:
    """Host -> device copies on `stream` once `after` completed; the event after them."""
    if after is not None:
        stream.wait_event(after)  # stream wait: whatever still reads or writes the dsts finishes first
    return _copies(stream, pairs, clock, "h2d", blocking)  # async H2D from pinned memory


def _download(stream: torch.cuda.Stream, compute: torch.cuda.Stream, pairs: list[tuple[torch.Tensor, torch.Tensor]],
              after: Any, clock, blocking: bool) -> Any:
    """Device -> host copies on `stream` once `compute`'s work so far and `after` completed."""
    stream.wait_stream(compute)  # stream wait: compute's writes to the srcs land first
    if after is not None:
        stream.wait_event(after)  # stream wait: e.g. an upload still reading a dst finishes first
    event = _copies(stream, pairs, clock, "d2h", blocking)  # async D2H into pinned memory
    for _, src in pairs:
        src.record_stream(stream)  # src's memory is not reused before the copy has read it
    return event


def _compute_wait(compute: torch.cuda.Stream, event: Any, tensor: torch.Tensor) -> None:
    if event is not None:
        compute.wait_event(event)  # stream wait, no host sync
        tensor.record_stream(compute)  # compute uses memory another stream allocated or wrote


def _copies(stream: torch.cuda.Stream, pairs: list[tuple[torch.Tensor, torch.Tensor]], clock, phase: str,
            blocking: bool) -> Any:
    """Queue the copies on `stream` and one event after them (one event, not one per copy)."""
    with torch.cuda.stream(stream):
        begin = clock.start(stream) if clock else None
        for dst, src in pairs:
            dst.copy_(src, non_blocking=True)
        if clock:
            clock.stop(phase, begin, stream)
        event = torch.cuda.Event(blocking=blocking)
        event.record(stream)
    return event


class CudaLane:
    """Streams of their own (upload, compute, offload) for work that another thread queues
    beside the device's compute: the streamed AdamW of a step, while the next forward runs on
    the current stream. Its kernels never queue ahead of that forward's, nor its copies ahead of
    the forward's fetches. Its copies are not timed by the phase clock (the clock is read while
    the lane may still be queuing). The device's compute joins it with `CudaDevice.join`."""

    def __init__(self, owner: CudaDevice) -> None:
        self.device = owner.device
        self._blocking = owner.blocking_waits
        self.upload = torch.cuda.Stream(owner.device)
        self.compute = torch.cuda.Stream(owner.device)
        self.offload = torch.cuda.Stream(owner.device)

    @contextlib.contextmanager
    def running(self):
        """Queue the calling thread's kernels on the lane's compute stream (behind the device's
        compute as it was when `CudaDevice.lane` gave out the lane)."""
        with torch.cuda.stream(self.compute):
            yield

    def upload_into(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], after: Any) -> Any:
        return _upload(self.upload, pairs, after, None, self._blocking)

    def download_into(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], after: Any) -> Any:
        return _download(self.offload, self.compute, pairs, after, None, self._blocking)

    def compute_wait(self, event: Any, tensor: torch.Tensor) -> None:
        _compute_wait(self.compute, event, tensor)

    def stopwatch(self) -> Stopwatch:
        # the lane's work starts with its first upload and ends with its last write-back
        return Stopwatch(PhaseClock(cuda=True), self.upload, self.offload)
