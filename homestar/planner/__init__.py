"""Hardware probe and fit planner: which preset this machine can train, how, and how fast.

`probe()` describes the machine, `make_plan()` judges every preset against it (or against given
budgets), `recommend()` names the one to train, `format_table()` / `plans_json()` present the
plan. Imports torch (through the model) but never textual, datasets, the trainer or the app.
"""

from homestar.planner.memory import Estimate, Overheads, estimate, named_sizes
from homestar.planner.placement import Fit, fit
from homestar.planner.plan import PlanWarning, PresetPlan, make_plan, recommend
from homestar.planner.probe import GPUInfo, MachineInfo, probe
from homestar.planner.report import format_table, machine_summary, plans_json
from homestar.planner.speed import SpeedFacts, tokens_per_second

__all__ = [
    "Estimate",
    "Fit",
    "GPUInfo",
    "MachineInfo",
    "Overheads",
    "PlanWarning",
    "PresetPlan",
    "SpeedFacts",
    "estimate",
    "fit",
    "format_table",
    "machine_summary",
    "make_plan",
    "named_sizes",
    "plans_json",
    "probe",
    "recommend",
    "tokens_per_second",
]
