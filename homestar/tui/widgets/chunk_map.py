"""The chunk map: one cell per chunk, grouped by what it holds, coloured by where it lives.

Draws a `chunks` placement snapshot ({"id", "kind", "location", "bytes"} per chunk) with a legend
and totals. Colours come from component classes (so themes restyle them); the layout is a pure
function of the snapshot and the width, so it can be tested without an app.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from homestar.tui.format import size

KINDS = (("param", "params"), ("grad", "grads"), ("master", "master"), ("moments", "moments"))
LOCATIONS = (("gpu", "GPU"), ("cpu", "CPU"), ("moving", "moving"))
LABEL_WIDTH = 9
CELL = "■"


@dataclass(slots=True)
class Piece:
    text: str
    role: str
    """"gpu" | "cpu" | "moving" | "other" (a cell's location), "label", "muted" or "plain"."""


def layout(chunks: list[dict], width: int) -> list[list[Piece]]:
    """Lines of pieces: legend, one block per kind (wrapped to `width`), totals."""
    width = max(width, LABEL_WIDTH + 4)
    lines: list[list[Piece]] = [_legend()]
    by_kind: dict[str, list[dict]] = {}
    for chunk in chunks:
        by_kind.setdefault(str(chunk.get("kind", "?")), []).append(chunk)
    names = dict(KINDS)
    order = [k for k, _ in KINDS if k in by_kind] + sorted(k for k in by_kind if k not in names)
    room = width - LABEL_WIDTH
    most = max((len(v) for v in by_kind.values()), default=0)
    cell_width = 2 if most * 2 <= room * 3 else 1  # spaced cells unless that costs too many rows
    per_line = max(1, room // cell_width)
    for kind in order:
        cells = sorted(by_kind[kind], key=lambda c: _sort_key(c.get("id")))
        for start in range(0, len(cells), per_line):
            label = names.get(kind, kind)[: LABEL_WIDTH - 1] if start == 0 else ""
            line = [Piece(label.ljust(LABEL_WIDTH), "label")]
            for chunk in cells[start:start + per_line]:
                line.append(Piece(CELL.ljust(cell_width), _role(chunk)))
            lines.append(line)
    lines.extend(_wrap(_totals(chunks), width))
    return lines


def _legend() -> list[Piece]:
    line: list[Piece] = []
    for location, name in LOCATIONS:
        line += [Piece(CELL, location), Piece(f" {name}  ", "plain")]
    return line


def _role(chunk: dict) -> str:
    location = str(chunk.get("location", ""))
    return location if location in ("gpu", "cpu", "moving") else "other"


def _sort_key(value) -> tuple:
    return (0, value, "") if isinstance(value, int) else (1, 0, str(value))


def _totals(chunks: list[dict]) -> list[Piece]:
    pieces = [Piece(f"{len(chunks)} chunks, {size(sum(_bytes(c) for c in chunks))}", "muted")]
    for location, name in LOCATIONS:
        here = [c for c in chunks if c.get("location") == location]
        if here or location != "moving":
            pieces.append(Piece(f"{name} {len(here)} ({size(sum(_bytes(c) for c in here))})", location + "-text"))
    return pieces


def _bytes(chunk: dict) -> float:
    value = chunk.get("bytes", 0)
    return float(value) if isinstance(value, (int, float)) else 0.0


def _wrap(pieces: list[Piece], width: int) -> list[list[Piece]]:
    """Totals joined by " · ", broken between pieces to fit the width."""
    lines: list[list[Piece]] = [[]]
    used = 0
    for piece in pieces:
        sep = 3 if lines[-1] else 0
        if lines[-1] and used + sep + len(piece.text) > width:
            lines.append([])
            used, sep = 0, 0
        if sep:
            lines[-1].append(Piece(" · ", "muted"))
        lines[-1].append(piece)
        used += sep + len(piece.text)
    return lines


class ChunkMap(Widget):
    """Shows the latest placement snapshot, or a sentence saying why there is none."""

    COMPONENT_CLASSES = {"chunk-map--gpu", "chunk-map--cpu", "chunk-map--moving", "chunk-map--other",
                         "chunk-map--label", "chunk-map--muted"}

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self._chunks: list[dict] | None = None
        self._note = "Waiting for the first placement snapshot..."

    def show(self, chunks: list[dict] | None, note: str = "") -> None:
        """Draw `chunks`; with None, show `note` instead (no snapshot yet, or an unchunked run)."""
        width = self.content_region.width or self.size.width
        before = self.get_content_height(None, None, width)
        self._chunks = chunks
        self._note = note or self._note
        self.refresh(layout=self.get_content_height(None, None, width) != before)  # re-layout only on growth

    def get_content_height(self, container, viewport, width: int) -> int:
        if self._chunks is None:
            return max(1, len(textwrap.wrap(self._note, max(width, 1))))
        return len(layout(self._chunks, width))

    def render(self) -> Text:
        if self._chunks is None:
            return Text(self._note, style=self._style("muted"))
        out = Text(no_wrap=True, overflow="crop")
        for n, line in enumerate(layout(self._chunks, self.content_region.width or self.size.width)):
            if n:
                out.append("\n")
            for piece in line:
                out.append(piece.text, self._style(piece.role))
        return out

    def _style(self, role: str) -> Style:
        if role == "plain":
            return Style()
        role = role.removesuffix("-text")
        return self.get_component_rich_style(f"chunk-map--{role}")
