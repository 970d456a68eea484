"""Shared pieces of the runtime tests: a small GPT pair, batches, and a plain-PyTorch reference."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from homestar.model import GPT, GPTConfig
from homestar.optim import OptimConfig, no_decay
from homestar.runtime import RuntimeConfig, attach

VOCAB, SEQ, BATCH = 256, 32, 4
CHUNK = 20_000  # elements: the small GPT packs into ~7 chunk groups
FP32_CHUNK_BYTES = CHUNK * 4


@dataclass(frozen=True)
class Setup:
    tie: bool = True
    checkpoint: bool = False
    accum: int = 1
    grad_clip: float = 1.0
    n_layer: int = 2


def make_model(setup: Setup, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=VOCAB, seq_len=SEQ, d_model=64, n_layer=setup.n_layer, n_head=4, tie_embeddings=setup.tie)
    return GPT(cfg, checkpoint_activations=setup.checkpoint)


def optim_config(setup: Setup) -> OptimConfig:
    return OptimConfig(lr=2e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=setup.grad_clip)


def lr_at(step: int) -> float:
    """A schedule that changes every step, so a per-step lr is really honoured."""
    return 2e-3 * (0.5 + 0.5 * ((step % 7) / 6))


def batches(steps: int, accum: int, seed: int = 1) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        micro = []
        for _ in range(accum):
            idx = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
            micro.append((idx, torch.roll(idx, -1, dims=1)))
        out.append(micro)
    return out


def torch_adamw(model: torch.nn.Module, oc: OptimConfig) -> torch.optim.AdamW:
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": oc.weight_decay},
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=oc.lr, betas=oc.betas, eps=oc.eps, fused=True)


def train_reference(model, oc: OptimConfig, data, opt=None, first_step: int = 0):
    """Plain PyTorch: fused AdamW, (loss/accum).backward(), clip_grad_norm_. Returns losses, norms."""
    opt = opt or torch_adamw(model, oc)
    losses, norms = [], []
    for step, micro in enumerate(data, start=first_step):
        for idx, targets in micro:
            _, loss = model(idx, targets)
            (loss / len(micro)).backward()
            losses.append(loss.item())
        params = [p for p in model.parameters() if p.grad is not None]
        if oc.grad_clip > 0:
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, oc.grad_clip)))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, norms, opt


def train_engine(engine, data, first_step: int = 0):
    losses, norms = [], []
    for step, micro in enumerate(data, start=first_step):
        for idx, targets in micro:
            losses.append(engine.forward_backward(idx, targets, len(micro)).item())
        norms.append(engine.step(lr_at(step)).grad_norm)
    return losses, norms


def attach_copy(model, setup: Setup, **overrides):
    """attach() a deep copy of `model` with a simulated device budget of `budget_chunks` fp32 chunks."""
    budget_chunks = overrides.pop("budget_chunks", 4)
    config = RuntimeConfig(device="cpu", chunk_elems=CHUNK, gpu_budget_bytes=budget_chunks * FP32_CHUNK_BYTES, **overrides)
    return attach(copy.deepcopy(model), config, optim_config(setup))


def assert_weights_close(weights: dict, model: torch.nn.Module, rtol: float = 1e-5) -> None:
    names = [n for n, _ in model.named_parameters()]
    assert sorted(weights) == sorted(names)
    for name, param in model.named_parameters():
        torch.testing.assert_close(weights[name], param.detach().float(), rtol=rtol, atol=1e-7, msg=name)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes run fastest (and steadiest on a busy 2-core machine) on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
