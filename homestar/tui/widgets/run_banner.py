"""One line (two or three for a long error) saying what the run is doing, coloured by its phase."""

from __future__ import annotations

from textual.content import Content
from textual.widgets import Static

from homestar.tui import format as fmt
from homestar.tui.run_state import RunState


class RunBanner(Static):
    def show(self, state: RunState, *, stopping: bool, attached: bool) -> None:
        """Redraw if the text or phase changed (a new text may change the height: a layout)."""
        phase = "stopping" if stopping and state.active else state.phase
        text = Content(banner_text(state, phase, attached))
        if self.classes != {f"-{phase}"} or self.content != text:
            self.set_classes(f"-{phase}")
            self.update(text)


def banner_text(state: RunState, phase: str, attached: bool) -> str:
    about = ""
    if state.started:
        about = (f"{state.preset} ({fmt.count(state.params)} params) · {state.runtime} runtime on "
                 f"{state.device}, {state.precision}")
    mark = " [attached]" if attached else ""
    texts = {
        "starting": "◌ Starting: preparing the data and the model...",
        "running": f"● Training  {about}{mark}",
        "paused": f"⏸ Paused at step {state.step:,}  (p resumes){mark}",
        "stopping": "◌ Saving... the trainer stops after this step",
        "finished": f"✔ Finished at step {state.step:,}.  e trains further, escape goes back",
        "stopped": f"■ Stopped at step {state.step:,}, saved.  e continues, escape goes back",
        "failed": f"✘ Training failed: {state.error or 'no reason given'}",
        "interrupted": "✘ The trainer ended without a word (killed?); resume it from the runs screen",
    }
    return texts.get(phase, phase)
