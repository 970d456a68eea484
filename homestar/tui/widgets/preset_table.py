"""The presets with the planner's verdict for this machine: fits, predicted memory, batch, speed.

Reads planner `PresetPlan`s by attribute only. Enter (or a click on the highlighted row) posts
DataTable.RowSelected, which the home screen turns into "train this preset".
"""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from homestar.tui import format as fmt

FITS = {"yes": ("✔ fits", "success"), "tight": ("~ tight", "warning"), "no": ("✘ no", "error")}


class PresetTable(DataTable):
    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes, cursor_type="row", zebra_stripes=False)
        self.plans: list = []

    def on_mount(self) -> None:
        self.border_title = "Presets"
        for label, key in (("preset", "preset"), ("params", "params"), ("fits", "fits"), ("GPU peak", "gpu"),
                           ("host peak", "cpu"), ("batch", "batch"), ("tok/s", "speed")):
            self.add_column(label, key=key)

    def show(self, plans: list) -> None:
        self.plans = list(plans)
        colors = self.app.theme_variables
        self.clear()
        recommended = 0
        for n, plan in enumerate(self.plans):
            star = "★ " if getattr(plan, "recommended", False) else "  "
            if star.strip():
                recommended = n
            label, color = FITS.get(str(getattr(plan, "fits", "")), (str(getattr(plan, "fits", "?")), "foreground"))
            speed = getattr(plan, "est_tok_s", None)
            self.add_row(
                Text(star + str(plan.preset), style="bold" if star.strip() else ""),
                Text(fmt.count(getattr(plan, "params", 0)), justify="right"),
                Text(label, style=colors.get(color, "")),
                Text(fmt.gib_value(getattr(plan, "gpu_peak_gib", None) or None), justify="right"),
                Text(fmt.gib_value(getattr(plan, "cpu_peak_gib", None)), justify="right"),
                Text(f"{getattr(plan, 'micro_batch', '?')}×{getattr(plan, 'accum', '?')}", justify="right"),
                Text(fmt.rate(speed) if speed else "-", justify="right"),
                key=str(plan.preset),
            )
        if self.plans:
            self.move_cursor(row=recommended)

    @property
    def highlighted_plan(self):
        if not self.plans or not 0 <= self.cursor_row < len(self.plans):
            return None
        return self.plans[self.cursor_row]
