"""GPU (or simulated device) and host memory in use by the trainer, with sparklines of recent steps."""

from __future__ import annotations

from collections.abc import Sequence

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Sparkline, Static

from homestar.tui import format as fmt


class MemoryPanel(Vertical):
    def compose(self) -> ComposeResult:
        for key, name in (("gpu", "GPU"), ("cpu", "Host")):
            with Horizontal(classes="memory-row"):
                yield Static(f"{name:<5}-", id=f"memory-{key}-label", classes="memory-label")
                yield Sparkline([], id=f"memory-{key}-spark")

    def show(self, gpu_history: Sequence[float], cpu_history: Sequence[float], *, device: str = "") -> None:
        gpu_name = "Dev" if device == "cpu" else "GPU"  # on the CPU the "GPU" space is simulated
        for key, name, history in (("gpu", gpu_name, gpu_history), ("cpu", "Host", cpu_history)):
            latest = history[-1] if len(history) else None
            label = self.query_one(f"#memory-{key}-label", Static)
            text = f"{name:<5}{fmt.gib(latest)}"
            if str(label.content) != text:
                label.update(text, layout=False)  # fixed width and height: no re-layout
            self.query_one(f"#memory-{key}-spark", Sparkline).data = list(history)
