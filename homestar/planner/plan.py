"""The fit plan: for every preset, does it fit this machine, how, how fast; and which one to train.

For each preset the planner picks precision (bf16 where the GPU has it, fp16 on older cards, fp32
on the CPU), the chunk size and the micro-batch: among the divisors of the preset's global batch,
the one with the best estimated speed (`speed.py`); accumulation makes up the rest of the global
batch. The chunk size is the one `runtime.attach` picks for the same device budget (least
padding under a cap of 1/8 of the budget for the streaming working set; a parameter above the
cap, such as a large embedding, in a chunk of its own): the plan names it, and `--preset auto`
hands it to the runtime. Budgets default to the first GPU's free memory and the host's
available memory (cgroup-aware); `--gpu-mem-gib` / `--cpu-mem-gib` replace them. A GPU budget
counts the CUDA context, as a card's memory does. A preset
- fits ("yes") when the runtime could place it within 85% of both budgets (`placement.fit`),
- is "tight" when it could place it only within the full budgets,
- does not fit ("no") otherwise.
A fitting plan's host peak is the runtime's under the budgets the verdict was reached with (85%
of them for "yes"). Its GPU peak is the runtime's steady state under the device budget the
runtime will actually be given, the whole `--gpu-mem-gib` or the card's free memory less the
context: the runtime caches chunks up to its budget, so a model larger than the card ends near
it whatever margin the verdict kept. `gpu_peak_gib` counts torch's allocator alone, as
`homestar bench` measures it and `--gpu-mem-gib` caps it; `gpu_card_gib` adds the context.
When the host cannot hold every chunk group the runtime homes the rest
on the GPU, which it does only when told the host budget: the plan then carries the chunk budget
(`host_chunk_gib`, which `--preset auto` hands to the runtime) and the `--cpu-mem-gib` that gives
`homestar train` that much for chunks (a cap on the whole process: the chunks, the process itself,
a checkpoint's staging and a working reserve), and its reason says so.

The recommendation is the largest preset that fits with margin and trains at a *useful speed*:
100 M tokens within a day (about 1,160 tokens/s), enough to watch a model learn, and as long as a
home machine is worth tying up for it. When none is that fast: the smallest that fits; when none
fits with margin: the smallest tight one; when nothing fits: the smallest, which `recommend`
then refuses with a BudgetError.

Knows nothing of the trainer, the app or the runtime's live state; reads presets and machine
facts only.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from homestar.errors import BudgetError, ConfigError
from homestar.model import Preset, list_presets, load_preset
from homestar.planner.memory import GIB, WORKING_RESERVE, Overheads, estimate
from homestar.planner.placement import Fit, fit
from homestar.planner.probe import GPUInfo, MachineInfo
from homestar.planner.probe import probe as probe_machine
from homestar.planner.speed import GpuClass, SpeedFacts, UNKNOWN_GPU, gpu_class, tokens_per_second

MARGIN = 0.85
"""A plan fits ("yes") when it stays within this share of each budget."""


class PlanWarning(UserWarning):
    """A budget the planner accepted but that looks wrong for this machine."""


@dataclass(kw_only=True, slots=True, frozen=True)
class PresetPlan:
    """How one preset would train on the planned machine."""

    preset: str
    params: int
    fits: str
    """"yes" (within 85% of both budgets), "tight" (within them) or "no"."""
    recommended: bool
    gpu_peak_gib: float
    """Predicted GPU memory torch's allocator holds at the steady peak, CUDA context excluded
    (what `homestar bench` reports and `--gpu-mem-gib` caps; 0 on the CPU); for a plan that
    does not fit, the least it would need. Rounded up to 0.01 GiB."""
    cpu_peak_gib: float
    """Predicted host memory of the process; on CUDA its chunk buffers are pinned."""
    chunk_elems: int
    """Elements per chunk: what `runtime.attach` picks for this device budget (the trainer
    passes it on for --preset auto); a parameter larger than it has a chunk of its own."""
    micro_batch: int
    accum: int
    device: str
    precision: str
    est_tok_s: float | None
    """Estimated training tokens per second; None when the preset does not fit."""
    reason: str
    cpu_mem_gib: float | None = None
    """The --cpu-mem-gib to train this plan with, when the host cannot hold every chunk group
    and the runtime must home some on the GPU; None otherwise."""
    host_chunk_gib: float | None = None
    """The host budget for chunks alone that `cpu_mem_gib` leaves (None likewise)."""
    gpu_card_gib: float = 0.0
    """`gpu_peak_gib` plus the CUDA context: what the card holds (0 on the CPU)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class _Target:
    """What a plan is made for: device, precision, budgets in bytes and speed figures."""

    device: str
    precision: str
    gpu_budget: int | None
    """GPU bytes, context included; on the CPU the simulated device space's budget (None:
    unbounded)."""
    runtime_gpu_budget: int | None
    """The device budget the runtime will be given (allocator bytes, context excluded): the
    whole --gpu-mem-gib, else the card's free memory less the context. None on the CPU."""
    host_budget: int
    gpu: GpuClass
    cores: int


def make_plan(
    machine: MachineInfo,
    *,
    gpu_mem_gib: float | None = None,
    cpu_mem_gib: float | None = None,
    device: str = "auto",
    presets: Iterable[Preset | str] | None = None,
    facts: SpeedFacts = SpeedFacts(),
    overheads: Overheads = Overheads(),
) -> list[PresetPlan]:
    """One plan per preset (default: every shipped one), smallest first, exactly one recommended.

    The budgets (GiB) replace the machine's free GPU memory and available host memory; a budget
    that is not a positive number is a ConfigError, one larger than the machine a PlanWarning."""
    target = _target(machine, gpu_mem_gib, cpu_mem_gib, device, overheads.cuda_context_bytes)
    plans = [_plan_preset(p, target, facts, overheads) for p in _presets(presets)]
    return _mark_recommended(plans, facts)


def recommend(*, gpu_mem_gib: float | None = None, cpu_mem_gib: float | None = None, device: str = "auto") -> str:
    """Probe this machine and return the recommended preset's name; BudgetError when none fits."""
    plans = make_plan(probe_machine(), gpu_mem_gib=gpu_mem_gib, cpu_mem_gib=cpu_mem_gib, device=device)
    best = next(p for p in plans if p.recommended)
    if best.fits == "no":
        raise BudgetError(f"no preset fits this machine: even {best.preset} {best.reason.split('; ', 1)[-1]}")
    return best.preset


# ---------------------------------------------------------------- inputs


def _target(machine: MachineInfo, gpu_mem_gib: float | None, cpu_mem_gib: float | None, device: str,
            context: int) -> _Target:
    _check_budget("--gpu-mem-gib", gpu_mem_gib)
    _check_budget("--cpu-mem-gib", cpu_mem_gib)
    if device not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"device must be auto, cuda or cpu, not {device!r}")
    if device == "auto":
        device = "cuda" if machine.gpus else "cpu"
    host_budget = _host_budget(machine, cpu_mem_gib)
    if device == "cpu":  # a GPU budget sizes the simulated device space, inside host memory
        simulated = None if gpu_mem_gib is None else int(gpu_mem_gib * GIB)
        return _Target(device="cpu", precision="fp32", gpu_budget=simulated, runtime_gpu_budget=None,
                       host_budget=host_budget, gpu=UNKNOWN_GPU, cores=machine.cpu_cores)
    gpu = machine.gpus[0] if machine.gpus else None
    if gpu is None and gpu_mem_gib is None:
        raise ConfigError("no CUDA GPU on this machine; plan for one with --gpu-mem-gib, or use --device cpu")
    if gpu is None:
        _warn(f"no CUDA GPU on this machine; planning for a hypothetical {gpu_mem_gib:g} GiB card")
    gpu_budget = _gpu_budget(gpu, gpu_mem_gib)
    # the runtime is given --gpu-mem-gib whole, or takes the card's free memory once its context exists
    runtime_gpu_budget = gpu_budget if gpu_mem_gib is not None else max(gpu_budget - context, 0)
    return _Target(device="cuda", precision="bf16" if gpu is None or gpu.bf16 else "fp16",
                   gpu_budget=gpu_budget, runtime_gpu_budget=runtime_gpu_budget, host_budget=host_budget,
                   gpu=gpu_class(gpu), cores=machine.cpu_cores)


def _check_budget(flag: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{flag} must be a positive number of GiB, got {value!r}")


def _gpu_budget(gpu: GPUInfo | None, gpu_mem_gib: float | None) -> int:
    if gpu_mem_gib is None:
        return gpu.free_bytes
    budget = int(gpu_mem_gib * GIB)
    if gpu is not None and budget > gpu.total_bytes:
        _warn(f"--gpu-mem-gib {gpu_mem_gib:g} is more than GPU {gpu.index} has ({gpu.total_bytes / GIB:.1f} GiB); "
              "planning for the budget as given, but training will refuse it")
    elif gpu is not None and budget > gpu.free_bytes:
        _warn(f"--gpu-mem-gib {gpu_mem_gib:g} is more than GPU {gpu.index} has free now ({gpu.free_bytes / GIB:.1f} GiB)")
    return budget


def _host_budget(machine: MachineInfo, cpu_mem_gib: float | None) -> int:
    if cpu_mem_gib is None:
        return machine.ram_available
    budget = int(cpu_mem_gib * GIB)
    if budget > machine.ram_total:
        _warn(f"--cpu-mem-gib {cpu_mem_gib:g} is more than this machine's memory ({machine.ram_total / GIB:.1f} GiB); "
              "planning for the budget as given")
    elif budget > machine.ram_available:
        _warn(f"--cpu-mem-gib {cpu_mem_gib:g} is more than is available now ({machine.ram_available / GIB:.1f} GiB)")
    return budget


def _presets(presets: Iterable[Preset | str] | None) -> list[Preset]:
    chosen = list_presets() if presets is None else [load_preset(p) if isinstance(p, str) else p for p in presets]
    if not chosen:
        raise ConfigError("no presets to plan: the preset folder is empty")
    return sorted(chosen, key=lambda p: (p.params, p.name))


def _warn(message: str) -> None:
    warnings.warn(message, PlanWarning, stacklevel=4)


# ---------------------------------------------------------------- one preset


@dataclass(kw_only=True, slots=True, frozen=True)
class _Option:
    """One micro-batch choice for a preset: its placement under the budgets, verdict and speed."""

    fit: Fit
    fits: str
    tok_s: float


def _plan_preset(preset: Preset, target: _Target, facts: SpeedFacts, overheads: Overheads) -> PresetPlan:
    global_batch = preset.train.micro_batch * preset.train.accum
    options = [_option(preset, b, global_batch // b, target, facts, overheads)
               for b in range(1, global_batch + 1) if global_batch % b == 0]
    best = _best(options)
    est = best.fit.est
    card = _gpu_figure(best)  # the context is 0 on the CPU
    return PresetPlan(
        preset=preset.name, params=preset.params, fits=best.fits, recommended=False,
        gpu_peak_gib=_gib_up(card - est.context), gpu_card_gib=_gib_up(card),
        cpu_peak_gib=_gib_up(best.fit.host_peak),
        chunk_elems=est.data.chunk_elems, micro_batch=est.micro_batch, accum=global_batch // est.micro_batch,
        device=target.device, precision=target.precision,
        est_tok_s=None if best.fits == "no" else round(best.tok_s, 1),
        reason=_reason(best, target, facts),
        cpu_mem_gib=_process_cap(best.fit),
        host_chunk_gib=None if best.fit.runtime_host_budget is None else _gib_down(best.fit.runtime_host_budget),
    )


def _process_cap(placed: Fit) -> float | None:
    """The --cpu-mem-gib under which `homestar train` leaves the plan's chunk budget to chunks:
    `train.memory_guard.host_chunk_budget` in reverse, the process counted as `host_base`."""
    if placed.runtime_host_budget is None:
        return None
    chunks = _gib_down(placed.runtime_host_budget) * GIB
    overhead = placed.est.host_base + placed.est.staging + WORKING_RESERVE
    return math.ceil((chunks + overhead) / GIB * 10) / 10  # up to 0.1 GiB: never short


def _option(preset: Preset, micro_batch: int, accum: int, target: _Target, facts: SpeedFacts,
            overheads: Overheads) -> _Option:
    # the chunk size comes from the full device budget, as attach derives it, for every verdict
    est = estimate(preset.model, precision=target.precision, micro_batch=micro_batch, gpu_budget=target.gpu_budget,
                   device=target.device, overheads=overheads)
    cpu = target.device == "cpu"
    for verdict, share in (("yes", MARGIN), ("tight", 1.0)):
        gpu_budget = None if target.gpu_budget is None else int(target.gpu_budget * share)
        host_budget = int(target.host_budget * share)
        placed = fit(est, gpu_budget=gpu_budget, host_budget=host_budget,
                     runtime_gpu_budget=target.runtime_gpu_budget)
        if placed is not None:
            tok_s = tokens_per_second(placed, preset.model, accum=accum, gpu=target.gpu, cores=target.cores, facts=facts)
            return _Option(fit=placed, fits=verdict, tok_s=tok_s)
    # What it would need with room to spare: every group homed on the host.
    needs = fit(est, gpu_budget=None if cpu else 1 << 62, host_budget=1 << 62)
    return _Option(fit=needs, fits="no", tok_s=0.0)


def _gpu_figure(option: _Option) -> int:
    """Card memory (context included) of the plan: the steady peak, or for a plan that does not
    fit the least it would need; 0 on the CPU."""
    return option.fit.gpu_min if option.fits == "no" else option.fit.gpu_card_peak


def _best(options: list[_Option]) -> _Option:
    """The fastest option that fits with margin, else the fastest tight one, else micro-batch 1."""
    for verdict in ("yes", "tight"):
        fitting = [o for o in options if o.fits == verdict]
        if fitting:
            return max(fitting, key=lambda o: (o.tok_s, -o.fit.est.micro_batch))
    return options[0]


def _reason(option: _Option, target: _Target, facts: SpeedFacts) -> str:
    placed = option.fit
    if option.fits == "no":
        needs = [f"host {placed.host_peak / GIB:.1f} of {target.host_budget / GIB:.1f} GiB"]
        if target.device == "cuda":
            needs.insert(0, f"GPU {placed.gpu_min / GIB:.1f} of {target.gpu_budget / GIB:.1f} GiB")
        return "needs " + ", ".join(needs)
    text = f"{facts.useful_tokens / 1e6:.0f}M tokens in {_duration(facts.useful_tokens / option.tok_s)}"
    if option.fits == "tight":
        text += f", within {100 - 100 * MARGIN:.0f}% of a budget"
    if placed.device_groups:
        text += (f"; {placed.device_groups} of {placed.est.data.n_chunks} chunk groups live on the GPU: "
                 f"run with --cpu-mem-gib {_process_cap(placed):g}")
    return text


def _mark_recommended(plans: list[PresetPlan], facts: SpeedFacts) -> list[PresetPlan]:
    """Exactly one recommended (see the module docstring)."""
    fitting = [p for p in plans if p.fits == "yes"]
    useful = [p for p in fitting if p.est_tok_s is not None and p.est_tok_s >= facts.useful_tok_s]
    tight = [p for p in plans if p.fits == "tight"]
    if useful:
        pick, why = max(useful, key=lambda p: p.params), "largest that fits with margin at a useful speed"
    elif fitting:
        pick, why = fitting[0], (f"fits with margin; none trains {facts.useful_tokens / 1e6:.0f}M tokens "
                                 f"within {_duration(facts.useful_seconds)} here")
    elif tight:
        pick, why = tight[0], "only tight fits"
    else:
        pick, why = plans[0], "nothing fits"
    return [dataclasses.replace(p, recommended=True, reason=f"{why}; {p.reason}") if p is pick else p for p in plans]


def _gib_down(nbytes: int) -> float:
    """A budget as GiB rounded down to 0.1: a budget is never shown above itself."""
    return math.floor(nbytes / GIB * 10) / 10


def _gib_up(nbytes: int) -> float:
    """Bytes as GiB rounded up to 0.01: a predicted peak is never shown below itself."""
    return math.ceil(nbytes / GIB * 100) / 100


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    if hours < 1 / 60:
        return "<1 min"
    if hours < 1:
        return f"~{hours * 60:.0f} min"
    if hours < 48:
        return f"~{hours:.0f} h"
    return f"~{hours / 24:.0f} days"
