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
    """Open the help for `key`, built on first use (or by `prepare_help`) and kept installed:
    later opens skip the compose and styling of a new screen (tens of milliseconds on a busy
    machine)."""
    app.push_screen(_installed(app, key, title, rows, note))


def prepare_help(app, key: str, title: str, rows: list[tuple[str, str]], note: str = "") -> None:
    """Install the help for `key` and build its widgets ahead of its first open (a screen that
    trains calls this once it is drawn, so the first `?` while the trainer keeps both cores busy
    does not pay for them: it took up to 130 ms on a two-core machine)."""
    name = _installed(app, key, title, rows, note)
    register = getattr(app, "_get_screen", None)  # Textual's own step of a first push: compose, mount
    if register is not None and not app.get_screen(name).is_running:
        register(name)


def _installed(app, key: str, title: str, rows: list[tuple[str, str]], note: str) -> str:
    """The name of `key`'s help screen, installed now if it was not."""
    name = f"help:{key}"
    if not app.is_screen_installed(name):
        app.install_screen(HelpScreen(title, rows, note), name)
    return name
