"""The loss curve: train loss (every step) and eval loss (at each eval), on a textual-plot canvas.

Long runs are drawn from at most MAX_POINTS bucket means, so a redraw costs the same at step 100
and at step 100,000. Colours follow the app's theme and are re-read when the theme changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from textual.content import Content
from textual_plot import HiResMode, PlotWidget

MAX_POINTS = 400


def downsample(xs: Sequence[float], ys: Sequence[float], limit: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most `limit` points: the mean x and mean y of equal runs of consecutive points."""
    x = np.asarray(xs, dtype=np.float64)
    y = np.asarray(ys, dtype=np.float64)
    if len(x) <= limit:
        return x, y
    edges = np.linspace(0, len(x), limit + 1).astype(np.int64)
    sums_x, sums_y = np.add.reduceat(x, edges[:-1]), np.add.reduceat(y, edges[:-1])
    counts = np.diff(edges)
    return sums_x / counts, sums_y / counts


class LossPlot(PlotWidget):
    """Call `show(...)` with the whole history; the widget redraws at its next refresh."""

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes, allow_pan_and_zoom=True)
        self._data: tuple = ((), (), (), ())

    def on_mount(self) -> None:
        self.margin_top = 1
        self.margin_left = 7
        self.margin_bottom = 2
        self.show_legend(is_visible=False)  # the legend is the border's subtitle: no plot area lost
        self.border_subtitle = Content.from_markup("[$primary]━━ train[/]  [$warning]●━ eval[/]")
        self.app.theme_changed_signal.subscribe(self, lambda _theme: self._draw())

    def show(self, train_steps: Sequence[int], train_losses: Sequence[float],
             eval_steps: Sequence[int], eval_losses: Sequence[float]) -> None:
        self._data = (train_steps, train_losses, eval_steps, eval_losses)
        self._draw()

    def _draw(self) -> None:
        train_x, train_y, eval_x, eval_y = self._data
        colors = self.app.theme_variables
        self.clear()
        if len(train_x):
            # about one point per braille dot column: more only draws noise between the dots
            x, y = downsample(train_x, train_y, limit=max(40, min(MAX_POINTS, 2 * self.size.width)))
            self.plot(x, y, line_style=colors.get("primary", "blue"), hires_mode=HiResMode.BRAILLE, label="train")
        if len(eval_x):
            style = colors.get("warning", "yellow")
            self.plot(np.asarray(eval_x), np.asarray(eval_y), line_style=style, hires_mode=HiResMode.BRAILLE,
                      label="eval")
            self.scatter(np.asarray(eval_x), np.asarray(eval_y), marker="●", marker_style=style)
