"""Where the training text comes from: empty for the embedded corpus, a folder or file, or a dataset name."""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Input, Static

EMBEDDED = "the embedded corpus: Python's own source files (no download)"


class DataSource(Vertical):
    """The data field, a Browse button (a folder picker) and a line saying what the field means."""

    def compose(self) -> ComposeResult:
        with Horizontal(id="data-row"):
            yield Input(placeholder="empty: the embedded corpus", id="data-input", compact=True)
            yield Button("Browse", id="data-browse", compact=True)
        yield Static(EMBEDDED, id="data-note", markup=False)

    def on_mount(self) -> None:
        self.border_title = "Data"

    @property
    def value(self) -> str | None:
        text = self.query_one("#data-input", Input).value.strip()
        return text or None

    def set_value(self, value: str) -> None:
        self.query_one("#data-input", Input).value = value

    @on(Input.Changed, "#data-input")
    def _describe(self, event: Input.Changed) -> None:
        self.query_one("#data-note", Static).update(describe(event.value))


def describe(value: str) -> str:
    text = value.strip()
    if not text or text == "default":
        return EMBEDDED
    path = Path(text).expanduser()
    if path.is_dir():
        return f"the folder {path} (.txt, .md, .jsonl, .parquet files)"
    if path.is_file():
        return f"the file {path}"
    if text.startswith((".", "~", "/")):
        return f"{text}: no such file or folder"
    return f"the dataset {text} (downloaded once, needs the network)"
