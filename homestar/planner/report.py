"""The plan for people and for programs: a text table with the machine summary, and JSON rows.

Pure formatting of `PresetPlan` and `MachineInfo` values; knows nothing of how they were made.
"""

from __future__ import annotations

import dataclasses

from homestar.planner.plan import PresetPlan
from homestar.planner.probe import GPUInfo, MachineInfo

GIB = 2**30
_FITS = {"yes": "fits", "tight": "tight", "no": "no"}


def format_table(plans: list[PresetPlan], machine: MachineInfo) -> str:
    """The machine summary, one row per preset (the recommended one marked with *), and the
    recommendation with its reason."""
    lines = machine_summary(machine) + [""]
    header = ("", "preset", "params", "fits", "GPU GiB", "host GiB", "chunk", "batch", "tok/s")
    rows = [header] + [_row(p) for p in plans]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {2, 4, 5, 6, 8}
    for row in rows:
        cells = (cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    for plan in plans:
        if plan.recommended:
            lines.append(f"recommended: {plan.preset} ({plan.device}, {plan.precision}): {plan.reason}")
    lines.extend(f"  {p.preset}: {p.reason}" for p in plans if not p.recommended)
    return "\n".join(lines)


def machine_summary(machine: MachineInfo) -> list[str]:
    """Lines describing the GPUs, host memory, cores and free disk."""
    lines = [_gpu_line(g) for g in machine.gpus] or ["GPU: none (CPU training only)"]
    lines.append(f"RAM: {_gib(machine.ram_total)} GiB total, {_gib(machine.ram_available)} GiB available")
    lines.append(f"CPU: {machine.cpu_cores} cores")
    if machine.disk_free is not None:
        lines.append(f"disk: {_gib(machine.disk_free)} GiB free for runs")
    return lines


def plans_json(plans: list[PresetPlan]) -> list[dict]:
    """One JSON-ready object per preset: SPEC's keys (preset, params, fits, recommended,
    gpu_peak_gib, cpu_peak_gib, chunk_elems, micro_batch, accum) plus device, precision,
    est_tok_s and reason."""
    return [dataclasses.asdict(p) for p in plans]


def _gpu_line(gpu: GPUInfo) -> str:
    major, minor = gpu.capability
    extra = "" if gpu.bf16 else ", no bf16"
    if gpu.temperature_c is not None:
        extra += f", {gpu.temperature_c:.0f} C"
    if gpu.utilization is not None:
        extra += f", {gpu.utilization:.0f}% busy"
    return (f"GPU {gpu.index}: {gpu.name}, {_gib(gpu.total_bytes)} GiB total, {_gib(gpu.free_bytes)} GiB free "
            f"(sm {major}.{minor}{extra})")


def _row(plan: PresetPlan) -> tuple[str, ...]:
    gpu = "-" if plan.device == "cpu" else f"{plan.gpu_peak_gib:.1f}"
    speed = "-" if plan.est_tok_s is None else _count(plan.est_tok_s)
    return ("*" if plan.recommended else "", plan.preset, _count(plan.params), _FITS[plan.fits], gpu,
            f"{plan.cpu_peak_gib:.1f}", _count(plan.chunk_elems), f"{plan.micro_batch}x{plan.accum}", speed)


def _count(n: float) -> str:
    """1234 -> '1.2K', 124_000_000 -> '124M', 1.3e9 -> '1.3B'."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            value = n / size
            return f"{value:.1f}{suffix}" if value < 10 else f"{value:.0f}{suffix}"
    return f"{n:.0f}"


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"
