"""A step's AdamW still running after the step returned, beside the next forward.

The CPU's groups update on a worker thread, the streamed groups are queued by a streamer thread
on the device's lane (`DeviceSpace.lane`). This is their shared book: which groups the step
still holds, which ones each thread is past (written, or queued with the event later users wait
for), the threads' futures and what must outlive them (the lane, the staging ring, the clip
coefficient the lane reads). Thread-safe as used: each thread only marks its own groups; the
thread that owns the placement reads the marks. Knows nothing of AdamW's maths or placement.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(slots=True)
class StepInFlight:
    """The books of one step's updates in flight."""

    holding: dict[int, tuple[Any, list]] = field(default_factory=dict)
    """Group index -> (group, its active params' infos): state chunks the step still holds."""
    finished: dict[int, threading.Event] = field(default_factory=dict)
    """Group index -> set once its thread is past it (also when that thread failed)."""
    updated: dict[int, Any] = field(default_factory=dict)
    """Group index -> what later users of its chunks wait for (an event of the lane; None:
    nothing). A finished group missing here was not updated: its thread failed."""
    futures: list[Future] = field(default_factory=list)
    lane: Any = None
    ring: Any = None
    """The streamed update's staging ring: closed once the device's compute joined the lane."""
    coef: torch.Tensor | None = None
    """The clip coefficient the lane reads: kept alive until the lane is joined."""
    by_group: dict[int, list] = field(default_factory=dict)
    """The step's active parameters by group: their grads are let go when the update ends."""
    returned: bool = False
    """The step has returned (from then on a shortage of device room may end the update early)."""
    cpu_elems: int = 0
    streamed_elems: int = 0
    """Elements of the groups the CPU updates and of those streamed through the device."""
    cpu_seconds: float = 0.0
    """The CPU worker's time over its groups (set when it ends)."""
    stopwatch: Any = None
    """The streamed update's time on the device (`DeviceSpace.stopwatch`; set once queued)."""

    def hold(self, group, infos: list) -> None:
        """`group`'s state chunks are held for an update that a thread will mark."""
        self.holding[group.index] = (group, infos)
        self.finished[group.index] = threading.Event()

    def mark(self, index: int, after: Any = None) -> None:
        """(On the updating thread.) Group `index` is updated, or queued: later users wait for `after`."""
        self.updated[index] = after
        self.finished[index].set()

    def release_waiters(self, indices) -> None:
        """(On the updating thread, as it ends, failed or not.) Nobody waits on these any longer."""
        for index in indices:
            self.finished[index].set()

    def wait_for(self, index: int, block: bool) -> bool:
        """Whether group `index`'s thread is past it; waits for that when `block`."""
        finished = self.finished[index]
        if block:
            finished.wait()  # sync: the worker wrote this group's update, or the streamer queued it
        return finished.is_set()

    def wait_threads(self) -> None:
        """Wait for every thread; re-raises the first error one raised."""
        wait(self.futures)  # sync: every thread is done with the chunks it was given
        for future in self.futures:
            future.result()
