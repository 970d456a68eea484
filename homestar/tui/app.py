"""The homestar app: screens, theme, command palette, and the factory the CLI and tests share.

`make_app(...)` builds the app from injectable providers (machine, plans, runs folder, trainer
command); `HomestarApp` only routes between screens. Training itself never runs in this process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from homestar.tui.launch import cli_train_args, resume_args
from homestar.tui.services import Services

LIGHT, DARK = "textual-light", "textual-dark"


class HomestarApp(App[int]):
    TITLE = "homestar"
    CSS_PATH = ["app.tcss", "home.tcss", "training.tcss", "runs.tcss", "dialogs.tcss"]
    ENABLE_COMMAND_PALETTE = True
    BINDINGS = [Binding("ctrl+t", "toggle_theme", "Theme", show=False)]

    def __init__(self, services: Services, *, start: tuple[str, Path, list[str] | None] | None = None):
        """`start`: ("train" | "resume" | "attach", run_dir, trainer args) to open on the training screen."""
        super().__init__()
        self.services = services
        self.start = start

    def on_mount(self) -> None:
        from homestar.tui.screens.home import HomeScreen

        self.theme = DARK
        self.push_screen(HomeScreen(self.services))
        if self.start is not None:
            from homestar.tui.screens.training import TrainingScreen

            _, run_dir, args = self.start
            self.push_screen(TrainingScreen(run_dir=run_dir, services=self.services, args=args))

    def action_toggle_theme(self) -> None:
        self.theme = LIGHT if self.theme == DARK else DARK

    def action_quit(self) -> None:
        """ctrl+q: on a training screen, the same as its q (stop, save, then quit)."""
        from homestar.tui.screens.training import TrainingScreen

        if isinstance(self.screen, TrainingScreen):
            self.screen.action_quit_app()
            return
        training = [s for s in self.screen_stack if isinstance(s, TrainingScreen) and s.trainer_active]
        if training:
            self.notify("A run is training: go back to it (escape) and press q to save and quit.",
                        severity="warning")
            return
        self.exit()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Toggle dark/light theme", "Switch between the dark and the light theme",
                            self.action_toggle_theme)
        for title, help_text, callback in getattr(screen, "palette_commands", lambda: [])():
            yield SystemCommand(title, help_text, callback)


def make_app(*, machine=None, plans=None, runs_root: Path | None = None,
             train_command: Callable[[list[str]], list[str]] | None = None,
             train_argv: list[str] | None = None, resume_dir: Path | None = None, resume_steps: int | None = None,
             attach_dir: Path | None = None, **settings) -> HomestarApp:
    """The app, with the real machine, planner and trainer unless told otherwise.

    machine: a MachineInfo, or a callable returning one. plans: a list of PresetPlans, or a
    callable (machine, gpu_mem_gib, cpu_mem_gib) -> list. runs_root: where runs live.
    train_command: homestar arguments -> the trainer's full argv. train_argv / resume_dir /
    attach_dir open the app on that run's training screen (resume_steps: the resumed run's new total). Other keywords set Services fields.
    """
    from homestar.paths import runs_dir

    services = Services(runs_root=Path(runs_root) if runs_root is not None else runs_dir(), **settings)
    if machine is not None:
        services.machine = machine if callable(machine) else (lambda: machine)
    if plans is not None:
        services.plans = plans if callable(plans) else (lambda _m, _g, _c: list(plans))
    if train_command is not None:
        services.command = train_command
    start = None
    if train_argv is not None:
        args, run_dir = cli_train_args(train_argv, services.runs_root, services.clock())
        start = ("train", run_dir, args)
    elif resume_dir is not None:
        start = ("resume", Path(resume_dir), resume_args(Path(resume_dir), resume_steps))
    elif attach_dir is not None:
        start = ("attach", Path(attach_dir), None)
    return HomestarApp(services, start=start)
