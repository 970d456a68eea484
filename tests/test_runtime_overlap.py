"""The optimizer step's AdamW running beside the next forward (one process).

`step` returns once every update is under way; the next forward waits for a group only when it
needs it, backward starts with the update ended. Nothing about it may change a value: the runs
here match plain PyTorch, or the same engine with every update waited for in the step, exactly.
"""

from __future__ import annotations

import functools
import threading
import time

import pytest
import torch

from homestar.runtime.optimizer import ChunkAdamW
from homestar.runtime.placement import Placement
from runtime_helpers import (
    Setup,
    assert_weights_close,
    attach_copy,
    batches,
    lr_at,
    make_model,
    one_thread,  # noqa: F401  (autouse fixture)
    optim_config,
    train_engine,
    train_reference,
)


@functools.lru_cache(maxsize=None)
def reference(setup: Setup, steps: int):
    model = make_model(setup)
    losses, norms, _ = train_reference(model, optim_config(setup), batches(steps, setup.accum))
    return losses, norms, model


@pytest.mark.parametrize("overrides", [{}, {"budget_chunks": 6, "optimizer_stream_share": 0.5}],
                         ids=["cpu", "cpu-and-streamed"])
def test_adamw_runs_beside_the_next_forward(monkeypatch, overrides):
    """On one process the step returns once every update is under way: the CPU's AdamW goes on
    on the worker (and the streamed one on the streamer) while the next forward runs, which
    waits for a group only when it needs that group's params (and fetches nothing an update
    still writes). Training stays plain PyTorch's, step for step."""
    setup = Setup()
    steps = 6
    ref_losses, ref_norms, ref_model = reference(setup, steps)
    engine = attach_copy(make_model(setup), setup, **overrides)
    update = ChunkAdamW._update

    def slow_update(self, *args, **kwargs):  # the worker lags, so the forward catches up with it
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.02)
        return update(self, *args, **kwargs)

    monkeypatch.setattr(ChunkAdamW, "_update", slow_update)
    let_go = engine.adamw.let_go_group
    waits = {"in_flight_after_step": 0, "forward_found_group_held": 0}

    def counting_let_go(chunk, wait):
        waits["forward_found_group_held"] += engine.adamw._inflight is not None and \
            chunk.group in engine.adamw._inflight.holding
        return let_go(chunk, wait)

    engine.placement.let_go_hold = counting_let_go
    losses, norms = [], []
    for step, micro in enumerate(batches(steps, setup.accum)):
        for idx, targets in micro:
            losses.append(engine.forward_backward(idx, targets, len(micro)).item())
            assert engine.adamw._inflight is None  # backward starts with the update ended
        norms.append(engine.step(lr_at(step)).grad_norm)
        waits["in_flight_after_step"] += engine.adamw._inflight is not None

    assert waits["in_flight_after_step"] == steps
    assert waits["forward_found_group_held"] >= steps - 1  # every later forward met the update
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    assert_weights_close(engine.state_dict()["weights"], ref_model)  # the export ends the last step
    assert engine.adamw._inflight is None
    if overrides:
        assert engine.stats()["streamed_groups"]
    engine.close()


def test_an_update_short_of_device_room_ends_early_and_changes_nothing(monkeypatch):
    """bf16 with its params updated in place where cached: a small device fills up while the
    step still holds those chunks and its staging ring, so the forward ends the update early;
    losses and weights are bit for bit those of the same engine waiting for every update."""
    setup = Setup(checkpoint=True)
    data = batches(5, setup.accum)
    config = dict(budget_chunks=12, optimizer_stream_share=0.5, precision="bf16")
    beside = attach_copy(make_model(setup), setup, **config)
    losses_beside, norms_beside = train_engine(beside, data)
    assert beside.stats()["updates_ended_early"] > 0
    monkeypatch.setattr(ChunkAdamW, "_may_defer", lambda self: False)
    waited = attach_copy(make_model(setup), setup, **config)
    losses_waited, norms_waited = train_engine(waited, data)
    assert waited.stats()["updates_ended_early"] == 0
    assert losses_beside == losses_waited and norms_beside == norms_waited
    for name, weight in waited.state_dict()["weights"].items():
        assert torch.equal(beside.state_dict()["weights"][name], weight), name
    beside.close()
    waited.close()


def test_a_forward_failing_beside_the_update_loses_nothing(monkeypatch):
    """A failure in the forward while the last step's update runs beside it: the update still
    completes, nothing it held stays held, and the step redone trains exactly as if nothing
    had happened (as the trainer redoes a step after an out-of-memory)."""
    setup = Setup()
    steps = 5
    ref_losses, ref_norms, ref_model = reference(setup, steps)
    engine = attach_copy(make_model(setup), setup)
    acquire = Placement.acquire
    failures = []

    def failing_acquire(self, chunk, indices):
        if not failures and engine.adamw._inflight is not None and len(engine.adamw._inflight.holding) < 3:
            failures.append(chunk.id)  # once, midway through a forward beside the update
            raise RuntimeError("injected")
        return acquire(self, chunk, indices)

    monkeypatch.setattr(Placement, "acquire", failing_acquire)
    losses, norms = [], []
    for step, micro in enumerate(batches(steps, setup.accum)):
        for idx, targets in micro:
            try:
                losses.append(engine.forward_backward(idx, targets, len(micro)).item())
            except RuntimeError:
                assert engine.adamw._inflight is None  # the failure ended the update
                assert not any(c.in_use() for c in engine.placement.chunks)
                engine.zero_grad()
                losses.append(engine.forward_backward(idx, targets, len(micro)).item())
        norms.append(engine.step(lr_at(step)).grad_norm)
    assert failures
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    assert_weights_close(engine.state_dict()["weights"], ref_model)
    engine.close()


def test_the_automatic_split_follows_the_update_timed_beside_the_forward(monkeypatch):
    """The split between the CPU's AdamW and the streamed one moves by each engine's time over
    its own work while the update runs beside the next forward, as training runs it: with the
    CPU's worker made slow, more of the update goes through the device; each step reports the
    last one's engine times; after `AUTO_SHARE_STEPS` moves the split stays where it got."""
    from homestar.runtime.adam_split import AUTO_SHARE_STEPS, AdamSplit

    setup = Setup()
    engine = attach_copy(make_model(setup), setup, budget_chunks=6)
    engine.adamw.split = AdamSplit.configured(None, on_gpu=True)  # automatic, from half
    update = ChunkAdamW._update

    def slow_update(self, *args, **kwargs):  # 10 ms a group on the worker: the CPU is the slow engine
        time.sleep(0.01)
        return update(self, *args, **kwargs)

    monkeypatch.setattr(ChunkAdamW, "_update", slow_update)
    shares, reports = [], []
    for step, micro in enumerate(batches(AUTO_SHARE_STEPS + 3, setup.accum)):
        for idx, targets in micro:
            engine.forward_backward(idx, targets, len(micro))
        reports.append(engine.step(lr_at(step)))
        assert engine.adamw._inflight is not None  # the update runs beside the next forward
        shares.append(engine.adamw.split.share)

    assert "opt_cpu_adam" not in reports[0].timings  # no update ran before the first step
    for report in reports[1:]:
        assert report.timings["opt_cpu_adam"] > 0 and report.timings["opt_streamed_adam"] > 0
        assert 0 < report.timings["stream_share"] < 1
    assert shares[0] == 0.5 and shares[AUTO_SHARE_STEPS] > 0.7  # moved toward the device
    assert engine.adamw.split.steps == AUTO_SHARE_STEPS
    assert shares[AUTO_SHARE_STEPS:] == [shares[AUTO_SHARE_STEPS]] * 3  # then it stays
    engine.close()
