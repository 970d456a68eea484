"""Warm-up traces: the order chunks are used in, and the non-model memory at each moment.

The first run of a kind of work (train micro-batch of a shape, eval of a shape, optimizer step)
records every chunk access ("moment") and the device's non-model bytes at it: the highest
figure since the previous moment (the device space keeps the peak of each window, so transient
peaks between moments, like the logits' backward, are in the trace), and after the last moment
the tail of the run. Later runs of the same work replay the trace: eviction asks how far away a
chunk's next use is, prefetch asks which chunks come next, the budget asks how much non-model
memory is coming. The first `SAMPLED_REPLAYS` replays still sample (raising a figure that came
out higher); after that sampling stops, as it costs an allocator query per moment. Work of a
new shape records a new trace; a run that strays from its trace drops it and is recorded again.
Knows nothing of memory spaces, chunks' contents or models.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Hashable

INF = float("inf")
SAMPLED_REPLAYS = 2
"""Replays of a trace that still sample non-model memory (to catch a figure above the first)."""


@dataclass(slots=True)
class Trace:
    """One recorded run: chunk id and non-model bytes per access position."""

    key: Hashable
    ids: list[int] = field(default_factory=list)
    nonmodel: list[int] = field(default_factory=list)
    uses: dict[int, list[int]] = field(default_factory=dict)
    tail: int = 0
    """Highest non-model bytes after the last moment, until the run ended."""
    replays: int = 0
    _reserve: list[int] | None = None
    """reserve() per position, built once the figures stop changing (sampling ended)."""
    _ahead: dict[tuple[int, int], list[int]] = field(default_factory=dict)

    def add(self, chunk_id: int, nonmodel: int) -> None:
        self.uses.setdefault(chunk_id, []).append(len(self.ids))
        self.ids.append(chunk_id)
        self.nonmodel.append(nonmodel)

    def next_use(self, chunk_id: int, pos: int) -> int | None:
        """First position >= pos at which the chunk is used, or None."""
        positions = self.uses.get(chunk_id)
        if not positions:
            return None
        i = bisect_left(positions, pos)
        return positions[i] if i < len(positions) else None

    def lookahead(self, pos: int, depth: int, scan: int) -> list[int]:
        """The first `depth` distinct chunk ids from `pos` on (memoised: traces are replayed)."""
        key = (pos, depth)
        if key not in self._ahead:
            found: list[int] = []
            for chunk_id in self.ids[pos : pos + scan]:
                if chunk_id not in found:
                    found.append(chunk_id)
                    if len(found) == depth:
                        break
            self._ahead[key] = found
        return self._ahead[key]

    @property
    def peak_nonmodel(self) -> int:
        return max(max(self.nonmodel, default=0), self.tail)


class Tracer:
    """Records traces per work key and replays them, tracking the current position."""

    def __init__(self, window: int = 4) -> None:
        self.traces: dict[Hashable, Trace] = {}
        self.window = window
        """How many upcoming moments' non-model memory the budget reserves for."""
        self.current: Trace | None = None
        self.recording = False
        self.pos = 0
        self.clock = 0
        """Accesses ever made; the LRU fallback orders chunks by it."""
        self.run_peak = 0
        """Highest non-model bytes sampled in the current run."""

    def begin(self, key: Hashable | None) -> None:
        """Start a run of work `key` (None: untraced work such as a direct model call)."""
        self.pos, self.run_peak = 0, 0
        if key is None:
            self.current, self.recording = None, False
        elif key in self.traces:
            self.current, self.recording = self.traces[key], False
            self.current.replays += 1
        else:
            self.current, self.recording = Trace(key=key), True

    @property
    def sampling(self) -> bool:
        """True while moments should measure non-model memory (see the module docstring)."""
        return self.current is None or self.recording or self.current.replays <= SAMPLED_REPLAYS

    def end(self, tail: int | None = None) -> Trace | None:
        """Finish the run (`tail`: non-model peak after the last moment); returns the trace if
        this run recorded a new one."""
        if self.current is not None and tail is not None:
            self.current.tail = max(self.current.tail, tail)
        new = self.current if self.recording else None
        if new is not None:
            self.traces[new.key] = new
        self.current, self.recording, self.pos = None, False, 0
        return new

    def abandon(self) -> None:
        """Drop a run that failed half-way without keeping its partial trace."""
        self.current, self.recording, self.pos = None, False, 0

    def access(self, chunk_id: int, nonmodel: int | None) -> None:
        """Note that a chunk is being used now (`nonmodel`: the sample, None when not sampling)."""
        self.clock += 1
        if nonmodel is not None and nonmodel > self.run_peak:
            self.run_peak = nonmodel
        trace = self.current
        if trace is None:
            return
        if self.recording:
            trace.add(chunk_id, nonmodel or 0)
            self.pos = len(trace.ids)
            return
        at = trace.next_use(chunk_id, self.pos)
        if at is None:  # the run strayed from its trace: forget it, record afresh next time
            self.traces.pop(trace.key, None)
            self.current = None
            return
        if nonmodel is not None and nonmodel > trace.nonmodel[at]:
            trace.nonmodel[at] = nonmodel
        self.pos = at + 1

    def expected(self) -> int:
        """The non-model bytes the trace recorded for the moment just replayed (0 untraced)."""
        if not self.replaying or self.pos == 0:
            return 0
        return self.current.nonmodel[self.pos - 1]

    @property
    def replaying(self) -> bool:
        return self.current is not None and not self.recording

    def distance(self, chunk_id: int) -> float:
        """Accesses until the chunk's next use in this run (INF: not again, or unknown)."""
        if not self.replaying:
            return INF
        at = self.current.next_use(chunk_id, self.pos)
        return INF if at is None else at - self.pos

    def upcoming(self, depth: int, scan: int = 256) -> list[int]:
        """The next `depth` distinct chunk ids of the replayed trace (looking `scan` moments ahead)."""
        if not self.replaying or depth <= 0:
            return []
        return self.current.lookahead(self.pos, depth, scan)

    def reserve(self) -> int | None:
        """Non-model bytes the coming moments need (None when no trace is replayed)."""
        if not self.replaying:
            return None
        trace = self.current
        if trace.replays > SAMPLED_REPLAYS:  # figures final: one list lookup per moment
            if trace._reserve is None:
                trace._reserve = [self._window_max(trace, pos) for pos in range(len(trace.ids) + 1)]
            return trace._reserve[self.pos]
        return self._window_max(trace, self.pos)

    def _window_max(self, trace: Trace, pos: int) -> int:
        ahead = max(trace.nonmodel[max(pos - 1, 0) : pos + self.window], default=0)
        return max(ahead, trace.tail) if pos + self.window >= len(trace.ids) else ahead
