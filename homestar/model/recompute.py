"""Activation checkpointing for a block: keep its input, recompute it in backward.

`recompute(block, x)` runs `block` without recording a graph and keeps only `x`; backward runs
`block(x)` again with grad on, under the autocast state the forward had, and backpropagates
through it (a backward inside backward), which accumulates the block's parameter gradients as
usual and returns the input's. Module hooks fire again in the recompute. The model has no
randomness (no dropout), so no RNG state is saved.

With a `sink`, the block's parameter gradients are not accumulated into `.grad`: backward takes
them all at once (`torch.autograd.grad`) and hands them to `sink(params, grads)` (a grad is None
for a parameter that got none). A memory runtime adds them into its own buffers in one batch per
block instead of paying a gradient hook per parameter. A parameter shared with code outside the
block gets its gradient there as usual (`.grad`), so the sink sees only this block's share.

torch's own non-reentrant checkpoint pays Python per saved tensor, in forward and in backward
(pack and unpack hooks, metadata checks); this pays Python once per block each way, which the
runtime's forward and backward, bound by the host's work, feel.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

GradSink = Callable[[list[nn.Parameter], list["torch.Tensor | None"]], None]


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block: nn.Module, sink: GradSink | None, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.block, ctx.sink = block, sink
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
        if ctx.sink is None:
            torch.autograd.backward(out, grad_out)
            return None, None, x.grad
        params = [p for p in ctx.block.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out, [x, *params], grad_out, allow_unused=True)
        ctx.sink(params, list(grads[1:]))
        return None, None, grads[0]


def recompute(block: nn.Module, x: torch.Tensor, sink: GradSink | None = None) -> torch.Tensor:
    """`block(x)`, its activations recomputed in backward instead of kept; `sink`: who takes
    the block's parameter gradients instead of `.grad` (module docstring)."""
    if not x.requires_grad:  # nothing upstream learns, but the block's parameters still do
        x = x.detach().requires_grad_(True)
    return _Recompute.apply(block, sink, x)
