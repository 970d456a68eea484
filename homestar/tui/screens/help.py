"""The help overlay: the keys of the screen it was opened from, and a few words on each."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Static


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q,f1", "dismiss", "Close", show=False)]

    def __init__(self, title: str, rows: list[tuple[str, str]], note: str = ""):
        super().__init__()
        self.title_text = title
        self.rows = rows
        self.note = note

    def compose(self) -> ComposeResult:
        width = max((len(k) for k, _ in self.rows), default=4) + 2
        lines = [Content.from_markup("[b $accent]$k[/]$d", k=key.ljust(width), d=desc) for key, desc in self.rows]
        with Vertical(id="help-box") as box:
            box.border_title = self.title_text
            box.border_subtitle = "escape closes"
            yield Static(Content("\n").join(lines), id="help-keys")
            if self.note:
                yield Static(self.note, id="help-note", markup=False)

    def action_dismiss(self) -> None:
        self.dismiss(None)


def show_help(app, key: str, title: str, rows: list[tuple[str, str]], note: str = "") -> None:
    """Open the help for `key`, built on first use and kept installed: later opens skip the compose
    and styling of a new screen (tens of milliseconds on a busy machine)."""
    name = f"help:{key}"
    if not app.is_screen_installed(name):
        app.install_screen(HelpScreen(title, rows, note), name)
    app.push_screen(name)
