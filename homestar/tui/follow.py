"""Following a run's metrics.jsonl as it grows: only the bytes appended since the last read.

Knows the file format (one JSON object per line, the last line possibly cut mid-write) and nothing
of what the events mean or of the UI. A file replaced or shortened under us (a resume rewrites
the log atomically to drop redone steps) is noticed and read again from the start.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

READ_LIMIT = 8 << 20
"""Most bytes taken per call, so attaching to a long run streams its history in slices."""


@dataclass(kw_only=True, slots=True)
class Batch:
    """What one read found: new events, and whether earlier ones must be forgotten first."""

    events: list[dict] = field(default_factory=list)
    reset: bool = False
    more: bool = False
    """True when READ_LIMIT stopped the read before the end of the file."""


class MetricsFollower:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._offset = 0
        self._tail = b""
        self._identity: tuple[int, int] | None = None

    def read_new(self) -> Batch:
        """Events appended since the last call; one open, one fstat and one read (no re-reading)."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return Batch()
        with f:
            st = os.fstat(f.fileno())
            batch = Batch()
            identity = (st.st_dev, st.st_ino)
            if self._identity is not None and (identity != self._identity or st.st_size < self._offset):
                self._offset, self._tail, batch.reset = 0, b"", True
            self._identity = identity
            if st.st_size == self._offset:
                return batch
            f.seek(self._offset)
            data = f.read(READ_LIMIT)
        self._offset += len(data)
        batch.more = self._offset < st.st_size
        lines = (self._tail + data).split(b"\n")
        self._tail = lines.pop()  # an unfinished last line waits for its newline
        batch.events = [e for e in map(_parse, lines) if e is not None]
        return batch


def _parse(line: bytes) -> dict | None:
    """One event, or None for a blank or garbled line (a log must never stop the app)."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(record, dict) and isinstance(record.get("event"), str):
        return record
    return None


def coalesce(events: list[dict]) -> list[dict]:
    """Drop every `chunks` snapshot but the last: each replaces the one before (they can be large)."""
    last = max((i for i, e in enumerate(events) if e["event"] == "chunks"), default=None)
    if last is None:
        return events
    return [e for i, e in enumerate(events) if e["event"] != "chunks" or i == last]
