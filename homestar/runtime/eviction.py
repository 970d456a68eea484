"""Which held chunks to evict from the device: Belady's rule on the trace.

Evict the chunk whose next use is farthest away; among chunks not used again (or when no trace
is replayed: all of them), prefer clean ones (no write-back copy) and then the least recently
used. A pure choice over candidates: knows nothing of copies, budgets or models.
"""

from __future__ import annotations

from typing import Callable, Iterable

from homestar.runtime.chunk import Chunk


def choose_victims(
    candidates: Iterable[Chunk],
    need: int,
    room: float,
    distance: Callable[[Chunk], float],
    *,
    farther_than: float = -1.0,
) -> list[Chunk] | None:
    """The fewest chunks, farthest next use first, whose eviction makes `room` reach `need`.

    Only chunks whose next use is farther than `farther_than` may go (prefetch passes the
    distance of the chunk it wants, so it never evicts something needed sooner). Returns None
    when even evicting every allowed candidate would not make room.
    """
    if room >= need:
        return []
    allowed = [c for c in candidates if distance(c) > farther_than]
    allowed.sort(key=lambda c: (-distance(c), c.device_dirty, c.last_access))
    victims: list[Chunk] = []
    for chunk in allowed:
        victims.append(chunk)
        room += chunk.nbytes
        if room >= need:
            return victims
    return None
