"""Activation checkpointing for a block: keep its input, recompute it in backward.

`recompute(block, x)` runs `block` without recording a graph and keeps only `x`; backward runs
`block(x)` again with grad on, under the autocast state the forward had, and backpropagates
through it (a backward inside backward), which accumulates the block's parameter gradients as
usual and returns the input's. Module hooks fire again in the recompute. The model has no
randomness (no dropout), so no RNG state is saved.

torch's own non-reentrant checkpoint pays Python per saved tensor, in forward and in backward
(pack and unpack hooks, metadata checks); this pays Python once per block each way, which the
runtime's forward and backward, bound by the host's work, feel.
"""

from __future__ import annotations

import torch
from torch import nn


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block: nn.Module, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - autograd's ctx
        ctx.block = block
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(x)
        with torch.no_grad():
            return block(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001 - autograd's ctx
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_(True)
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type=device, dtype=dtype, enabled=enabled):
            out = ctx.block(x)
        torch.autograd.backward(out, grad_out)
        return None, x.grad


def recompute(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`block(x)`, its activations recomputed in backward instead of kept."""
    if not x.requires_grad:  # nothing upstream learns, but the block's parameters still do
        x = x.detach().requires_grad_(True)
    return _Recompute.apply(block, x)
