"""The training figures: step and progress, loss, learning rate, speed, ETA, last checkpoint."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual.widgets import ProgressBar, Static

from homestar.tui import format as fmt
from homestar.tui.run_state import RunState


class StatsPanel(Vertical):
    _shown: Content | None = None

    def compose(self) -> ComposeResult:
        yield ProgressBar(total=1, show_eta=False, id="stats-progress")
        yield Static(id="stats-figures")

    def show(self, state: RunState, now: float) -> None:
        total = max(state.total_steps, 1)
        bar = self.query_one("#stats-progress", ProgressBar)
        if (bar.total, bar.progress) != (total, min(state.step, total)):
            bar.update(total=total, progress=min(state.step, total))
        figures = _figures(state, now)
        static = self.query_one("#stats-figures", Static)
        if figures != self._shown:  # unchanged text costs nothing; changed text never changes size
            self._shown = figures
            static.update(figures, layout=False)


def step_title(state: RunState) -> str:
    """"Step 120 / 1,000": the title of the panel that holds the figures."""
    total = f"{state.total_steps:,}" if state.total_steps else "?"
    return f"Step {state.step:,} / {total}"


def _figures(state: RunState, now: float) -> Content:
    saved = "not yet"
    if state.saved_step is not None:
        saved = f"step {state.saved_step:,}, {fmt.ago(state.saved_time, now)}"
    rows = [
        ("Loss", f"{fmt.loss(state.loss)}  [dim]eval[/dim] {fmt.loss(state.eval_loss)}"),
        ("LR", fmt.learning_rate(state.lr)),
        ("Speed", f"{fmt.rate(state.tok_s)} tok/s"),
        ("", f"{fmt.tflops(state.tflops)} TFLOP/s"),
        ("ETA", fmt.duration(state.eta_s) if state.active else "-"),
        ("Saved", saved),
    ]
    markup = "\n".join(f"[b]{label:<6}[/b]{value}" for label, value in rows)
    return Content.from_markup(markup)


FIGURE_LINES = 6
"""Lines of _figures(): the panel's fixed height (training.tcss), so an update never re-lays out the screen."""
