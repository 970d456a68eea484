"""Budgets: never exceeded over a whole run, BudgetError when the model cannot fit, homes."""

from __future__ import annotations

import pytest
import torch

from homestar.errors import BudgetError
from homestar.runtime.homes import GroupBytes, plan_homes
from homestar.runtime.memory import SimulatedDevice
from runtime_helpers import (
    FP32_CHUNK_BYTES,
    SEQ,
    Setup,
    assert_weights_close,
    attach_copy,
    batches,
    make_model,
    one_thread,  # noqa: F401
    optim_config,
    train_engine,
    train_reference,
)


def test_device_budget_holds_over_train_eval_and_a_new_shape(monkeypatch):
    seen = []
    original = SimulatedDevice.alloc

    def watched(self, numel, dtype, *, zero=False):
        out = original(self, numel, dtype, zero=zero)
        seen.append(self.used)
        return out

    monkeypatch.setattr(SimulatedDevice, "alloc", watched)
    setup = Setup(accum=2)
    engine = attach_copy(make_model(setup), setup, budget_chunks=4)
    budget = 4 * FP32_CHUNK_BYTES
    train_engine(engine, batches(6, 2))
    idx, targets = batches(1, 1)[0][0]
    engine.eval_loss(idx, targets)
    engine.forward_backward(idx[:, : SEQ // 2], targets[:, : SEQ // 2], 1.0)  # another micro-batch shape
    engine.step(1e-3)

    stats = engine.stats()
    assert max(seen) <= budget and stats["peak_device_bytes"] <= budget
    assert max(seen) > budget - FP32_CHUNK_BYTES  # the budget was really used, not dodged
    assert stats["evictions"] > 0 and stats["prefetches"] > 0
    assert engine.memory()["gpu_mem"] <= budget


def test_device_budget_below_the_working_set_is_a_budget_error():
    setup = Setup()
    with pytest.raises(BudgetError, match="device budget"):
        attach_copy(make_model(setup), setup, budget_chunks=2)


def test_model_larger_than_both_budgets_is_a_budget_error():
    setup = Setup()
    with pytest.raises(BudgetError, match="need") as caught:
        attach_copy(make_model(setup), setup, budget_chunks=6, cpu_budget_bytes=4 * FP32_CHUNK_BYTES)
    assert "MiB" in str(caught.value)


def test_small_host_budget_moves_groups_to_the_device_and_still_matches_torch():
    setup = Setup()
    host_budget = 14 * FP32_CHUNK_BYTES  # the whole model needs 28 fp32 chunks
    engine = attach_copy(make_model(setup), setup, budget_chunks=20, cpu_budget_bytes=host_budget, optimizer_placement="host")
    assert 0 < len(engine.stats()["device_groups"]) < len(engine.groups)
    data = batches(8, 1)
    losses, _ = train_engine(engine, data)
    ref = make_model(setup)
    ref_losses, _, _ = train_reference(ref, optim_config(setup), data)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert_weights_close(engine.state_dict()["weights"], ref)
    assert engine.host.peak <= host_budget


def test_snapshot_and_memory_report_every_chunk():
    setup = Setup()
    engine = attach_copy(make_model(setup), setup)
    seen, acquire = [], engine.placement.acquire

    def watched(chunk, indices):
        tensor = acquire(chunk, indices)
        seen.append(engine.placement.device.used)  # chunks on the device at this moment
        return tensor

    engine.placement.acquire = watched
    engine.forward_backward(*batches(1, 1)[0][0], 1.0)
    snapshot = engine.chunk_snapshot()
    assert len(snapshot) == 4 * len(engine.groups)  # param (= master in fp32), grad, two moments
    assert {row["kind"] for row in snapshot} == {"param", "grad", "moments"}
    assert {row["location"] for row in snapshot} <= {"gpu", "cpu", "moving"}
    assert all(row["bytes"] == FP32_CHUNK_BYTES for row in snapshot)
    on_gpu = sum(row["bytes"] for row in snapshot if row["location"] == "gpu")
    memory = engine.memory()
    assert memory["gpu_mem"] == on_gpu
    assert memory["cpu_mem"] == 4 * len(engine.groups) * FP32_CHUNK_BYTES
    # the peak covers the forward/backward just run (its fullest moment), then restarts
    assert max(seen) > seen[0] and max(seen + [on_gpu]) <= memory["gpu_peak"] <= engine.placement.device.budget
    assert engine.memory()["gpu_peak"] == on_gpu
    engine.close()


def test_plan_homes_fills_the_measured_margin_from_the_last_group():
    groups = [GroupBytes(param=10, grad=10, rest=20) for _ in range(4)]  # state 30, total 40
    inf = float("inf")
    assert plan_homes(groups, gpu_cap=inf, cpu_cap=inf, nonmodel=0, policy="auto", fill=False) == [False] * 4
    # 200 - 15 non-model - 40 cached params - 10 grad = 135 margin: four states of 30 fit
    assert plan_homes(groups, gpu_cap=200, cpu_cap=inf, nonmodel=15, policy="auto", fill=True) == [True] * 4
    # 130 - 40 - 10 - 15 = 65: two states fit, the last groups first
    assert plan_homes(groups, gpu_cap=130, cpu_cap=inf, nonmodel=15, policy="auto", fill=True) == [False, False, True, True]
    assert plan_homes(groups, gpu_cap=130, cpu_cap=inf, nonmodel=15, policy="host", fill=True) == [False] * 4
    # host holds 100 of 160: two groups must live on the device
    assert plan_homes(groups, gpu_cap=200, cpu_cap=100, nonmodel=0, policy="host", fill=False) == [False, False, True, True]
    with pytest.raises(BudgetError):
        plan_homes(groups, gpu_cap=100, cpu_cap=100, nonmodel=0, policy="host", fill=False)
    with pytest.raises(BudgetError):
        plan_homes(groups, gpu_cap=150, cpu_cap=inf, nonmodel=0, policy="device", fill=False)


@pytest.mark.parametrize("precision, checkpoint", [("fp32", False), ("bf16", True)])
def test_an_evicted_chunk_holds_no_memory_when_the_runtime_allocates_again(monkeypatch, precision, checkpoint):
    """Accounting frees a chunk's device bytes when it is evicted; nothing may keep the tensor
    alive past that point, or the real device holds more than the budget says (streamed AdamW
    evicts one group's state to make room for the next)."""
    import weakref

    from homestar.runtime.placement import Placement

    evicted: list = []
    discard, acquire, scratch = Placement._discard, Placement.acquire, Placement.scratch

    def tracking_discard(self, chunk):
        evicted.append((chunk.id, weakref.ref(chunk.device)))
        discard(self, chunk)

    def check_then(call):
        def wrapped(self, *args, **kwargs):
            alive = [chunk_id for chunk_id, ref in evicted if ref() is not None]
            assert not alive, f"evicted chunks {alive} still referenced"
            return call(self, *args, **kwargs)
        return wrapped

    setup = Setup(checkpoint=checkpoint)
    engine = attach_copy(make_model(setup), setup, budget_chunks=12, optimizer_stream_share=0.5, precision=precision)
    data = batches(3, 1)
    (idx, targets), = data[0]
    engine.forward_backward(idx, targets, 1.0)
    engine.step(1e-3)  # the first step records its trace; the next ones replay it
    monkeypatch.setattr(Placement, "_discard", tracking_discard)
    monkeypatch.setattr(Placement, "acquire", check_then(acquire))
    monkeypatch.setattr(Placement, "scratch", check_then(scratch))
    for (idx, targets), in data[1:]:
        evicted.clear()
        engine.forward_backward(idx, targets, 1.0)
        assert evicted  # forward and backward evicted chunks too
        evicted.clear()
        engine.step(1e-3)
    assert engine.stats()["streamed_groups"] and evicted
    engine.close()


def test_a_device_allocation_that_fails_leaves_the_books_true(monkeypatch):
    """A chunk the device could not allocate (out of memory) is not counted as in use: the books
    equal the chunks that live there, the error names what the pass held and the peak of the last
    pass of its kind, and training goes on once memory is back."""
    setup = Setup()
    engine = attach_copy(make_model(setup), setup, budget_chunks=4)
    train_engine(engine, batches(2, 1))  # traced and replayed: chunks come and go in every pass
    device = engine.placement.device

    def out_of_memory(self, numel, dtype):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    monkeypatch.setattr(SimulatedDevice, "_new", out_of_memory)
    (idx, targets), = batches(1, 1)[0]
    with pytest.raises(BudgetError, match=r"in the (forward|backward), 2.00 MiB wanted: .* of activations and "
                                          r"workspace \(.* at the peak of the last such pass\)"):
        engine.forward_backward(idx, targets, 1.0)
    living = sum(c.nbytes for c in engine.placement.chunks if c.resident)
    assert device.used == living
    monkeypatch.undo()
    engine.zero_grad()
    train_engine(engine, batches(2, 1))
