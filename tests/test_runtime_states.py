"""The tensor state machine: legal moves, nested uses, and illegal moves that raise."""

from __future__ import annotations

import pytest
import torch

from homestar.runtime import StateError
from homestar.runtime.states import Move, TensorRecord, TensorState, transition
from homestar.runtime.states import Move as M
from runtime_helpers import Setup, attach_copy, make_model, one_thread  # noqa: F401

S = TensorState


def walk(*moves: Move, start: TensorState = S.HOLD) -> TensorRecord:
    record = TensorRecord(state=start)
    for move in moves:
        transition(record, move)
    return record


def test_forward_backward_cycle_of_a_parameter():
    record = TensorRecord(state=S.FREE)
    assert transition(record, M.FILL) is S.HOLD
    assert transition(record, M.ACQUIRE) is S.COMPUTE
    assert transition(record, M.RELEASE_FWD) is S.HOLD_AFTER_FWD
    assert transition(record, M.ACQUIRE) is S.COMPUTE
    assert transition(record, M.RELEASE_BWD) is S.HOLD_AFTER_BWD
    assert transition(record, M.RESET) is S.HOLD


def test_nested_uses_count():
    record = walk(M.ACQUIRE, M.ACQUIRE)
    assert record.refs == 2
    assert transition(record, M.RELEASE_FWD) is S.COMPUTE  # the outer use still runs
    assert transition(record, M.RELEASE_FWD) is S.HOLD_AFTER_FWD
    assert record.refs == 0


def test_grad_slot_cycle():
    record = TensorRecord()
    assert transition(record, M.ACQUIRE) is S.COMPUTE  # first gradient into an empty slot
    assert transition(record, M.RELEASE_BWD) is S.HOLD_AFTER_BWD
    assert transition(record, M.CLEAR) is S.FREE  # after the step
    assert transition(record, M.RESET) is S.FREE  # a slot without data stays FREE


@pytest.mark.parametrize(
    ("start", "move"),
    [
        (S.HOLD, M.RELEASE_FWD),  # release without acquire
        (S.HOLD_AFTER_FWD, M.RELEASE_BWD),
        (S.FREE, M.RELEASE),
        (S.COMPUTE, M.CLEAR),  # discarding data in use
        (S.COMPUTE, M.RESET),  # ending an iteration while in use
        (S.COMPUTE, M.FILL),  # overwriting data in use
    ],
)
def test_illegal_moves_raise(start, move):
    record = TensorRecord(state=start, refs=1 if start is S.COMPUTE else 0)
    with pytest.raises(StateError, match=move.name.lower()):
        transition(record, move)


def test_engine_bookkeeping_refuses_illegal_moves():
    setup = Setup()
    engine = attach_copy(make_model(setup), setup)
    chunk = engine.groups[0].param
    index = chunk.slots[0].index
    with pytest.raises(StateError, match="release_fwd"):
        engine.placement.release(chunk, [index], M.RELEASE_FWD)  # never acquired
    engine.placement.acquire(chunk, [index])
    with pytest.raises(StateError, match="clear"):
        engine.placement.clear(chunk)  # data in use
    with pytest.raises(RuntimeError, match="in use"):
        engine.placement.host_tensor(chunk, drop_device=True)  # a chunk in use cannot move
    assert chunk.in_use()
    engine.placement.release(chunk, [index], M.RELEASE)
    assert not chunk.in_use()
    idx = torch.zeros(1, 8, dtype=torch.long)
    engine.forward_backward(idx, idx, 1.0)  # and the engine still works


def test_a_slot_view_is_the_slice_it_names_wherever_the_buffer_starts():
    """A chunk's view of a slot (one as_strided over a flat buffer) is exactly the slice
    [offset, offset + numel) of the buffer shaped as the parameter, also when the buffer itself
    starts inside a larger storage; a buffer too short for the slot fails as slicing does."""
    from homestar.runtime.chunk import Chunk, Kind
    from homestar.runtime.layout import Slot

    slots = (Slot(index=0, name="a", chunk=0, offset=0, numel=6), Slot(index=1, name="b", chunk=0, offset=6, numel=8))
    chunk = Chunk(id=0, kind=Kind.PARAM, group=0, numel=16, dtype=torch.float32, slots=slots)
    storage = torch.arange(40, dtype=torch.float32)
    buffer = storage[20:36]  # a flat buffer at storage offset 20
    view = chunk.view(buffer, slots[1], torch.Size([2, 4]))
    assert torch.equal(view, buffer[6:14].view(2, 4)) and view.is_contiguous()
    view.add_(100)  # a view: writes land in the buffer
    assert torch.equal(buffer[6:14], torch.arange(26, 34, dtype=torch.float32) + 100)
    with pytest.raises(RuntimeError):
        chunk.view(buffer[:10], slots[1], torch.Size([2, 4]))
