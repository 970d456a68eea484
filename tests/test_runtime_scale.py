"""Budget honesty at scale: a 2.7b-like layout planned without allocating it, and a scaled model
with the same ratios run on the simulated device while activations rise and spike between the
moments the runtime samples."""

from __future__ import annotations

import pytest
import torch

from homestar.errors import BudgetError
from homestar.model import GPT, GPTConfig
from homestar.model.presets import load_preset
from homestar.optim import OptimConfig
from homestar.runtime import RuntimeConfig, attach, choose_chunk_elems
from homestar.runtime.attach import plan_chunks, working_set_bytes_per_elem
from homestar.runtime.homes import plan_homes, working_set
from homestar.runtime.layout import max_chunk_elems
from runtime_helpers import one_thread  # noqa: F401

GIB = 1 << 30


def meta_sizes(cfg: GPTConfig) -> list[tuple[str, int]]:
    with torch.device("meta"):
        model = GPT(cfg)
    return [(name, p.numel()) for name, p in model.named_parameters()]


def test_a_2p7b_layout_under_8_gib_streams_small_chunks_and_fits():
    cfg = load_preset("2.7b").model
    sizes = meta_sizes(cfg)
    budget = 8 * GIB
    config = RuntimeConfig(device="cpu", precision="bf16", gpu_budget_bytes=budget)
    layout, groups = plan_chunks(sizes, config, budget)
    embedding = cfg.vocab_size * cfg.d_model
    # before: one chunk size for all, >= the embedding (about 159 M elements, 636 MB fp32 chunks)
    assert choose_chunk_elems(sizes) >= embedding
    cap = max_chunk_elems(budget, bytes_per_elem=working_set_bytes_per_elem(config))
    assert layout.chunk_elems <= cap < embedding
    wte = layout.slots[0]
    assert wte.name == "wte.weight" and layout.chunk_numel(wte.chunk) == embedding  # a chunk of its own
    assert all(slot.chunk != wte.chunk for slot in layout.slots[1:])
    assert layout.waste_elems / layout.total_elems < 0.05
    # the streamed working set: the embedding's param and (bf16) grad chunks plus one layer chunk
    least = working_set(groups, [False] * len(groups))
    assert config.grad_dtype == torch.bfloat16
    assert least == 2 * embedding + 2 * layout.chunk_elems + 2 * embedding
    assert least < budget / 8
    # with a 1.35 GiB activation peak (micro-batch 2, checkpointed) the plan fits, and every
    # group the measured margin takes still leaves the whole working set and the peak in budget
    nonmodel = int(1.35 * GIB)
    homes = plan_homes(groups, gpu_cap=budget, cpu_cap=float("inf"), nonmodel=nonmodel, policy="auto", fill=True)
    on_device = sum(g.total for g, dev in zip(groups, homes) if dev)
    cached = sum(g.param for g, dev in zip(groups, homes) if not dev)
    assert 0 < on_device and nonmodel + on_device + cached + max(g.grad for g in groups) <= budget
    # the same model cannot fit when activations leave no room for the working set
    with pytest.raises(BudgetError):
        plan_homes(groups, gpu_cap=budget, cpu_cap=float("inf"), nonmodel=budget - least // 2, policy="auto", fill=False)


class Activations:
    """Plays a GPT's non-model memory on the simulated device: each block's forward keeps
    `per_block` bytes until its backward, and the head's backward holds a transient `spike`
    (logits, their grad, the loss's fp32 slices) that is gone before the next moment."""

    def __init__(self, per_block: int, spike: int) -> None:
        self.per_block, self.spike, self.now, self.device = per_block, spike, 0, None

    def set(self, nbytes: int) -> None:
        self.now = nbytes
        self.device.simulate_nonmodel(nbytes)

    def install(self, model: GPT) -> None:
        for block in model.h:
            block.register_forward_hook(self._forward)

    def _forward(self, module, args, output) -> None:
        if torch.is_grad_enabled() and output.requires_grad:
            self.set(self.now + self.per_block)
            output.register_hook(self._backward)

    def _backward(self, grad) -> None:
        self.set(max(self.now - self.per_block, 0))

    def loss(self, model, idx, targets):
        logits, loss = model(idx, targets)
        if logits.requires_grad:
            logits.register_hook(self._head_spike)
        return loss

    def _head_spike(self, grad) -> None:
        base = self.now
        self.set(base + self.spike)  # between two moments: no chunk access samples it
        self.set(base)


# ratios of 2.7b under 8 GiB: embedding / layer parameters 1.6, chunk / MLP matrix 2.0, budget
# 66 bytes per embedding element; activations: 10% of the budget saved, a 17% head spike
SCALED = GPTConfig(vocab_size=1280, seq_len=16, d_model=64, n_layer=16, n_head=4, tie_embeddings=True)
SCALED_CHUNK = 2 * 4 * 64 * 64


def scaled_run(*, between_moments: bool, steps: int = 4) -> tuple[int, object, Activations]:
    torch.manual_seed(0)
    model = GPT(SCALED)
    sizes = [(n, p.numel()) for n, p in model.named_parameters()]
    budget = 66 * SCALED.vocab_size * SCALED.d_model
    assert budget < plan_chunks(sizes, RuntimeConfig(chunk_elems=SCALED_CHUNK), None)[0].total_elems * 16 / 2
    acts = Activations(per_block=budget // (10 * SCALED.n_layer), spike=budget // 6)
    config = RuntimeConfig(device="cpu", chunk_elems=SCALED_CHUNK, gpu_budget_bytes=budget, nonmodel_headroom=0.0)
    engine = attach(model, config, OptimConfig(lr=1e-3, grad_clip=1.0), loss_fn=acts.loss)
    acts.device = engine.placement.device
    if not between_moments:  # the old accounting: only what is in use at each moment
        acts.device.nonmodel_peak = acts.device.nonmodel_bytes
    acts.install(engine.model)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, SCALED.vocab_size, (2, SCALED.seq_len), generator=gen)
        engine.forward_backward(idx, torch.roll(idx, -1, 1), 1.0)
        engine.step(1e-3)
    return budget, engine, acts


def test_a_scaled_2p7b_keeps_chunks_plus_activation_peaks_under_the_budget():
    budget, engine, acts = scaled_run(between_moments=True)
    device = engine.placement.device
    assert device.overrun <= 0  # chunks + activations, at every change of either, warm-up included
    assert engine.stats()["evictions"] > 0 and engine.stats()["prefetches"] > 0
    assert engine.stats()["peak_device_bytes"] <= budget
    trace = next(t for key, t in engine.tracer.traces.items() if key[0] == "train")
    assert trace.peak_nonmodel >= acts.spike  # the spike between moments is in the trace
    assert engine.groups[0].param.numel > SCALED_CHUNK  # the embedding has a chunk of its own


def test_sampling_only_at_moments_would_overrun_the_budget():
    _, engine, acts = scaled_run(between_moments=False)
    assert engine.placement.device.overrun > 0  # the fault measured on the H200, reproduced
    trace = next(t for key, t in engine.tracer.traces.items() if key[0] == "train")
    assert trace.peak_nonmodel < acts.spike


def test_an_activation_estimate_the_budget_cannot_hold_fails_at_attach():
    torch.manual_seed(0)
    model = GPT(SCALED)
    config = RuntimeConfig(device="cpu", chunk_elems=SCALED_CHUNK, gpu_budget_bytes=4 * SCALED_CHUNK * 4 * 4,
                           nonmodel_estimate_bytes=3 * SCALED_CHUNK * 4 * 4)
    with pytest.raises(BudgetError, match="activations"):
        attach(model, config, OptimConfig(lr=1e-3))


def test_device_out_of_memory_mid_step_becomes_a_budget_error():
    torch.manual_seed(0)
    model = GPT(SCALED)

    def failing(model, idx, targets):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 136.00 MiB")

    engine = attach(model, RuntimeConfig(device="cpu", chunk_elems=SCALED_CHUNK), OptimConfig(lr=1e-3), loss_fn=failing)
    idx = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(BudgetError, match="ran out of memory in the forward, 136.00 MiB wanted: "):
        engine.forward_backward(idx, idx, 1.0)


def test_the_out_of_memory_message_says_where_the_work_was():
    """Backward and the optimizer step are named as such (the error a user reads, and the first
    thing to know when a budget turns out too small)."""

    class FailsInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001
            return x.clone()

        @staticmethod
        def backward(ctx, grad):  # noqa: ANN001
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def loss(model, idx, targets):
        return FailsInBackward.apply(model(idx, targets)[1])

    torch.manual_seed(0)
    engine = attach(GPT(SCALED), RuntimeConfig(device="cpu", chunk_elems=SCALED_CHUNK), OptimConfig(lr=1e-3), loss_fn=loss)
    idx = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(BudgetError, match="ran out of memory in the backward, 2.00 GiB wanted: "):
        engine.forward_backward(idx, idx, 1.0)

    def failing_step(lr, scaler):
        raise torch.OutOfMemoryError("out of memory")  # no size given: none reported

    engine.adamw.step = failing_step
    with pytest.raises(BudgetError, match="ran out of memory in the step: "):
        engine.step(1e-3)
    engine.close()
