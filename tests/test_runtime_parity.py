"""Parity: the chunk runtime trains exactly like plain PyTorch AdamW(fused=True).

Same GPT, init, batches and per-step learning rates; a simulated device budget of a few chunks
forces evictions every step. Per-step losses, grad norms and final weights must agree to 1e-5.
"""

from __future__ import annotations

import functools

import pytest
import torch

from homestar.runtime.optimizer import worker_threads
from runtime_helpers import (
    Setup,
    assert_weights_close,
    attach_copy,
    batches,
    make_model,
    one_thread,  # noqa: F401  (autouse fixture)
    optim_config,
    train_engine,
    train_reference,
)

STEPS = 50


@functools.lru_cache(maxsize=None)
def reference(setup: Setup, steps: int):
    model = make_model(setup)
    losses, norms, _ = train_reference(model, optim_config(setup), batches(steps, setup.accum))
    return losses, norms, model


CASES = {
    "tied": (Setup(), {}),
    "untied": (Setup(tie=False), {}),
    "checkpointing": (Setup(checkpoint=True), {"budget_chunks": 6}),  # recompute holds a whole block
    "accum4": (Setup(accum=4), {}),
    "clip-active": (Setup(grad_clip=0.05), {}),
    "no-clip": (Setup(grad_clip=0.0), {}),
    "optimizer-on-device": (Setup(), {"budget_chunks": 64, "optimizer_placement": "device"}),
    # all on the device: resident mode (grads accumulate in place in their chunks, no hooks' work)
    "resident-accum4-checkpointing": (Setup(accum=4, checkpoint=True),
                                      {"budget_chunks": 64, "optimizer_placement": "device"}),
    "optimizer-split": (Setup(), {"budget_chunks": 14, "optimizer_placement": "auto"}),
    "optimizer-streamed": (Setup(), {"budget_chunks": 6, "optimizer_stream_share": 0.5}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_torch_adamw(name):
    setup, overrides = CASES[name]
    steps = STEPS
    ref_losses, ref_norms, ref_model = reference(setup, steps)
    engine = attach_copy(make_model(setup), setup, **overrides)
    losses, norms = train_engine(engine, batches(steps, setup.accum))

    assert losses == pytest.approx(ref_losses, rel=1e-5)
    if setup.grad_clip > 0:
        assert norms == pytest.approx(ref_norms, rel=1e-5)
    assert_weights_close(engine.state_dict()["weights"], ref_model)
    stats = engine.stats()
    if overrides.get("optimizer_placement") == "device":
        assert stats["device_groups"] == list(range(len(engine.groups)))
        assert stats["evictions"] == 0 and stats["fetches"] == 0
        assert engine.hooks.resident
    elif name == "optimizer-split":
        assert 0 < len(stats["device_groups"]) < len(engine.groups)
    elif name == "optimizer-streamed":  # half the groups' AdamW on the device, half on the CPU thread
        assert stats["device_groups"] == [] and stats["evictions"] > steps
        assert 0 < len(stats["streamed_groups"]) < len(engine.groups)
    else:
        assert stats["evictions"] > steps  # evicted every step
        assert stats["device_groups"] == []
    if name == "clip-active":
        assert min(ref_norms) > setup.grad_clip  # the clip really scaled every step
    engine.close()


def test_cpu_adamw_leaves_cores_to_the_thread_driving_the_device():
    """With AdamW streamed through the device, the CPU's groups run on a worker thread whose
    parallel loops leave the thread driving the device one core in eight, at most two."""
    assert [worker_threads(n) for n in (1, 2, 7, 8, 15, 16, 64)] == [1, 2, 7, 7, 14, 14, 62]
    setup = Setup()
    engine = attach_copy(make_model(setup), setup, budget_chunks=6, optimizer_stream_share=0.5)
    previous = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        train_engine(engine, batches(1, setup.accum))
        assert engine.stats()["streamed_groups"]  # the worker ran beside the streamed update
        assert engine.adamw._thread("cpu").submit(torch.get_num_threads).result() == 7
    finally:
        torch.set_num_threads(previous)
        engine.close()
