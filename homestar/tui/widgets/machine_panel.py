"""The detected machine: GPUs (name, memory total and free), host memory, CPU cores, free disk.

Reads a planner `MachineInfo` by attribute only, so any object with those fields will do.
"""

from __future__ import annotations

from textual.content import Content
from textual.widgets import Static

from homestar.tui import format as fmt


class MachinePanel(Static):
    def on_mount(self) -> None:
        self.border_title = "Machine"
        if not self.content:
            self.update(Content.styled("Looking at this machine...", "dim"))

    def show(self, machine) -> None:
        self.update(describe(machine))

    def show_error(self, message: str) -> None:
        self.update(Content.from_markup("[$error]Could not probe this machine:[/] $m", m=message))


def describe(machine) -> Content:
    lines = []
    gpus = tuple(getattr(machine, "gpus", ()) or ())
    for n, gpu in enumerate(gpus):
        label = "GPU" if len(gpus) == 1 else f"GPU{n}"
        lines.append(Content.assemble((f"{label:<4} ", "b"), str(getattr(gpu, "name", "GPU"))))
        lines.append(Content.assemble(("VRAM ", "b"), fmt.gib(getattr(gpu, "total_bytes", None)),
                                      (f" ({fmt.gib(getattr(gpu, 'free_bytes', None))} free)", "dim")))
    if not gpus:
        lines.append(Content.assemble(("GPU  ", "b"), ("none: training runs on the CPU", "dim")))
    lines.append(Content.assemble(("RAM  ", "b"), fmt.gib(getattr(machine, "ram_total", None)),
                                  (f" ({fmt.gib(getattr(machine, 'ram_available', None))} available)", "dim")))
    disk = getattr(machine, "disk_free", None)
    cores = getattr(machine, "cpu_cores", None)
    lines.append(Content.assemble(("CPU  ", "b"), f"{cores if cores is not None else '?'} cores",
                                  (f", {fmt.gib(disk)} disk free" if disk else "", "dim")))
    return Content("\n").join(lines)
