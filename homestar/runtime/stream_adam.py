"""AdamW of host-homed chunk groups on the device, streamed slice by slice through a ring of
fixed staging buffers, while the CPU updates other groups.

For each slice of a group: its master and moments (fp32) and its grads are copied host -> device
into one staging set (upload stream), updated there by torch's fused AdamW (compute stream), and
master, moments and the new compute-dtype params are copied back into the host buffers (offload
stream). A set is reused three slices later, once its write-back has read it (a stream wait, no
host sync), so uploads, updates and write-backs of neighbouring slices overlap and both PCIe
directions stay busy. The chunks themselves never move: the placement cache, its budget books and
the step's trace see none of this; the staging sets are charged to the device budget as scratch.

The params' compute-dtype copy is cast from the master over whole slices, elements of no active
parameter included: those hold bf16(master) already (packing, loading and every update keep the
param chunk equal to its master cast), so rewriting them changes nothing and saves uploading the
param slice. A job whose param chunk is cached on the device (`param_on_device`) gets the cast
written there instead: the new params neither cross PCIe now nor again for the next forward.
Knows nothing of modules, hooks, placement policy or the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from homestar.optim import OptimConfig
from homestar.runtime.adam_math import Span, fused_adamw
from homestar.runtime.memory import DeviceSpace

STREAM_SLICE_ELEMS = 1 << 22
"""Elements per streamed slice: 4 M elements move 56 MiB each way (fp32 master and moments, bf16
grad in; the same and the bf16 param out), about 1 ms at PCIe 5 speed: long enough that each
copy's launch cost is noise, short enough that three staging sets cost 240 MiB of the device."""
STAGING_SETS = 3
"""Sets in the ring: one uploading, one updating, one writing back."""


def slice_for(chunk_elems: int) -> int:
    """Elements per slice for chunks of `chunk_elems`: at most a quarter chunk, so the ring
    stays small beside the chunks on a small device."""
    return max(1, min(STREAM_SLICE_ELEMS, -(-chunk_elems // 4)))


@dataclass(slots=True)
class StreamJob:
    """One group's host buffers (flat) and its active parameters' spans."""

    spans: list[Span]
    grad: torch.Tensor
    master: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    param: torch.Tensor | None
    """The compute-dtype param chunk; None when the master is the param (fp32 training)."""
    param_on_device: bool = False
    """`param` is the chunk's device copy (cached there), not its host buffer."""


def _set_buffers(elems: int, grad_dtype: torch.dtype, param_dtype: torch.dtype | None) -> list:
    """(numel, dtype) of one staging set's buffers, None where a set needs none: master and both
    moments; the grads in fp32, as the fused kernel reads them; the grads as they arrive, when
    narrower; the new compute-dtype params, when separate from the master."""
    return [(3 * elems, torch.float32), (elems, torch.float32),
            (elems, grad_dtype) if grad_dtype != torch.float32 else None,
            (elems, param_dtype) if param_dtype not in (None, torch.float32) else None]


def staging_bytes(elems: int, grad_dtype: torch.dtype, param_dtype: torch.dtype) -> int:
    """Device bytes of the ring's staging sets for slices of `elems` elements."""
    buffers = [b for b in _set_buffers(elems, grad_dtype, param_dtype) if b is not None]
    return STAGING_SETS * sum(numel * dtype.itemsize for numel, dtype in buffers)


class _Set:
    """One staging set: device buffers for one slice."""

    def __init__(self, scratch, elems: int, grad_dtype: torch.dtype, param_dtype: torch.dtype | None) -> None:
        self.state, self.wide, self.grad, self.param = (
            None if b is None else scratch(*b) for b in _set_buffers(elems, grad_dtype, param_dtype))
        self.free_after = None
        """Event of this set's last write-back: the next upload into it waits for it."""

    def buffers(self) -> list[torch.Tensor]:
        return [t for t in (self.state, self.wide, self.grad, self.param) if t is not None]


class StagingRing:
    """The staging sets of one step's streamed AdamW, for chunks of up to `chunk_elems`.
    `scratch`/`free_scratch`: the placement's budget-charged device buffers. Made before the
    jobs hold their cached param chunks on the device, so that making room for the ring may
    still evict those."""

    def __init__(self, scratch, free_scratch, chunk_elems: int, grad_dtype: torch.dtype,
                 param_dtype: torch.dtype | None) -> None:
        self.elems = slice_for(chunk_elems)
        self.sets = [_Set(scratch, self.elems, grad_dtype, param_dtype) for _ in range(STAGING_SETS)]
        self._free = free_scratch

    def close(self) -> None:
        """Give the buffers back (on the compute stream: later work queues behind their use)."""
        for ring in self.sets:
            for tensor in ring.buffers():
                self._free(tensor)
        self.sets = []


def stream_adamw(jobs: list[StreamJob], ring: StagingRing, device: DeviceSpace, *,
                 coef: torch.Tensor | None, lr: float, config: OptimConfig, queued=None) -> list:
    """Update every job's group on the device through `ring`; returns, for each job, the event of
    its last write-back (its host buffers, and a device copy updated in place, hold the results
    once it completes; None where nothing was written back). `device`: a device space or one of
    its lanes (`DeviceSpace.lane`), whose context the caller entered. `queued(i, event)`: told as
    soon as job i is queued. The steps in the spans live on the device and were already advanced
    for this step.

    Each job is taken out of `jobs` (its place set to None) once queued: a device param chunk it
    updates in place must not outlive the placement's hold on it. The update runs beside the next
    forward, which lets the group go and may evict that chunk while later jobs are still being
    queued; a reference kept here held the evicted chunk's memory uncounted (6.7b at 8 GiB ran out
    of device memory with three such chunks alive)."""
    if coef is not None and jobs:
        coef = coef.to(device.device)  # once; a device scalar when the norm was taken there
    done = []
    turn = 0
    for i in range(len(jobs)):
        job, jobs[i] = jobs[i], None
        last = None
        for start, stop, spans in _slices(job.spans, ring.elems):
            staging = ring.sets[turn % STAGING_SETS]
            turn += 1
            last = _one_slice(job, start, stop, spans, staging, device, coef, lr, config)
        done.append(last)
        job = None  # the list's reference is gone: nothing here keeps the job's buffers now
        if queued is not None:
            queued(i, last)
    return done


def _one_slice(job: StreamJob, start: int, stop: int, spans: list[Span], staging: _Set, device: DeviceSpace,
               coef: torch.Tensor | None, lr: float, config: OptimConfig):
    n = stop - start
    size = staging.wide.numel()
    master, exp_avg, exp_avg_sq = (staging.state[i * size: i * size + n] for i in range(3))
    grad_in = staging.wide[:n] if staging.grad is None else staging.grad[:n]
    # the uploads wait for this set's previous write-back (stream waits only)
    ins = [(master, job.master), (exp_avg, job.exp_avg), (exp_avg_sq, job.exp_avg_sq), (grad_in, job.grad)]
    uploaded = device.upload_into([(dst, src[start:stop]) for dst, src in ins], staging.free_after)
    device.compute_wait(uploaded, staging.state)
    wide = staging.wide[:n]
    if staging.grad is not None:
        wide.copy_(grad_in)  # bf16 -> fp32 on the device
    if coef is not None:
        wide.mul_(coef)
    for decay in (True, False):
        chosen = [s for s in spans if s.decay is decay]
        if chosen:
            views = [(s.offset - start, s.offset - start + s.numel) for s in chosen]
            fused_adamw([master[a:b] for a, b in views], [wide[a:b] for a, b in views],
                        [exp_avg[a:b] for a, b in views], [exp_avg_sq[a:b] for a, b in views],
                        [s.step for s in chosen], lr=lr, config=config, decay=decay)
    outs = [(master, job.master), (exp_avg, job.exp_avg), (exp_avg_sq, job.exp_avg_sq)]
    if job.param_on_device:  # fp32 -> compute dtype over the whole slice (see the module doc)
        job.param[start:stop].copy_(master)  # into the cached device copy: nothing crosses PCIe
    elif job.param is not None:
        staging.param[:n].copy_(master)
        outs.append((staging.param[:n], job.param))
    # after the compute stream's update (a stream wait), D2H into the pinned host buffers
    staging.free_after = device.download_into([(dst[start:stop], src) for src, dst in outs], None)
    return staging.free_after


def _slices(spans: list[Span], elems: int):
    """(start, stop, spans clipped to it) for each slice of at most `elems` elements that holds
    some active parameter; slices follow the spans, so padding and gaps are not moved."""
    pieces = []
    for span in sorted(spans, key=lambda s: s.offset):
        for a in range(span.offset, span.offset + span.numel, elems):
            b = min(span.offset + span.numel, a + elems)
            pieces.append(Span(offset=a, numel=b - a, step=span.step, decay=span.decay))
    slice_start, current = None, []
    for piece in pieces:
        end = piece.offset + piece.numel
        if slice_start is not None and end - slice_start > elems:
            yield slice_start, current[-1].offset + current[-1].numel, current
            slice_start, current = None, []
        if slice_start is None:
            slice_start = piece.offset
        current.append(piece)
    if current:
        yield slice_start, current[-1].offset + current[-1].numel, current
