"""Where each chunk group lives: a pure decision from sizes and budgets.

A group homed on the device keeps all its chunks there and runs AdamW there; every other group
is homed on the host (pinned memory on CUDA), its param chunk cached on the device while used,
its AdamW on the CPU. Groups go to the device (last groups first: backward produces their grads
first) when the host budget cannot hold them, when the policy says "device", or ("auto", once a
trace measured the non-model memory) when the margin left after activations, cached param
chunks and one grad chunk holds their whole state. Raises BudgetError, with the numbers, when
the model cannot fit in both budgets. Allocates nothing; knows nothing of tensors or models.
"""

from __future__ import annotations

from dataclasses import dataclass

from homestar.errors import BudgetError
from homestar.runtime.memory import fmt_bytes


@dataclass(frozen=True, slots=True)
class GroupBytes:
    """Bytes of one chunk group by role."""

    param: int
    grad: int
    rest: int
    """Master (when separate from param) plus both Adam moments."""

    @property
    def total(self) -> int:
        return self.param + self.grad + self.rest

    @property
    def state(self) -> int:
        return self.grad + self.rest


def plan_homes(
    groups: list[GroupBytes], *, gpu_cap: float, cpu_cap: float, nonmodel: int, policy: str, fill: bool,
    step_set: int = 0, slack: int = 0,
) -> list[bool]:
    """True per group that lives on the device. `fill`: also use the measured margin ("auto").
    `step_set`: device bytes the optimizer step needs besides the homed groups (the staging sets
    of AdamW streamed through the device); activations are gone by then. `gpu_cap` is what may
    be planned into; `slack`, what the budget keeps beyond it (named in the error only)."""
    home = [policy == "device"] * len(groups)
    host_need = sum(g.total for g, dev in zip(groups, home) if not dev)
    for i in reversed(range(len(groups))):
        if host_need <= cpu_cap:
            break
        if not home[i]:
            home[i] = True
            host_need -= groups[i].total
    homed = sum(g.total for g, dev in zip(groups, home) if dev)
    device_need = homed + max(nonmodel + working_set(groups, home), step_set)
    if host_need > cpu_cap or device_need > gpu_cap:
        raise BudgetError(_explain(groups, gpu_cap, cpu_cap, nonmodel, slack))
    if fill and policy == "auto":
        for i in reversed(range(len(groups))):
            if not home[i]:
                home[i] = True
                if _steady_need(groups, home, nonmodel, step_set) > gpu_cap:
                    home[i] = False
    return home


def _steady_need(groups: list[GroupBytes], home: list[bool], nonmodel: int, step_set: int) -> int:
    """Device bytes in steady state: the homed groups, plus the larger of backward's needs (the
    activations, every streamed param chunk cached, one grad chunk) and the step's."""
    homed = sum(g.total for g, dev in zip(groups, home) if dev)
    cached = sum(g.param for g, dev in zip(groups, home) if not dev)
    backward = nonmodel + cached + max((g.grad for g in groups), default=0)
    return homed + max(backward, step_set)


def working_set(groups: list[GroupBytes], home: list[bool]) -> int:
    """Least device memory streamed groups need: the two largest param chunks (a module's
    params may straddle two) and the largest grad chunk (the one being accumulated into)."""
    streamed = [g for g, dev in zip(groups, home) if not dev]
    if not streamed:
        return 0
    params = sorted((g.param for g in streamed), reverse=True)
    return params[0] + (params[1] if len(params) > 1 else params[0]) + max(g.grad for g in streamed)


def _explain(groups: list[GroupBytes], gpu_cap: float, cpu_cap: float, nonmodel: int, slack: int) -> str:
    total = sum(g.total for g in groups)
    least = working_set(groups, [False] * len(groups))
    parts = [
        f"the model's chunks (params, grads, fp32 master, Adam moments) need {fmt_bytes(total)}",
        f"host budget {_cap(cpu_cap)}",
        f"device budget {_cap(gpu_cap + slack)} (at least {fmt_bytes(least)} of it for the working set"
        + (f", {fmt_bytes(nonmodel)} for activations" if nonmodel else "")
        + (f", {fmt_bytes(slack)} left to the allocator" if slack else "")
        + ")",
    ]
    return "; ".join(parts) + ": raise a budget, use a smaller model or smaller chunks"


def _cap(cap: float) -> str:
    return "unlimited" if cap == float("inf") else fmt_bytes(cap)
