"""Hooks: modules called twice, parameters without gradients, frozen parameters, misuse."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from homestar.optim import OptimConfig
from homestar.runtime import RuntimeConfig, attach
from runtime_helpers import Setup, attach_copy, batches, make_model, one_thread, torch_adamw  # noqa: F401

CHUNK = 320


class Awkward(nn.Module):
    """A shared layer called twice, a layer never called, one whose output is detached, one frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.shared = nn.Linear(16, 16)
        self.unused = nn.Linear(16, 16)
        self.detached = nn.Linear(16, 16)
        self.frozen = nn.Linear(16, 16).requires_grad_(False)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        h = h + self.detached(h).detach() + self.frozen(h)
        return self.out(h)


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=0.5)


def awkward_pair(resident: bool = False):
    torch.manual_seed(0)
    ref = Awkward()
    # resident: no budget, every chunk on the device (no hooks at all in backward)
    config = RuntimeConfig(chunk_elems=CHUNK, gpu_budget_bytes=None if resident else 3 * CHUNK * 4)
    return ref, attach(copy.deepcopy(ref), config, OPTIM, loss_fn=mse)


@pytest.mark.parametrize("resident", [False, True])
def test_shared_unused_detached_and_frozen_parameters_match_torch(resident):
    ref, engine = awkward_pair(resident)
    opt = torch_adamw(ref, OPTIM)
    gen = torch.Generator().manual_seed(3)
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    for _ in range(10):
        x, y = torch.randn(5, 8, generator=gen), torch.randn(5, 4, generator=gen)
        loss = mse(ref, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.grad is not None], 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert engine.forward_backward(x, y, 1.0).item() == pytest.approx(loss.item(), rel=1e-6)
        engine.step(1e-2)
    state = engine.state_dict()
    for name, param in ref.named_parameters():
        torch.testing.assert_close(state["weights"][name], param.detach(), rtol=1e-6, atol=1e-7)
    for untouched in ("unused.weight", "detached.bias", "frozen.weight"):
        assert torch.equal(state["weights"][untouched], before[untouched])
        assert untouched not in state["optimizer"]["exp_avg"]  # torch keeps no state for them
    assert engine.hooks.resident is resident
    if not resident:
        assert engine.stats()["evictions"] > 0


def test_a_resident_grad_replaced_from_outside_loses_nothing():
    """In resident mode `.grad` aliases the grad chunk; if code outside sets it to None, autograd
    makes a new one in the next backward: that gradient is still added into the chunk, and the
    step equals torch's over both micro-batches."""
    ref, engine = awkward_pair(resident=True)
    opt = torch_adamw(ref, OPTIM)
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):  # the first step traces and enters resident mode
        x, y = torch.randn(5, 8, generator=gen), torch.randn(5, 4, generator=gen)
        mse(ref, x, y).backward()
        torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.grad is not None], 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        engine.forward_backward(x, y, 1.0)
        engine.step(1e-2)
    assert engine.hooks.resident
    batches_ = [(torch.randn(5, 8, generator=gen), torch.randn(5, 4, generator=gen)) for _ in range(2)]
    for x, y in batches_:
        (mse(ref, x, y) / 2).backward()
    torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.grad is not None], 0.5)
    opt.step()
    engine.forward_backward(*batches_[0], 2.0)
    engine.model.out.weight.grad = None
    engine.forward_backward(*batches_[1], 2.0)
    engine.step(1e-2)
    state = engine.state_dict()
    for name, param in ref.named_parameters():
        torch.testing.assert_close(state["weights"][name], param.detach(), rtol=1e-6, atol=1e-7)


def test_parameters_outside_use_are_poisoned_not_stale():
    _, engine = awkward_pair()
    engine.forward_backward(torch.randn(2, 8), torch.randn(2, 4), 1.0)
    chunk_storages = {c.device.untyped_storage().data_ptr() for c in engine.placement.chunks if c.resident}
    for info in engine.table:
        param = info.param
        assert param.shape == info.shape
        assert torch.isnan(param).all()  # reads give NaN, never old chunk memory
        assert param.untyped_storage().data_ptr() not in chunk_storages
        with pytest.raises(RuntimeError), torch.no_grad():
            param.add_(1.0)  # writes raise


def test_inference_calls_fetch_through_hooks():
    setup = Setup()
    ref = make_model(setup)
    engine = attach_copy(ref, setup, budget_chunks=4)
    idx, _ = batches(1, 1)[0][0]
    with torch.no_grad():
        expected, _ = ref(idx)
        expected_tokens = ref.generate(idx[:1, :4], 6, temperature=0)
    with engine.inference() as model:
        got, _ = model(idx)
        tokens = model.generate(idx[:1, :4], 6, temperature=0)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(tokens, expected_tokens)
    assert engine.stats()["evictions"] > 0


def test_tied_weight_is_one_parameter_with_one_slot():
    setup = Setup(tie=True)
    engine = attach_copy(make_model(setup), setup)
    names = [info.name for info in engine.table]
    assert "wte.weight" in names and "lm_head.weight" not in names
    assert engine.model.lm_head.weight is engine.model.wte.weight
