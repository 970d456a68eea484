"""The latest text samples the model wrote, newest first, prompt dimmed."""

from __future__ import annotations

from collections.abc import Iterable

from textual.containers import VerticalScroll
from textual.app import ComposeResult
from textual.content import Content
from textual.widgets import Static


class SamplesPanel(VerticalScroll):
    def compose(self) -> ComposeResult:
        yield Static("No samples yet.", id="samples-text", markup=False)

    def show(self, samples: Iterable[dict]) -> None:
        parts = []
        for sample in samples:
            parts.append(Content.from_markup("[b $accent]step $step[/]  ", step=f"{sample['step']:,}")
                         + Content.styled(_one_line(sample["prompt"]), "dim")
                         + Content(_one_line(sample["text"])))
        text = Content("\n").join(parts) if parts else Content.styled("No samples yet.", "dim")
        self.query_one("#samples-text", Static).update(text)


def _one_line(text: str) -> str:
    """Newlines and tabs as visible marks, so a sample keeps its shape in a few rows."""
    return text.replace("\r", "").replace("\t", "  ").replace("\n", "⏎ ")
