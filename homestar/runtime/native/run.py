"""Running the loaded kernel over parameters' spans of a group's flat host buffers, on threads.

`adamw_spans` checks the buffers and spans, cuts the spans' elements into contiguous pieces of
about equal size, one list per thread (`_cut`: at whole cache lines from a span's start, each
piece knowing where torch's scalar tail of its span begins), and runs them: this thread the first,
a pool of helper threads made once the others (`_pool`; the kernel's calls release the GIL).
`bias_corrections` gives the step's scalars as torch's kernel takes them. Knows nothing of
compiling or loading the kernel, of chunks, placement or the optimizer; bf16 grads and params,
fp32 state only.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from homestar.optim import OptimConfig

if TYPE_CHECKING:
    from homestar.runtime.adam_math import Span
    from homestar.runtime.native.probe import Kernel

PIECE_ALIGN = 64
"""Pieces are cut at multiples of this many elements from a span's start: whole cache lines of
every buffer (64 bf16 = 2 lines, 64 fp32 = 4), so two threads never write one line."""
MIN_PIECE = 1 << 16
"""Fewer elements than this per thread are not worth a thread's hand-off (tens of microseconds
against the kernel's ~1 G elements/s per core)."""


def bias_corrections(beta1: float, beta2: float, step: float) -> tuple[float, float]:
    """1 - beta1^step and sqrt(1 - beta2^step) in double, as torch's kernel takes them (Python's
    float power is the C library's pow, as std::pow)."""
    return 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)


@dataclass(frozen=True, slots=True)
class _Piece:
    """Elements [start, start + numel) of the buffers, `tail` of them in torch's vector body."""

    start: int
    numel: int
    tail: int
    decay: bool
    bc1: float
    bc2_sqrt: float


def adamw_spans(kern: Kernel, spans: list[Span], grad: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor,
                exp_avg_sq: torch.Tensor, param: torch.Tensor | None, *, coef: torch.Tensor | float | None,
                lr: float, config: OptimConfig, threads: int) -> None:
    """AdamW of the parameters in `spans` (steps already advanced) over a group's flat host
    buffers: bf16 `grad` and `param` (None when the master is the param), fp32 `master` and
    moments. `coef`: the grad clip's scale (a CPU scalar), None for none. The spans' elements are
    cut into `threads` contiguous pieces of about equal size; this thread runs the first, a pool
    made once runs the others (the kernel's calls release the GIL)."""
    _check(spans, grad, master, exp_avg, exp_avg_sq, param, coef, threads)
    scale = 1.0 if coef is None else float(coef)
    beta1, beta2 = config.betas
    pieces = _cut(kern, spans, threads, beta1, beta2)
    if not pieces:
        return
    base = (grad.data_ptr(), master.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
            None if param is None else param.data_ptr())

    def run(part: list[_Piece]) -> None:
        g, mst, m, v, prm = base
        for piece in part:
            s = piece.start
            kern.fn(g + 2 * s, mst + 4 * s, m + 4 * s, v + 4 * s, None if prm is None else prm + 2 * s, piece.numel,
                    piece.tail, kern.body_form, kern.tail_form, scale, lr, beta1, beta2, config.eps,
                    config.weight_decay if piece.decay else 0.0, piece.bc1, piece.bc2_sqrt)

    if len(pieces) == 1:
        run(pieces[0])
        return
    futures = [_pool(len(pieces) - 1).submit(run, part) for part in pieces[1:]]
    try:
        run(pieces[0])
    finally:
        for future in futures:
            future.result()  # waits for all (the buffers must outlive every piece)


def _cut(kern: Kernel, spans: list[Span], threads: int, beta1: float, beta2: float) -> list[list[_Piece]]:
    """The spans' elements as `threads` lists of pieces of about equal total size (fewer when
    there is little work), cut at PIECE_ALIGN from a span's start; each piece knows where torch's
    tail of its span starts within it."""
    total = sum(span.numel for span in spans)
    if total == 0:
        return []
    parts = max(1, min(threads, -(-total // MIN_PIECE)))
    share = -(-total // parts)
    out: list[list[_Piece]] = [[]]
    room = share
    for span in spans:
        if span.numel == 0:
            continue
        bc1, bc2_sqrt = bias_corrections(beta1, beta2, float(span.step.item()))
        body = span.numel - span.numel % kern.vector  # torch's tail: the span's last numel % vector
        start = 0
        while start < span.numel:
            if room <= 0 and len(out) < parts:
                out.append([])
                room = share
            take = span.numel - start
            if take > room and len(out) < parts:
                take = max(PIECE_ALIGN, -(-room // PIECE_ALIGN) * PIECE_ALIGN)  # up to an aligned cut
                take = min(take, span.numel - start)
            tail = min(max(body - start, 0), take)
            out[-1].append(_Piece(span.offset + start, take, tail, span.decay, bc1, bc2_sqrt))
            start += take
            room -= take
    return [part for part in out if part]


def _check(spans: list[Span], grad: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor,
           exp_avg_sq: torch.Tensor, param: torch.Tensor | None, coef, threads: int) -> None:
    named = {"grad": (grad, torch.bfloat16), "master": (master, torch.float32), "exp_avg": (exp_avg, torch.float32),
             "exp_avg_sq": (exp_avg_sq, torch.float32)}
    if param is not None:
        named["param"] = (param, torch.bfloat16)
    end = max((span.offset + span.numel for span in spans), default=0)
    for name, (tensor, dtype) in named.items():
        if tensor.dtype != dtype:
            raise ValueError(f"native AdamW: {name} must be {dtype}, got {tensor.dtype}")
        if tensor.device.type != "cpu":
            raise ValueError(f"native AdamW: {name} must be on the CPU, got {tensor.device}")
        if not tensor.is_contiguous():
            raise ValueError(f"native AdamW: {name} must be contiguous")
        if tensor.numel() < end:
            raise ValueError(f"native AdamW: {name} holds {tensor.numel()} elements, the spans reach {end}")
    for span in spans:
        if span.offset < 0 or span.numel < 0:
            raise ValueError(f"native AdamW: a span's offset and numel must be >= 0, got {span}")
        if span.step.numel() != 1:
            raise ValueError("native AdamW: a span's step must be one number")
    if coef is not None and isinstance(coef, torch.Tensor) and (coef.numel() != 1 or coef.device.type != "cpu"):
        raise ValueError(f"native AdamW: coef must be a CPU scalar, got shape {tuple(coef.shape)} on {coef.device}")
    if threads < 1:
        raise ValueError(f"native AdamW: threads must be >= 1, got {threads}")


_pool_lock = threading.Lock()
_pool_now: tuple[ThreadPoolExecutor, int, int] | None = None
"""The helper threads' pool, its size and the process that made it."""


def _pool(workers: int) -> ThreadPoolExecutor:
    """The pool of helper threads, made once and reused (a new one only when more workers are
    wanted than it has, or in a forked child, where the parent's threads do not exist)."""
    global _pool_now
    with _pool_lock:
        if _pool_now is not None:
            pool, size, pid = _pool_now
            if size >= workers and pid == os.getpid():
                return pool
            if pid == os.getpid():
                pool.shutdown(wait=False)  # work already given to it still runs
        pool = ThreadPoolExecutor(workers, thread_name_prefix="homestar-native-adam")
        _pool_now = (pool, workers, os.getpid())
        return pool
