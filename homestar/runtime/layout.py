"""Packing parameters into fixed-size chunks: a pure function of names and sizes.

No tensor is allocated here, so the planner can ask "how many chunks, how much waste" for a
13B model on any machine. Parameters are packed greedily in the order given (the order the model
uses them), never split across chunks, each aligned to `align` elements. With `oversize`, a
parameter larger than the chunk size (a large vocabulary's embedding) gets a chunk of its own,
sized to it, so the other chunks (and the device working set) can stay small. Knows nothing of
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
    """The packing of a list of parameters into `n_chunks` chunks of `chunk_elems` elements
    (a chunk holding one oversized parameter alone is larger: `sizes`)."""

    chunk_elems: int
    slots: tuple[Slot, ...]
    n_chunks: int
    sizes: tuple[int, ...] = ()
    """Elements of each chunk; empty means every chunk has `chunk_elems`."""

    def chunk_numel(self, chunk: int) -> int:
        return self.sizes[chunk] if self.sizes else self.chunk_elems

    @property
    def total_elems(self) -> int:
        return sum(self.sizes) if self.sizes else self.n_chunks * self.chunk_elems

    @property
    def largest_chunk(self) -> int:
        return max(self.sizes, default=0) if self.sizes else self.chunk_elems

    @property
    def used_elems(self) -> int:
        return sum(slot.numel for slot in self.slots)

    @property
    def waste_elems(self) -> int:
        """Allocated but unused elements (alignment padding and chunk tails)."""
        return self.total_elems - self.used_elems

    def chunk_slots(self, chunk: int) -> tuple[Slot, ...]:
        """Slots of one chunk, in offset order."""
        return tuple(slot for slot in self.slots if slot.chunk == chunk)


def plan_layout(
    named_sizes: list[tuple[str, int]], chunk_elems: int, *, align: int = 64, oversize: bool = False
) -> Layout:
    """Pack (name, numel) pairs, in order, into chunks of `chunk_elems` elements.

    `oversize`: a parameter larger than a chunk gets a chunk of its own (else ConfigError).
    """
    if chunk_elems <= 0 or align <= 0:
        raise ConfigError("chunk_elems and align must be positive")
    slots: list[Slot] = []
    sizes: list[int] = []
    cursor = chunk_elems  # no open chunk yet
    for index, (name, numel) in enumerate(named_sizes):
        if numel > chunk_elems:
            if not oversize:
                raise ConfigError(f"parameter {name} has {numel} elements, more than a chunk ({chunk_elems})")
            sizes.append(_round_up(numel, align))
            slots.append(Slot(index=index, name=name, chunk=len(sizes) - 1, offset=0, numel=numel))
            cursor = sizes[-1]  # the oversized chunk is full: the next parameter opens a new one
            continue
        start = _round_up(cursor, align)
        if not sizes or start + numel > sizes[-1]:
            sizes.append(chunk_elems)
            start = 0
        slots.append(Slot(index=index, name=name, chunk=len(sizes) - 1, offset=start, numel=numel))
        cursor = start + numel
    uniform = all(size == chunk_elems for size in sizes)
    return Layout(chunk_elems=chunk_elems, slots=tuple(slots), n_chunks=len(sizes),
                  sizes=() if uniform else tuple(sizes))


def choose_chunk_elems(
    named_sizes: list[tuple[str, int]], *, candidates: list[int] | None = None, align: int = 64,
    max_elems: int | None = None, stretch: bool = True,
) -> int:
    """The candidate chunk size with the least waste (ties: the smallest).

    Default candidates: 65 evenly spaced sizes from the largest parameter to twice that, each
    a multiple of `align`; a chunk must hold the largest parameter. With `max_elems` (a cap
    derived from the device budget), parameters above the cap are left to chunks of their own
    (`plan_layout(..., oversize=True)`), the candidates run from the largest parameter under the
    cap up to the cap (or, with `stretch`, a quarter above that parameter when the cap is closer
    to it), and waste is counted with the oversized chunks.
    """
    if not named_sizes:
        raise ConfigError("a model without parameters cannot be chunked")
    if max_elems is not None and max_elems <= 0:
        raise ConfigError("max_elems must be positive")
    numels = [numel for _, numel in named_sizes]
    oversize = max_elems is not None and max(numels) > max_elems
    largest = max(n for n in numels if n <= max_elems) if oversize and min(numels) <= max_elems else max(numels)
    if candidates is None:
        base = _round_up(largest, align)
        # The cap binds even with nothing oversized, but never below a quarter above the largest
        # parameter it holds: a cap at that parameter's size would leave it alone in its chunk and
        # push each small neighbour into a chunk of its own (up to 1.6x padding for a GPT whose MLP
        # weight matches the cap).
        limit = None if max_elems is None else max(base + base // 4 if stretch else base, max_elems)
        span = base if not oversize else limit - base
        step = max(align, _round_up(span // 64, align))
        candidates = [base + k * step for k in range(65) if limit is None or base + k * step <= limit]
    fitting = [c for c in candidates if c >= largest]
    if not fitting:
        raise ConfigError(f"no candidate chunk size holds the largest parameter ({largest} elements)")
    return min(fitting, key=lambda c: (plan_layout(named_sizes, c, align=align, oversize=oversize).waste_elems, c))


def max_chunk_elems(budget_bytes: int, *, bytes_per_elem: int, floor: int = 1 << 20) -> int:
    """A chunk size cap for a device budget: one element of every chunk the device may hold at
    once (`bytes_per_elem`: param chunks in use and prefetched, grad chunks filling and draining)
    may cost at most 1/8 of the budget, so the working set stays a few chunks, not a few GB.
    Never below `floor` elements (smaller chunks cost more per-chunk work than they save)."""
    return max(floor, budget_bytes // (8 * bytes_per_elem))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
