"""Warm-up traces: the order chunks are used in, and the non-model memory at each moment.

The first run of a kind of work (train micro-batch of a shape, eval of a shape, optimizer step)
records every chunk access ("moment") and the device's non-model bytes at it. Later runs of the
same work replay the trace: eviction asks how far away a chunk's next use is, prefetch asks
which chunks come next, the budget asks how much non-model memory is coming. Work of a new
shape records a new trace; a run that strays from its trace drops it and is recorded again.
Knows nothing of memory spaces, chunks' contents or models.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Hashable

INF = float("inf")


@dataclass(slots=True)
class Trace:
    """One recorded run: chunk id and non-model bytes per access position."""

    key: Hashable
    ids: list[int] = field(default_factory=list)
    nonmodel: list[int] = field(default_factory=list)
    uses: dict[int, list[int]] = field(default_factory=dict)
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
        return max(self.nonmodel, default=0)


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

    def begin(self, key: Hashable | None) -> None:
        """Start a run of work `key` (None: untraced work such as a direct model call)."""
        self.pos = 0
        if key is None:
            self.current, self.recording = None, False
        elif key in self.traces:
            self.current, self.recording = self.traces[key], False
        else:
            self.current, self.recording = Trace(key=key), True

    def end(self) -> Trace | None:
        """Finish the run; returns the trace if this run recorded a new one."""
        new = self.current if self.recording else None
        if new is not None:
            self.traces[new.key] = new
        self.current, self.recording, self.pos = None, False, 0
        return new

    def abandon(self) -> None:
        """Drop a run that failed half-way without keeping its partial trace."""
        self.current, self.recording, self.pos = None, False, 0

    def access(self, chunk_id: int, nonmodel: int) -> None:
        """Note that a chunk is being used now."""
        self.clock += 1
        trace = self.current
        if trace is None:
            return
        if self.recording:
            trace.add(chunk_id, nonmodel)
            self.pos = len(trace.ids)
            return
        at = trace.next_use(chunk_id, self.pos)
        if at is None:  # the run strayed from its trace: forget it, record afresh next time
            self.traces.pop(trace.key, None)
            self.current = None
            return
        trace.nonmodel[at] = max(trace.nonmodel[at], nonmodel)
        self.pos = at + 1

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
        ahead = self.current.nonmodel[max(self.pos - 1, 0) : self.pos + self.window]
        return max(ahead, default=0)
