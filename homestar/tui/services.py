"""What the app takes from the world, in one injectable bundle: machine, plans, runs, trainer command.

The defaults use the planner, the runs folder and `python -m homestar`; tests pass fakes (a fixed
machine, fixed plans, a temporary runs folder, a stand-in trainer). No Textual here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from homestar.tui.launch import python_command

MachineProvider = Callable[[], Any]
PlanProvider = Callable[[Any, "float | None", "float | None"], list]


def probe_machine() -> Any:
    from homestar.planner import probe  # imports torch: call it from a worker thread

    return probe()


def plan_presets(machine: Any, gpu_mem_gib: float | None, cpu_mem_gib: float | None) -> list:
    from homestar.planner import make_plan

    return make_plan(machine, gpu_mem_gib=gpu_mem_gib, cpu_mem_gib=cpu_mem_gib)


def list_runs(root: Path) -> list:
    from homestar.train.runs import list_runs as _list_runs  # imports torch (checkpoints)

    return _list_runs(root)


@dataclass(kw_only=True, slots=True)
class Services:
    machine: MachineProvider = probe_machine
    """Returns the machine (a planner MachineInfo or anything with its fields); may be slow."""
    plans: PlanProvider = plan_presets
    """(machine, gpu_mem_gib, cpu_mem_gib) -> PresetPlans, smallest first, one recommended."""
    runs: Callable[[Path], list] = list_runs
    """runs_root -> RunInfos, newest first."""
    runs_root: Path
    command: Callable[[list[str]], list[str]] = python_command
    """homestar arguments -> the full argv of the trainer process."""
    env: dict[str, str] | None = None
    """Environment of the trainer process (None: the app's own)."""
    trainer_nice: int = 10
    """CPU priority of the trainer below the app's, so keys are answered at once on a busy machine.
    Costs the trainer nothing unless something else wants the CPU (the GPU work is unaffected)."""
    clock: Callable[[], float] = time.time
    poll_s: float = 0.2
    """How often the follower looks for new events (a stat and a read; no parsing when idle)."""
    redraw_s: float = 0.25
    """Least time between two redraws of the training screen (events in between are coalesced)."""
    plot_s: float = 1.0
    """Least time between two redraws of the loss curve, the costliest widget to draw."""
    stop_timeout_s: float = 120.0
    """How long "stop and save" waits for the trainer before leaving it to finish alone."""
    follow: bool = True
    """False: screens do not start the follower (tests feed recorded events themselves)."""
