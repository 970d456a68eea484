"""AdamW's maths on tensors already held: torch's fused kernel, whole groups or slice by slice.

`fused_adamw` is `torch.optim.AdamW(fused=True)`'s kernel over lists of per-parameter views, so
every element sees plain PyTorch's maths. bf16 grads must be widened to fp32 first (the kernel
reads grads in the master's dtype): on the device a whole chunk goes into one scratch buffer; on
the host `sliced_adamw` widens one slice of a parameter at a time into a small buffer and updates
that slice at once, so grad, master, moments and the bf16 copy are read while still in cache
rather than in two passes over memory. The maths per element is the same either way.
`host_adamw` is what the optimizer runs for such a group: the single-pass native kernel
(`native`: the same maths, to the bit wherever its load-time check against torch's kernel
matches, on as many threads as it is given) where it can be built, else `sliced_adamw`. Knows
nothing of chunks' homes or placement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from homestar.optim import OptimConfig
from homestar.runtime import native

SLICE_ELEMS = 1 << 20
"""Elements per slice on the host: 4 MiB of fp32 grads, 18 MiB touched per slice in all (grad,
its widened copy, master, moments, bf16 param), about a desktop CPU's last-level cache, and few
enough slices that each kernel's thread fork and join stays negligible. `bench/cpu_adam.py` on a
34 M-element chunk (1.3b's at 8 GiB), 2-core dev box: median 0.037 s against 0.043 s for widening
the whole chunk first (slices of 1<<18 gained less: 0.045 against 0.047)."""


@dataclass(frozen=True, slots=True)
class Span:
    """One parameter's range in its chunks, its step count and whether it decays."""

    offset: int
    numel: int
    step: torch.Tensor
    decay: bool


def fused_adamw(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], *, lr: float, config: OptimConfig,
                decay: bool) -> None:
    """One call of torch's fused AdamW; `steps` were already advanced for this step."""
    beta1, beta2 = config.betas
    torch._fused_adamw_(
        params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
        weight_decay=config.weight_decay if decay else 0.0, eps=config.eps, maximize=False,
        grad_scale=None, found_inf=None,
    )


def sliced_adamw(spans: list[Span], grad: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor,
                 exp_avg_sq: torch.Tensor, param: torch.Tensor | None, scratch: torch.Tensor, *,
                 coef: torch.Tensor | None, lr: float, config: OptimConfig) -> None:
    """AdamW of one host group whose grads are bf16: each parameter slice by slice, widened (and
    clipped by `coef`, a CPU scalar) into `scratch`, updated, and cast into `param` (the bf16
    chunk; None when the master is the param). All tensors are the chunks' flat host buffers."""
    for span in spans:
        end = span.offset + span.numel
        for start in range(span.offset, end, SLICE_ELEMS):
            stop = min(end, start + SLICE_ELEMS)
            wide = scratch[: stop - start]
            wide.copy_(grad[start:stop])  # bf16 -> fp32, in cache
            if coef is not None:
                wide.mul_(coef)
            fused_adamw([master[start:stop]], [wide], [exp_avg[start:stop]], [exp_avg_sq[start:stop]], [span.step],
                        lr=lr, config=config, decay=span.decay)
            if param is not None:
                param[start:stop].copy_(master[start:stop])  # fp32 -> bf16 while the slice is in cache


def host_adamw(spans: list[Span], grad: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor,
               exp_avg_sq: torch.Tensor, param: torch.Tensor | None, scratch: Callable[[], torch.Tensor], *,
               coef: torch.Tensor | None, lr: float, config: OptimConfig, threads: int) -> None:
    """`sliced_adamw`'s update of one host group with narrower grads, by the native kernel when
    it is available and the dtypes are its own (bf16 grads and params), on `threads` threads;
    else by `sliced_adamw` itself, on torch's threads, with the fp32 buffer `scratch()` gives
    (asked for only then: the native kernel needs none)."""
    kernel = None
    if grad.dtype == torch.bfloat16 and (param is None or param.dtype == torch.bfloat16):
        kernel = native.kernel()
    if kernel is None:
        sliced_adamw(spans, grad, master, exp_avg, exp_avg_sq, param, scratch(), coef=coef, lr=lr, config=config)
    else:
        native.adamw_spans(kernel, spans, grad, master, exp_avg, exp_avg_sq, param, coef=coef, lr=lr,
                           config=config, threads=threads)


def param_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor 2-norms as torch's clip_grad_norm_ takes them; of bf16 grads, in fp32."""
    if tensors and tensors[0].dtype != torch.float32:
        return list(torch._foreach_norm(tensors, 2.0, dtype=torch.float32))
    return list(torch._foreach_norm(tensors, 2.0))
