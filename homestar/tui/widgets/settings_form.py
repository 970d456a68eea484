"""Advanced settings: steps, micro-batch, accumulation, precision and the two memory budgets.

Blank means "the default": the plan's micro-batch and accumulation, all the memory there is.
`read()` returns the typed values or raises ConfigError with a message for the user.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.containers import Grid
from textual.message import Message
from textual.widgets import Input, Label, Select

from homestar.errors import ConfigError
from homestar.tui.launch import PRECISIONS

DEFAULT_STEPS = 1000


@dataclass(kw_only=True, slots=True)
class Settings:
    steps: int
    micro_batch: int | None
    accum: int | None
    precision: str
    gpu_mem_gib: float | None
    cpu_mem_gib: float | None


class SettingsForm(Grid):
    class BudgetsChanged(Message):
        """The GPU or host budget changed to valid values: the plan should be made again."""

        def __init__(self, gpu_mem_gib: float | None, cpu_mem_gib: float | None):
            super().__init__()
            self.gpu_mem_gib = gpu_mem_gib
            self.cpu_mem_gib = cpu_mem_gib

    def compose(self) -> ComposeResult:
        yield Label("Steps")
        yield Input(str(DEFAULT_STEPS), type="integer", id="set-steps", compact=True)
        yield Label("Precision")
        yield Select([(p, p) for p in PRECISIONS], value="auto", allow_blank=False, id="set-precision", compact=True)
        yield Label("Micro-batch")
        yield Input(placeholder="plan", type="integer", id="set-micro-batch", compact=True)
        yield Label("Accum")
        yield Input(placeholder="plan", type="integer", id="set-accum", compact=True)
        yield Label("GPU GiB")
        yield Input(placeholder="all free", type="number", id="set-gpu", compact=True)
        yield Label("Host GiB")
        yield Input(placeholder="all free", type="number", id="set-cpu", compact=True)

    def show_plan(self, plan) -> None:
        """Put the plan's batch shape in the batch fields' placeholders (a blank field uses it)."""
        for key in ("micro_batch", "accum"):
            field = self.query_one(f"#set-{key.replace('_', '-')}", Input)
            value = getattr(plan, key, None)
            field.placeholder = f"plan: {value}" if value is not None else "plan"

    def read(self) -> Settings:
        steps = _int(self, "steps", "Steps")
        if steps is None:
            steps = DEFAULT_STEPS
        return Settings(
            steps=steps, micro_batch=_int(self, "micro-batch", "Micro-batch"), accum=_int(self, "accum", "Accum"),
            precision=str(self.query_one("#set-precision", Select).value),
            gpu_mem_gib=_gib(self, "gpu", "GPU budget"), cpu_mem_gib=_gib(self, "cpu", "host budget"),
        )

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id in ("set-gpu", "set-cpu"):
            try:
                gpu, cpu = _gib(self, "gpu", "GPU budget"), _gib(self, "cpu", "host budget")
            except ConfigError:
                return
            self.post_message(self.BudgetsChanged(gpu, cpu))


def _int(form: SettingsForm, key: str, name: str) -> int | None:
    text = form.query_one(f"#set-{key}", Input).value.strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {text!r}") from None
    if value < 1:
        raise ConfigError(f"{name} must be at least 1, got {value}")
    return value


def _gib(form: SettingsForm, key: str, name: str) -> float | None:
    text = form.query_one(f"#set-{key}", Input).value.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"the {name} must be a number of GiB, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"the {name} must be a positive number of GiB, got {text}")
    return value
