"""Packing parameters into fixed-size chunks: a pure function of names and sizes.

No tensor is allocated here, so the planner can ask "how many chunks, how much waste" for a
13B model on any machine. Parameters are packed greedily in the order given (the order the model
uses them), never split across chunks, each aligned to `align` elements. Knows nothing of
devices, states or models.
"""

from __future__ import annotations

from dataclasses import dataclass

from homestar.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Slot:
    """Where one parameter lives: chunk index, element offset and element count."""

    index: int
    """Position of the parameter in the packing order."""
    name: str
    chunk: int
    offset: int
    numel: int


@dataclass(frozen=True, slots=True)
class Layout:
    """The packing of a list of parameters into `n_chunks` chunks of `chunk_elems` elements."""

    chunk_elems: int
    slots: tuple[Slot, ...]
    n_chunks: int

    @property
    def used_elems(self) -> int:
        return sum(slot.numel for slot in self.slots)

    @property
    def waste_elems(self) -> int:
        """Allocated but unused elements (alignment padding and chunk tails)."""
        return self.n_chunks * self.chunk_elems - self.used_elems

    def chunk_slots(self, chunk: int) -> tuple[Slot, ...]:
        """Slots of one chunk, in offset order."""
        return tuple(slot for slot in self.slots if slot.chunk == chunk)


def plan_layout(named_sizes: list[tuple[str, int]], chunk_elems: int, *, align: int = 64) -> Layout:
    """Pack (name, numel) pairs, in order, into chunks of `chunk_elems` elements."""
    if chunk_elems <= 0 or align <= 0:
        raise ConfigError("chunk_elems and align must be positive")
    slots: list[Slot] = []
    chunk, cursor = 0, 0
    for index, (name, numel) in enumerate(named_sizes):
        if numel > chunk_elems:
            raise ConfigError(f"parameter {name} has {numel} elements, more than a chunk ({chunk_elems})")
        start = _round_up(cursor, align)
        if start + numel > chunk_elems:
            chunk, start = chunk + 1, 0
        slots.append(Slot(index=index, name=name, chunk=chunk, offset=start, numel=numel))
        cursor = start + numel
    n_chunks = chunk + 1 if slots else 0
    return Layout(chunk_elems=chunk_elems, slots=tuple(slots), n_chunks=n_chunks)


def choose_chunk_elems(
    named_sizes: list[tuple[str, int]], *, candidates: list[int] | None = None, align: int = 64
) -> int:
    """The candidate chunk size with the least waste (ties: the smallest).

    Default candidates: 65 evenly spaced sizes from the largest parameter to twice that, each
    a multiple of `align`; a chunk must hold the largest parameter.
    """
    if not named_sizes:
        raise ConfigError("a model without parameters cannot be chunked")
    largest = max(numel for _, numel in named_sizes)
    if candidates is None:
        base = _round_up(largest, align)
        step = max(align, _round_up(base // 64, align))
        candidates = [base + k * step for k in range(65)]
    fitting = [c for c in candidates if c >= largest]
    if not fitting:
        raise ConfigError(f"no candidate chunk size holds the largest parameter ({largest} elements)")
    return min(fitting, key=lambda c: (plan_layout(named_sizes, c, align=align).waste_elems, c))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
