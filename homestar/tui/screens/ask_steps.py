"""Asks for a number of steps (to extend a run by, or a new total); dismisses with it or None."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Static


class AskStepsScreen(ModalScreen[int | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel", show=False)]

    def __init__(self, question: str, default: int):
        super().__init__()
        self.question, self.default = question, default

    def compose(self) -> ComposeResult:
        with Vertical(id="ask-box", classes="dialog"):
            yield Static(self.question, markup=False)
            yield Input(str(self.default), type="integer", id="ask-steps")
            yield Static("", id="ask-error", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Cancel", id="cancel", compact=True)
                yield Button("OK", id="ok", variant="primary", compact=True)

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._finish()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "ok":
            self._finish()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def _finish(self) -> None:
        text = self.query_one(Input).value.strip()
        if not text.isdigit() or int(text) < 1:
            self.query_one("#ask-error", Static).update("Give a whole number of steps, at least 1.")
            return
        self.dismiss(int(text))
