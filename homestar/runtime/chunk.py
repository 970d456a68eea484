"""Chunks and chunk groups: the unit of allocation, placement and transfer.

A chunk is `numel` elements of one dtype holding several parameters' slots (per the layout). It
has a home: "host" chunks own a host buffer and may also have a device copy (a cache, possibly
newer: `device_dirty`); "device" chunks live only on the device. A group is chunk i of every kind
(param, grad, master, the two Adam moments): the optimizer walks them together. This module
holds data and answers questions about it; moving chunks is `placement.Placement`'s job. Knows
nothing of models or hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from typing import Any

import torch

from homestar.runtime.layout import Slot
from homestar.runtime.states import Move, StateError, TensorRecord, TensorState, transition_many


_AFTER_FWD, _AFTER_BWD = TensorState.HOLD_AFTER_FWD, TensorState.HOLD_AFTER_BWD


class Kind(Enum):
    PARAM = "param"
    GRAD = "grad"
    MASTER = "master"
    EXP_AVG = "exp_avg"
    EXP_AVG_SQ = "exp_avg_sq"

    @property
    def snapshot_kind(self) -> str:
        """The kind shown in placement snapshots: both Adam moments are "moments"."""
        return "moments" if self in (Kind.EXP_AVG, Kind.EXP_AVG_SQ) else self.value


@dataclass(eq=False, slots=True)
class Chunk:
    """One chunk's data, location and per-slot tensor states."""

    id: int
    kind: Kind
    group: int
    numel: int
    dtype: torch.dtype
    slots: tuple[Slot, ...]
    records: dict[int, TensorRecord] = field(default_factory=dict)
    """Tensor state per slot, keyed by the slot's layout index."""
    home: str = "host"
    host: torch.Tensor | None = None
    device: torch.Tensor | None = None
    device_dirty: bool = False
    """The device copy holds newer data than the host buffer (write back before dropping it)."""
    event: Any = None
    """Event of the last transfer that read or wrote the host buffer (None: complete)."""
    ready: Any = None
    """Event after which the device copy holds its data; compute waits on it once."""
    last_access: int = 0
    computing: int = 0
    """Slots in COMPUTE (kept by `move`, so `in_use` costs nothing)."""
    filled: int = 0
    """Slots holding data, i.e. not FREE (kept by `move`)."""
    _views: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for slot in self.slots:
            self.records.setdefault(slot.index, TensorRecord())
        self.computing = sum(r.state is TensorState.COMPUTE for r in self.records.values())
        self.filled = sum(r.state is not TensorState.FREE for r in self.records.values())

    def move(self, index: int, move: Move) -> None:
        """Move one slot's state (through `transition_many`, the only place that changes it)."""
        self.move_many((index,), move)

    def move_many(self, indices, move: Move) -> None:
        """Move several slots' states at once (through `transition_many`)."""
        try:
            computing, freed = transition_many(self.records, indices, move)
        except StateError as error:
            raise StateError(f"{error} (of {self.kind.value} chunk {self.id})") from None
        self.computing += computing
        self.filled -= freed

    def settle(self) -> None:
        """End of an iteration: every slot held after forward or backward back to HOLD."""
        after = [i for i, r in self.records.items() if r.state is _AFTER_FWD or r.state is _AFTER_BWD]
        if after:
            self.move_many(after, Move.RESET)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def resident(self) -> bool:
        """True when a device copy exists."""
        return self.device is not None

    def in_use(self) -> bool:
        """True while any of its tensors is in COMPUTE: the chunk must not move."""
        return self.computing > 0

    def is_empty(self) -> bool:
        """True when no slot holds data (a grad chunk before backward): fetch allocates zeros."""
        return self.filled == 0

    def view(self, tensor: torch.Tensor, slot: Slot, shape: torch.Size) -> torch.Tensor:
        """The slot's parameter-shaped view into `tensor` (this chunk's host or device copy).

        Views are cached per slot while `tensor` stays the same object; `forget_views` must be
        called when a copy is dropped (a cached view would keep its memory alive).
        """
        hit = self._views.get(slot.index)
        if hit is not None and hit[0] is tensor:
            return hit[1]
        end = slot.offset + slot.numel
        if end <= tensor.numel() and tensor.stride(0) == 1:
            # one as_strided (about 2 us) instead of a slice and a view (about 6): hooks take
            # hundreds of these per forward and backward
            out = tensor.as_strided(shape, _contiguous_strides(shape), tensor.storage_offset() + slot.offset)
        else:  # not a flat buffer holding the slot: slicing says what is wrong
            out = tensor[slot.offset : end].view(shape)
        if tensor is self.host or tensor is self.device:  # never pin a foreign copy in memory
            self._views[slot.index] = (tensor, out)
        return out

    def forget_views(self) -> None:
        self._views.clear()

    def slot_at(self, offset: int) -> Slot | None:
        """The slot holding element `offset`, or None for padding."""
        for slot in self.slots:
            if slot.offset <= offset < slot.offset + slot.numel:
                return slot
        return None

    def __repr__(self) -> str:
        where = "device" if self.resident else "host"
        return f"Chunk({self.id}, {self.kind.value}, group={self.group}, home={self.home}, at={where})"


@dataclass(eq=False, slots=True)
class ChunkGroup:
    """Chunk i of every kind; in fp32 the param chunk doubles as the master chunk.

    A group another rank owns (group-owner ZeRO) has no optimizer state here: no master chunk of
    its own (`master` is the param chunk) and no moment chunks (None), so none is allocated."""

    index: int
    param: Chunk
    grad: Chunk
    master: Chunk
    exp_avg: Chunk | None
    exp_avg_sq: Chunk | None
    optimizer_on_device: bool = False
    """True when every chunk of the group lives on the device and AdamW runs there."""

    @property
    def has_state(self) -> bool:
        """Whether this rank keeps the group's optimizer state (it owns the group)."""
        return self.exp_avg is not None

    def chunks(self) -> list[Chunk]:
        """Distinct chunks of the group (param is master in fp32; absent moments left out)."""
        out = [self.param, self.grad, self.master, self.exp_avg, self.exp_avg_sq]
        return [c for i, c in enumerate(out) if c is not None and all(c is not d for d in out[:i])]

    def optimizer_chunks(self) -> list[Chunk]:
        """The chunks of optimizer state held here: master (when separate) and both moments."""
        return [c for c in self.chunks() if c is not self.param and c is not self.grad]

    def state_chunks(self) -> list[Chunk]:
        """The chunks only the optimizer reads: grad, master (when separate), moments."""
        return [c for c in self.chunks() if c is not self.param]


@lru_cache(maxsize=None)
def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))
