"""The home screen: this machine, the presets that fit it, the data, the settings; Enter trains.

Probing the machine and planning (both may import torch and query the GPU) run in a worker
thread; the screen shows what it has as soon as it has it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Collapsible, DataTable, Footer, Header, Input, Static

from homestar.errors import HomestarError
from homestar.tui.launch import TrainOptions, new_run_dir, train_args
from homestar.tui.screens.confirm import ConfirmScreen
from homestar.tui.screens.folder_picker import FolderPickerScreen
from homestar.tui.screens.help import show_help
from homestar.tui.services import Services
from homestar.tui.widgets.data_source import DataSource
from homestar.tui.widgets.machine_panel import MachinePanel
from homestar.tui.widgets.preset_table import PresetTable
from homestar.tui.widgets.settings_form import SettingsForm

REPLAN_DELAY_S = 0.4
"""Quiet time after a budget is typed before the plan is made again."""


class HomeScreen(Screen):
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]
    BINDINGS = [
        Binding("enter", "train", "Train"),
        Binding("r", "runs", "Runs"),
        Binding("b", "browse", "Data folder"),
        Binding("a", "advanced", "Settings"),
        Binding("question_mark,f1", "help", "Help"),
        Binding("q", "quit", "Quit"),
        Binding("escape", "presets", "Presets", show=False),
    ]

    def __init__(self, services: Services):
        super().__init__()
        self.services = services
        self.machine = None
        self._replan_timer = None

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="home-body"):
            with Horizontal(id="home-top"):
                yield MachinePanel(id="machine", classes="panel")
                yield DataSource(id="data", classes="panel")
            yield PresetTable(id="presets", classes="panel")
            yield Static("", id="plan-reason", markup=False)
            with Collapsible(title="Advanced settings", id="advanced", collapsed=True):
                yield SettingsForm(id="settings")
            with Horizontal(id="home-actions"):
                yield Button("Train ▶", id="train", variant="primary", compact=True)
                yield Static("Enter trains the highlighted preset · r lists saved runs", id="home-hint")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "train a GPT larger than your GPU"
        self.query_one(PresetTable).focus()
        self._probe()

    # -- machine and plan (worker threads) -----------------------------------------------------------
    @work(thread=True, exclusive=True, group="plan")
    def _probe(self) -> None:
        try:
            machine = self.services.machine()
        except Exception as exc:  # shown to the user; the app goes on (runs, attach still work)
            self.app.call_from_thread(self.query_one(MachinePanel).show_error, _reason(exc))
            return
        self.app.call_from_thread(self._show_machine, machine)
        self._plan(machine, None, None)

    @work(thread=True, exclusive=True, group="plan")
    def _replan(self, gpu_mem_gib: float | None, cpu_mem_gib: float | None) -> None:
        if self.machine is not None:
            self._plan(self.machine, gpu_mem_gib, cpu_mem_gib)

    def _plan(self, machine, gpu_mem_gib: float | None, cpu_mem_gib: float | None) -> None:
        try:
            # e.g. a budget above the machine's; (catch_warnings is process-wide: for this instant the
            # UI thread's own warnings would be caught here too)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                plans = self.services.plans(machine, gpu_mem_gib, cpu_mem_gib)
        except Exception as exc:  # a planner failure becomes a line on the screen
            self.app.call_from_thread(self._show_reason, f"No plan for this machine: {_reason(exc)}")
            return
        self.app.call_from_thread(self._show_plans, plans)
        for warning in caught:
            self.app.call_from_thread(self.notify, str(warning.message), severity="warning")

    def _show_machine(self, machine) -> None:
        self.machine = machine
        self.query_one(MachinePanel).show(machine)

    def _show_plans(self, plans: list) -> None:
        table = self.query_one(PresetTable)
        previous = table.highlighted_plan
        table.show(plans)
        if previous is not None and self._replan_timer is not None:  # a re-plan keeps the user's choice
            names = [str(p.preset) for p in plans]
            if str(previous.preset) in names:
                table.move_cursor(row=names.index(str(previous.preset)))
        self._show_plan_details()

    def _show_reason(self, text: str) -> None:
        self.query_one("#plan-reason", Static).update(text)

    @on(DataTable.RowHighlighted, "#presets")
    def _show_plan_details(self) -> None:
        plan = self.query_one(PresetTable).highlighted_plan
        if plan is None:
            return
        reason = str(getattr(plan, "reason", "") or "")
        self._show_reason(f"{plan.preset}: {reason}" if reason else str(plan.preset))
        self.query_one(SettingsForm).show_plan(plan)

    @on(SettingsForm.BudgetsChanged)
    def _budgets_changed(self, event: SettingsForm.BudgetsChanged) -> None:
        if self._replan_timer is not None:
            self._replan_timer.stop()
        self._replan_timer = self.set_timer(REPLAN_DELAY_S, lambda: self._replan(event.gpu_mem_gib,
                                                                                 event.cpu_mem_gib))

    # -- actions ----------------------------------------------------------------------------------------
    @on(DataTable.RowSelected, "#presets")
    @on(Button.Pressed, "#train")
    @on(Input.Submitted)
    def action_train(self) -> None:
        plan = self.query_one(PresetTable).highlighted_plan
        if plan is None:
            self.notify("No preset to train yet: the plan is not ready.", severity="warning")
            return
        try:
            options = self._options(plan)
        except HomestarError as exc:
            self.notify(str(exc), title="Check the settings", severity="error")
            return
        if getattr(plan, "fits", "yes") == "no":
            question = (f"{plan.preset} does not fit this machine's memory "
                        f"({getattr(plan, 'reason', '') or 'see the plan'}). Train it anyway?")
            self.app.push_screen(ConfirmScreen(question, yes="Train anyway"),
                                 lambda yes: yes and self._start(options))
            return
        self._start(options)

    def _options(self, plan) -> TrainOptions:
        settings = self.query_one(SettingsForm).read()
        return TrainOptions(
            preset=str(plan.preset), steps=settings.steps, data=self.query_one(DataSource).value,
            micro_batch=settings.micro_batch or getattr(plan, "micro_batch", None),
            accum=settings.accum or getattr(plan, "accum", None), precision=settings.precision,
            gpu_mem_gib=settings.gpu_mem_gib, cpu_mem_gib=settings.cpu_mem_gib,
        )

    def _start(self, options: TrainOptions) -> None:
        from homestar.tui.screens.training import TrainingScreen

        run_dir = new_run_dir(self.services.runs_root, options.preset, self.services.clock())
        self.app.push_screen(TrainingScreen(run_dir=run_dir, services=self.services,
                                            args=train_args(options, run_dir)))

    def action_runs(self) -> None:
        from homestar.tui.screens.runs import RunsScreen

        self.app.push_screen(RunsScreen(self.services))

    def action_browse(self) -> None:
        start = Path(self.query_one(DataSource).value or Path.home()).expanduser()
        if not start.is_dir():
            start = start.parent if start.parent.is_dir() else Path.home()
        self.app.push_screen(FolderPickerScreen(start), self._picked)

    def _picked(self, path: Path | None) -> None:
        if path is not None:
            self.query_one(DataSource).set_value(str(path))

    @on(Button.Pressed, "#data-browse")
    def _browse_pressed(self) -> None:
        self.action_browse()

    def action_advanced(self) -> None:
        advanced = self.query_one("#advanced", Collapsible)
        advanced.collapsed = not advanced.collapsed
        if not advanced.collapsed:
            self.query_one("#set-steps").focus()

    def action_quit(self) -> None:
        self.app.exit()

    def action_presets(self) -> None:
        self.query_one(PresetTable).focus()

    def action_help(self) -> None:
        rows = [("enter", "train the highlighted preset"), ("up / down", "choose a preset"),
                ("r", "saved runs: resume, attach, delete"), ("b", "pick a data folder"),
                ("a", "advanced settings (steps, batch, precision, budgets)"), ("ctrl+t", "dark or light theme"),
                ("ctrl+p", "command palette"), ("q", "quit")]
        note = ("★ marks the preset recommended for this machine. 'fits' leaves room to spare, 'tight' "
                "fits with little margin, 'no' needs more GPU and host memory than there is.")
        show_help(self.app, "home", "homestar", rows, note)

    def palette_commands(self):
        return [
            ("Train the highlighted preset", "Start training with these settings", self.action_train),
            ("Saved runs", "Resume, attach to or delete a run", self.action_runs),
            ("Pick a data folder", "Train on your own text files", self.action_browse),
        ]


def _reason(exc: Exception) -> str:
    return str(exc) if isinstance(exc, HomestarError) else f"{type(exc).__name__}: {exc}"
