"""Where a step's time goes: forward, backward and the copies each way, measured without syncs.

On CUDA each span is a pair of timing events recorded on the stream that does the work (compute
for forward and backward, the upload stream for host-to-device copies, the offload stream for
write-backs); `take` reads them once the caller has synchronised. On the simulated device the
host clock times the same spans (its copies are synchronous). Copy spans add up the time each
direction's stream was busy, so against forward+backward they show whether PCIe bounds a step.
Off unless switched on: an event pair per copy is cheap, not free. Knows nothing of chunks.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import torch


class PhaseClock:
    """Spans of named phases; `take` sums their seconds by name and starts afresh."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._spans: list[tuple[str, Any, Any]] = []

    def start(self, stream: Any = None) -> Any:
        """A mark on `stream` (CUDA) or the host clock, to end a span with `stop`."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)  # no sync: a marker in the stream's queue
        return event

    def stop(self, name: str, begin: Any, stream: Any = None) -> Any:
        """End the span started at `begin` under `name`; returns a mark usable as the next start."""
        end = self.start(stream)
        self._spans.append((name, begin, end))
        return end

    def take(self) -> dict[str, float]:
        """Seconds per phase since the last call. On CUDA every span's events must be complete
        (call after a synchronise): reading one waits for it otherwise."""
        out: dict[str, float] = defaultdict(float)
        for name, begin, end in self._spans:
            out[name] += begin.elapsed_time(end) * 1e-3 if self.cuda else end - begin  # ms on CUDA
        self._spans.clear()
        return dict(out)
