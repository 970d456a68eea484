"""The runs screen: every run with its preset, step, loss, status and last save.

Enter resumes a stopped run exactly where its last checkpoint left it (asking for a new total if
it had finished), or attaches to a run that is still training (started headless, say). Delete
asks first. Reading the runs (every metrics.jsonl) happens in a worker thread.
"""

from __future__ import annotations

import shutil

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from homestar.tui import format as fmt
from homestar.tui.launch import resume_args
from homestar.tui.screens.ask_steps import AskStepsScreen
from homestar.tui.screens.confirm import ConfirmScreen
from homestar.tui.screens.help import show_help
from homestar.tui.services import Services

STATUS_COLORS = {"running": "success", "finished": "primary", "stopped": "foreground", "failed": "error",
                 "interrupted": "warning", "broken": "error"}


class RunsScreen(Screen):
    BINDINGS = [
        Binding("enter", "open", "Resume/attach"),
        Binding("d,delete", "delete", "Delete"),
        Binding("r", "refresh", "Refresh"),
        Binding("escape", "back", "Back"),
        Binding("question_mark,f1", "help", "Help"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, services: Services):
        super().__init__()
        self.services = services
        self.runs: list = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield DataTable(id="runs-table", cursor_type="row")
        yield Static("Reading runs...", id="runs-detail", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "saved runs"
        table = self.query_one("#runs-table", DataTable)
        table.border_title = f"Runs in {fmt.path(self.services.runs_root)}"
        for label, key in (("run", "run"), ("preset", "preset"), ("step", "step"), ("loss", "loss"),
                           ("status", "status"), ("last saved", "saved")):
            table.add_column(label, key=key)
        table.focus()

    def on_screen_resume(self) -> None:
        self.action_refresh()

    def action_refresh(self) -> None:
        self._load()

    @work(thread=True, exclusive=True, group="runs")
    def _load(self) -> None:
        try:
            runs = self.services.runs(self.services.runs_root)
        except Exception as exc:  # shown on the screen; the app goes on
            self.app.call_from_thread(self._detail, f"Could not read the runs: {type(exc).__name__}: {exc}")
            return
        self.app.call_from_thread(self._show, runs)

    def _show(self, runs: list) -> None:
        table = self.query_one("#runs-table", DataTable)
        keep = self.highlighted.name if self.highlighted is not None else None
        self.runs = list(runs)
        colors = self.app.theme_variables
        now = self.services.clock()
        table.clear()
        for run in self.runs:
            saved = "-" if run.saved_step is None else f"{run.saved_step:,} ({fmt.ago(run.updated, now)})"
            table.add_row(
                run.name, run.preset, Text(f"{run.step:,}/{run.total_steps:,}", justify="right"),
                Text(fmt.loss(run.loss), justify="right"),
                Text(run.status, style=colors.get(STATUS_COLORS.get(run.status, "foreground"), "")),
                saved, key=str(run.path),
            )
        names = [r.name for r in self.runs]
        if keep in names:
            table.move_cursor(row=names.index(keep))
        if not self.runs:
            self._detail(f"No runs yet in {fmt.path(self.services.runs_root)}. Train one from the home screen (escape).")
        else:
            self._describe()

    def _detail(self, text: str) -> None:
        self.query_one("#runs-detail", Static).update(text)

    @property
    def highlighted(self):
        table = self.query_one("#runs-table", DataTable)
        if not self.runs or not 0 <= table.cursor_row < len(self.runs):
            return None
        return self.runs[table.cursor_row]

    @on(DataTable.RowHighlighted, "#runs-table")
    def _describe(self) -> None:
        run = self.highlighted
        if run is None:
            return
        what = {"running": "Enter attaches to it (it keeps training).",
                "broken": "Its folder is damaged; it cannot be resumed."}.get(run.status)
        if what is None:
            done = run.saved_step is not None and run.saved_step >= run.total_steps
            what = "Enter trains it further." if done else "Enter resumes it from its last checkpoint."
        self._detail(f"{fmt.path(run.path)}\n{what}")

    @on(DataTable.RowSelected, "#runs-table")
    def action_open(self) -> None:
        run = self.highlighted
        if run is None:
            return
        if run.status == "running":
            self._train(run, None, attach=True)
        elif not run.resumable:
            self.notify(f"{run.name} cannot be resumed (status: {run.status}).", severity="error")
        elif run.saved_step is not None and run.saved_step >= run.total_steps:
            question = f"{run.name} finished at step {run.saved_step:,}. Train it to how many steps in total?"
            self.app.push_screen(AskStepsScreen(question, run.total_steps + 1000),
                                 lambda total: self._extend(run, total))
        else:
            self._train(run, None)

    def _extend(self, run, total: int | None) -> None:
        if total is None:
            return
        if total <= (run.saved_step or 0):
            self.notify(f"Give a total above step {run.saved_step:,}.", severity="warning")
            return
        self._train(run, total)

    def _train(self, run, steps: int | None, *, attach: bool = False) -> None:
        from homestar.tui.screens.training import TrainingScreen

        args = None if attach else resume_args(run.path, steps)
        self.app.push_screen(TrainingScreen(run_dir=run.path, services=self.services, args=args))

    def action_delete(self) -> None:
        run = self.highlighted
        if run is None:
            return
        if run.status == "running":
            self.notify(f"{run.name} is training; stop it before deleting it.", severity="warning")
            return
        question = f"Delete {run.name} and its checkpoints?\n{fmt.path(run.path)}\nThis cannot be undone."
        self.app.push_screen(ConfirmScreen(question, yes="Delete", danger=True),
                             lambda yes: yes and self._delete(run))

    @work(thread=True, group="runs-delete")
    def _delete(self, run) -> None:
        try:
            shutil.rmtree(run.path)  # can take a while for big checkpoints: off the UI thread
        except OSError as exc:
            self.app.call_from_thread(self.notify, f"Could not delete {run.name}: {exc}", severity="error")
        else:
            self.app.call_from_thread(self.notify, f"Deleted {run.name}.")
        self.app.call_from_thread(self.action_refresh)

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_quit(self) -> None:
        self.app.exit()

    def action_help(self) -> None:
        rows = [("enter", "resume the run (or attach to it while it trains)"), ("d", "delete the run (asks first)"),
                ("r", "read the runs again"), ("escape", "back to the home screen"), ("q", "quit")]
        show_help(self.app, "runs", "Runs", rows)

    def palette_commands(self):
        return [
            ("Resume or attach", "Continue the highlighted run, or follow it while it trains", self.action_open),
            ("Delete run", "Delete the highlighted run and its checkpoints", self.action_delete),
        ]
