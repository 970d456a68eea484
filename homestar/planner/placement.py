"""Placement under budgets: where the runtime would keep each chunk group, and the peaks.

From an `Estimate` (memory.py) and the budgets it decides, by the runtime's own rule
(`runtime.homes.plan_homes`), which chunk groups are homed on the host (pinned on CUDA, at their
exact size) and which on the GPU because the host budget cannot hold them; then the runtime's
steady state after its warm-up trace (`steady_state`): groups whose whole state fits the
device's margin move there, host-homed param chunks stay cached while there is room. The GPU
figures come in two kinds: card memory with the CUDA context (`Fit.gpu_min`, what a verdict
weighs) and the bytes torch's allocator holds without it (`Fit.gpu_peak`, what the runtime's
budget and `--gpu-mem-gib` cap and `homestar bench` reports).

Pure functions of the estimate and the budgets: nothing is allocated. Knows nothing of presets,
of the machine's hardware or of the runtime's live state.
"""

from __future__ import annotations

from dataclasses import dataclass

from homestar.errors import BudgetError
from homestar.planner.memory import WORKING_RESERVE, Estimate
from homestar.runtime.config import NONMODEL_HEADROOM
from homestar.runtime.homes import GroupBytes, plan_homes, working_set
from homestar.runtime.memory import budget_slack


@dataclass(kw_only=True, slots=True, frozen=True)
class Fit:
    """Where the chunks live under given budgets, and the resulting peaks. On the CPU every
    figure is host memory and `gpu_*` are zero.

    Two GPU figures, two meanings: `gpu_min` is card memory (CUDA context included), the need
    a verdict weighs against a card's budget; `gpu_peak` is the bytes torch's caching allocator
    holds (reserved) in steady state, CUDA context excluded: the runtime's own budget counts
    those alone, `--gpu-mem-gib` caps them, and `homestar bench` reports them. `gpu_card_peak`
    adds the context back."""

    est: Estimate
    device_groups: int
    """Groups homed on the GPU from the start (the host budget could not hold them)."""
    steady: tuple[bool, ...]
    """Per group: on the GPU after the warm-up trace (its optimizer runs there)."""
    cached_param_bytes: int
    """Param chunks of host-homed groups that stay cached on the GPU between uses."""
    gpu_min: int
    """The least GPU memory the run trains in, CUDA context included."""
    gpu_peak: int
    """Allocator (reserved) bytes in steady state, CUDA context excluded (see `steady_state`)."""
    runtime_gpu_budget: int
    """The device budget the steady state was worked out for: the runtime's `gpu_budget_bytes`
    (allocator bytes, the context outside it); `gpu_peak` never exceeds it. 0 on the CPU."""
    host_peak: int
    """Host memory of the process; on CUDA its chunk buffers are pinned (cannot be swapped)."""
    runtime_host_budget: int | None
    """The host budget to give the runtime (chunk bytes only) for this placement; None when
    every group fits on the host anyway."""

    @property
    def gpu_card_peak(self) -> int:
        """Card memory at the steady peak: `gpu_peak` plus the CUDA context."""
        return self.gpu_peak + self.est.context

    @property
    def steady_groups(self) -> int:
        return sum(self.steady)

    @property
    def streamed(self) -> GroupBytes:
        """Bytes of the groups that stay homed on the host, summed by role."""
        groups = [g for g, dev in zip(self.est.data.groups, self.steady) if not dev]
        return GroupBytes(param=sum(g.param for g in groups), grad=sum(g.grad for g in groups),
                          rest=sum(g.rest for g in groups))

    @property
    def streamed_elems(self) -> int:
        """Elements of the groups whose optimizer runs on the CPU."""
        return sum(self.est.data.layout.chunk_numel(i) for i, dev in enumerate(self.steady) if not dev)


def fit(est: Estimate, *, gpu_budget: int | None, host_budget: int,
        runtime_gpu_budget: int | None = None) -> Fit | None:
    """The placement the runtime would choose under these budgets (bytes; on the CPU
    `gpu_budget` caps the simulated device space, None: unbounded); None when it would refuse.

    On CUDA `gpu_budget` is card memory, the context included: the run must fit in it.
    `runtime_gpu_budget` is the device budget the runtime itself will be given (allocator
    bytes): the whole `--gpu-mem-gib`, or without it the card's free memory once the context
    exists, which is the default (`gpu_budget` less the context). The steady state, and so
    `gpu_peak`, is the runtime's under that budget: it fills its budget, not the verdict's."""
    if est.device == "cpu":
        return _fit_cpu(est, gpu_budget, host_budget)
    if gpu_budget is None:
        raise ValueError("a CUDA plan needs a GPU budget")
    runtime = gpu_budget - est.context if runtime_gpu_budget is None else runtime_gpu_budget
    return _fit_cuda(est, gpu_budget, host_budget, runtime)


def _fit_cpu(est: Estimate, simulated: int | None, host_budget: int) -> Fit | None:
    # The simulated device keeps a copy of every param and grad chunk it can through the warm-up
    # step, before groups move there for good: at that peak the host holds both.
    data, n = est.data, est.data.n_chunks
    copies = sum(g.param + g.grad for g in data.groups)
    copies = copies if simulated is None else min(copies, simulated)
    training = data.total_bytes() + est.host_scratch([True] * n) + est.nonmodel + copies
    host = est.host_base + max(est.attach_peak([False] * n), training)
    if host > host_budget or (simulated is not None and est.chunks_in_use() > simulated):
        return None
    return Fit(est=est, device_groups=0, steady=(False,) * n, cached_param_bytes=0, gpu_min=0, gpu_peak=0,
               runtime_gpu_budget=0, host_peak=host, runtime_host_budget=None)


def _fit_cuda(est: Estimate, gpu_budget: int, host_budget: int, runtime_budget: int) -> Fit | None:
    groups, n = list(est.data.groups), est.data.n_chunks
    gpu_cap = _usable(est, gpu_budget - est.context)
    # The runtime's own check counts two param chunks and one grad chunk; reserve the prefetched
    # and draining ones too, so a plan that fits also overlaps its transfers.
    reserve = est.nonmodel + max(0, est.chunks_in_use() - working_set(groups, [False] * n))
    homes = _start_homes(est, groups, gpu_cap, reserve, host_budget)
    if homes is None:
        return None
    start, cpu_cap, host_peak = homes
    steady = steady_state(est, cpu_cap=cpu_cap, gpu_cap=runtime_budget)
    if steady is None:
        return None
    settled, cached, gpu_peak = steady
    streamed = [not dev for dev in start]
    working = est.chunks_in_use(streamed) if any(streamed) else 0
    on_gpu = sum(g.total for g, dev in zip(groups, start) if dev)
    gpu_min = est.context + est.nonmodel + on_gpu + working
    return Fit(est=est, device_groups=sum(start), steady=tuple(settled), cached_param_bytes=cached, gpu_min=gpu_min,
               gpu_peak=gpu_peak, runtime_gpu_budget=runtime_budget, host_peak=host_peak,
               runtime_host_budget=int(cpu_cap) if any(start) else None)


def steady_state(est: Estimate, *, cpu_cap: float, gpu_cap: int) -> tuple[list[bool], int, int] | None:
    """The runtime's device after its warm-up trace, under its device budget `gpu_cap`
    (allocator bytes) and host chunk budget `cpu_cap`: (homes, cached param bytes, peak); None
    when the runtime would refuse.

    Its rules (`engine._replan`, `homes.plan_homes` with fill, `placement`): under its budget
    less the allocator's slack (CUDA), with the measured non-model peak (here `est.nonmodel`)
    plus the runtime's headroom over it, every host-homed param chunk counted as cached and
    one grad chunk in flight, groups whose whole state fits the margin left move onto the
    device; host-homed param chunks stay cached, whole, while there is room (eviction only when
    room is needed). So the peak, at backward's largest non-model moment, is non-model memory
    plus device-homed groups plus cached params plus a grad chunk in flight: for a model larger
    than the card, within one group (or, when not every param chunk fits, one param chunk) of
    the budget; for a model that fits, every chunk plus non-model memory, well under it. The
    step holds the device groups, the cache and either the fp32 buffer the device groups' bf16
    grads are widened into or the streamed AdamW's staging ring, without activations; the
    warm-up before the re-plan holds less. On the simulated device this is the runtime's
    accounted peak to the byte (tests/test_planner.py). On CUDA torch's
    reserved bytes add their own rounding and cached blocks on top (not modelled: a streaming
    model's reserved peak ends near the cap `--gpu-mem-gib` sets, 4-6% above this figure at
    8 GiB; BENCHMARKS.md).

    Checked against `homestar bench` on an H200 (`--gpu-mem-gib 8`, torch's reserved peak):
    350m at micro-batch 16, chunks of 71.6M: predicted 7.53 GiB, measured 7.80 (x1.04); 1.3b
    at micro-batch 8, chunks of 33.8M: predicted 7.75 GiB, measured 7.54 (x0.97). Both
    measured before this rule was written (the plan then said 6.80 for both).
    """
    groups = list(est.data.groups)
    usable = _usable(est, gpu_cap)
    reserve = int(est.nonmodel * (1 + NONMODEL_HEADROOM))  # what the runtime sets aside for activations
    staging = est.stream_staging()
    try:
        homes = plan_homes(groups, gpu_cap=usable, cpu_cap=cpu_cap, nonmodel=reserve, policy="auto", fill=True,
                           step_set=staging)
    except BudgetError:
        return None
    homed = sum(g.total for g, dev in zip(groups, homes) if dev)
    hosted = [g for g, dev in zip(groups, homes) if not dev]
    in_flight = max((g.grad for g in hosted), default=0)
    room = usable - reserve - homed - in_flight
    cached = 0
    for group in hosted:  # whole chunks: a chunk is cached entirely or not at all
        if cached + group.param <= room:
            cached += group.param
    backward = est.nonmodel + homed + cached + in_flight
    # the step widens the device groups' grads first and frees that buffer before the streamed
    # groups' staging ring is made (`ChunkAdamW._adam_all`): the two never coexist
    step = homed + cached + max(est.widen_scratch(homes), staging if hosted else 0)
    return homes, cached, min(gpu_cap, max(backward, step))


def _usable(est: Estimate, budget: int) -> int:
    """What the runtime plans into of a device budget: on CUDA, all but `budget_slack` (as
    `DeviceSpace.usable`); the simulated device keeps no slack."""
    return budget - budget_slack(budget) if est.device == "cuda" else budget


def _start_homes(est: Estimate, groups: list[GroupBytes], gpu_cap: int, reserve: int,
                 host_budget: int) -> tuple[list[bool], float, int] | None:
    """The runtime's homes at attach under the host budget, the chunk budget that yields them
    and the host peak. The chunk budget starts at what the process leaves and shrinks while
    attach's transient fp32 parameters or the optimizer's scratch would push past the budget
    (a few rounds: each one homes more groups on the GPU). What `homestar train` sets aside
    under a process cap (a checkpoint's staging, a working reserve) is left out from the start,
    so the chunk budget found is the one `train` derives from the advised `--cpu-mem-gib`."""
    cpu_cap = float(host_budget - est.host_base - est.staging - WORKING_RESERVE)
    for _ in range(8):
        if cpu_cap < 0:
            return None
        try:
            start = plan_homes(groups, gpu_cap=gpu_cap, cpu_cap=cpu_cap, nonmodel=reserve, policy="auto", fill=False)
        except BudgetError:
            return None
        on_host = [not dev for dev in start]
        chunks = sum(g.total for g, host in zip(groups, on_host) if host)
        peak = est.host_base + max(est.attach_peak(start), chunks + est.host_scratch(on_host))
        if peak <= host_budget:
            return start, cpu_cap, peak
        cpu_cap = min(cpu_cap, chunks) - (peak - host_budget)
    return None
