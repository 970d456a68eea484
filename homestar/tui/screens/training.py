"""The training screen: one run, live, from its metrics.jsonl; started here or attached to.

The trainer is a child process (process.py) or, when attached, someone else's; either way this
screen only reads the run's events (a worker thread follows the file and posts batches) and asks
the trainer to act through the run folder's control file. Events are folded into a RunState as
they come; the widgets are redrawn from it on a timer, at most every `redraw_s`, and only the
parts that changed, so a fast trainer cannot flood the UI.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header
from textual.worker import get_current_worker

from homestar.train import control
from homestar.tui.follow import Batch, MetricsFollower, coalesce
from homestar.tui.launch import resume_args
from homestar.tui.process import TrainerProcess
from homestar.tui.run_state import RunState
from homestar.tui.screens.ask_steps import AskStepsScreen
from homestar.tui.screens.help import prepare_help, show_help
from homestar.tui.services import Services
from homestar.tui.widgets.chunk_map import ChunkMap
from homestar.tui.widgets.loss_plot import LossPlot
from homestar.tui.widgets.memory_panel import MemoryPanel
from homestar.tui.widgets.run_banner import RunBanner
from homestar.tui.widgets.samples_panel import SamplesPanel
from homestar.tui.widgets.stats_panel import StatsPanel, step_title

LOCK_CHECK_S = 2.0
"""How often an attached screen checks that the run's trainer still holds its lock."""
DEFAULT_EXTEND = 1000


def _settle_memory() -> None:
    """Collect once, then exempt every object alive now (torch, Textual, this screen) from future
    collections: a full collection of them would stall the UI 100+ ms at random while training.
    Costs one pause now, while the screen opens, and keeps any garbage of this moment forever."""
    gc.collect()
    gc.freeze()


class TrainingScreen(Screen):
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]
    AUTO_FOCUS = ""  # nothing focused: the footer shows the training keys, not the plot's zoom keys
    BINDINGS = [
        Binding("p", "pause", "Pause"),
        Binding("s", "save", "Save"),
        Binding("e", "extend", "Extend"),
        Binding("x", "stop", "Stop"),
        Binding("q", "quit_app", "Quit"),
        Binding("question_mark,f1", "help", "Help"),
        Binding("escape", "back", "Back", show=False),
    ]

    class EventsRead(Message):
        """New events from the follower thread (one batch per poll: coalesced)."""

        def __init__(self, batch: Batch):
            super().__init__()
            self.batch = batch

    class TrainerExited(Message):
        def __init__(self, code: int, message: str):
            super().__init__()
            self.code, self.message = code, message

    class TrainerGone(Message):
        """An attached run's lock is free: no process trains it any more."""

    def __init__(self, *, run_dir: Path, services: Services, args: list[str] | None = None):
        """`args`: the homestar arguments of the trainer to start; None attaches to `run_dir`."""
        super().__init__()
        self.run_dir = Path(run_dir)
        self.services = services
        self.args = args
        self.attached = args is None
        self.state = RunState()
        self.process: TrainerProcess | None = None
        self.stop_requested = False
        self.quitting = False
        self._plotted_at = -float("inf")

    # -- layout ---------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        yield RunBanner(id="banner")
        with Horizontal(id="upper"):
            yield LossPlot(id="loss")
            with Vertical(id="side"):
                yield StatsPanel(id="stats")
                yield MemoryPanel(id="memory")
        with Horizontal(id="lower"):
            with VerticalScroll(id="chunks-box"):
                yield ChunkMap(id="chunks")
            yield SamplesPanel(id="samples")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.run_dir.name
        titles = {"#loss": "Loss", "#side": "Progress", "#chunks-box": "Chunk map",
                  "#samples": "Samples"}
        for selector, title in titles.items():
            self.query_one(selector).border_title = title
        if self.args is not None:
            self._start_trainer(self.args)
        elif self.services.follow:
            self._follow(None)
        self.set_interval(self.services.redraw_s, self.redraw)
        self.redraw()
        self.call_after_refresh(lambda: prepare_help(self.app, *self._help()))
        self.call_after_refresh(_settle_memory)

    # -- the trainer ------------------------------------------------------------------------------
    def _start_trainer(self, args: list[str]) -> None:
        self.stop_requested = False
        self.process = TrainerProcess(self.services.command(args), env=self.services.env,
                                      nice=self.services.trainer_nice)
        try:
            self.process.start()  # fork/exec: a few ms
        except OSError as exc:
            self.process = None
            self.state.process_exited(127, f"could not start the trainer: {exc}")
            return
        self.state.set_phase("starting")
        if self.services.follow:
            self._follow(self.process)

    @work(thread=True, exclusive=True, group="follow")
    def _follow(self, process: TrainerProcess | None) -> None:
        """Polls the log (and the process or the lock) off the UI thread; posts what it finds."""
        from homestar.train.lock import is_locked

        worker = get_current_worker()
        follower = MetricsFollower(self.run_dir / "metrics.jsonl")
        next_lock_check = 0.0
        while not worker.is_cancelled:
            code = process.poll() if process is not None else None  # before reading: see every event
            gone = False
            if process is None and time.monotonic() >= next_lock_check:
                next_lock_check = time.monotonic() + LOCK_CHECK_S
                gone = not is_locked(self.run_dir)  # before reading, so a final `end` is read too
            batch = follower.read_new()
            if batch.events or batch.reset:
                batch.events = coalesce(batch.events)
                self.post_message(self.EventsRead(batch))
            if code is not None:
                self.post_message(self.TrainerExited(code, process.error_line()))
                return
            if gone:
                self.post_message(self.TrainerGone())
            if not batch.more:
                time.sleep(self.services.poll_s)

    def feed(self, events: list[dict], reset: bool = False) -> None:
        """Fold events into the screen's state (what the follower does; tests call it directly)."""
        if reset:
            pending = self.state.pending_total
            self.state.reset()
            self.state.pending_total = pending
        self.state.apply(events)

    def on_training_screen_events_read(self, message: EventsRead) -> None:
        self.feed(message.batch.events, message.batch.reset)

    def on_training_screen_trainer_exited(self, message: TrainerExited) -> None:
        self.state.process_exited(message.code, message.message, stop_requested=self.stop_requested)
        if self.process is not None:
            self.process.close()
        self.process = None
        if self.state.phase == "failed":
            self.notify(self.state.error or "training failed", title="Training failed", severity="error",
                        timeout=15)
        self.redraw(force=True)
        if self.quitting:
            self.app.exit()

    def on_training_screen_trainer_gone(self, message: TrainerGone) -> None:
        if self.state.started:
            self.state.trainer_gone()

    @property
    def trainer_active(self) -> bool:
        """Some process is (or is about to be) training this run; not once its end is logged."""
        if self.state.phase in ("finished", "stopped", "failed"):
            return False  # the process, if still there, is only exiting
        if self.process is not None:
            return self.process.running
        return self.attached and self.state.active and self.state.started

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """Keys that cannot act now are shown dimmed in the footer (None) and do nothing."""
        if action in ("pause", "save", "stop"):
            return True if self.trainer_active else None
        if action == "extend":
            return None if self.state.phase in ("failed", "interrupted") and not self.trainer_active else True
        return True

    # -- drawing ----------------------------------------------------------------------------------
    def redraw(self, force: bool = False) -> None:
        """Update the widgets whose data changed since the last redraw (called on a timer).

        Skipped while another screen (help, a dialog) is on top: the changes wait for the next tick.
        The loss curve is redrawn at most every `plot_s`; its change waits in `changed` meanwhile.
        """
        if not self.is_current or not self.state.changed:
            return
        now = time.monotonic()
        plot_due = force or now - self._plotted_at >= self.services.plot_s or "all" in self.state.changed
        changed = self.state.take_changes()
        if "plot" in changed and not plot_due:
            changed.discard("plot")
            self.state.changed.add("plot")  # kept for a later tick
        if not changed:
            return
        every = "all" in changed
        state = self.state
        if every or "banner" in changed:
            self.query_one(RunBanner).show(state, stopping=self.stop_requested, attached=self.attached)
            self.refresh_bindings()  # the phase may have changed which keys can act
        if every or changed & {"stats", "banner"}:
            self.query_one(StatsPanel).show(state, self.services.clock())
            side = self.query_one("#side")
            if side.border_title != step_title(state):
                side.border_title = step_title(state)
        if every or "plot" in changed:
            self._plotted_at = now
            self.query_one(LossPlot).show(state.train_steps, state.train_losses, state.eval_steps,
                                          state.eval_losses)
        if every or "memory" in changed:
            self.query_one(MemoryPanel).show(state.gpu_history, state.cpu_history, device=state.device)
        if every or "chunks" in changed:
            self._draw_chunks()
        if every or "samples" in changed:
            self.query_one(SamplesPanel).show(state.samples)

    def _draw_chunks(self) -> None:
        state = self.state
        if state.runtime == "torch":
            note = ("This run uses the plain PyTorch runtime (--runtime torch): its memory is not chunked, "
                    "so there is no chunk map.")
            self.query_one(ChunkMap).show(None, note)
        elif state.chunks is None:
            note = "Waiting for the first placement snapshot..." if state.active else "No placement snapshot."
            self.query_one(ChunkMap).show(None, note)
        else:
            self.query_one(ChunkMap).show(state.chunks)
            self.query_one("#chunks-box").border_subtitle = f"step {state.chunks_step:,}"

    # -- actions ------------------------------------------------------------------------------------
    def _send(self, command: str) -> bool:
        """Ask the trainer through the control file (one small atomic write)."""
        if not self.trainer_active:
            self.notify("No trainer is running for this run.", severity="warning")
            return False
        try:
            control.send(self.run_dir, command)
        except OSError:
            self.notify("The trainer is still preparing; try again in a moment.", severity="warning")
            return False
        return True

    def action_pause(self) -> None:
        paused = self.state.phase == "paused"
        if self._send("resume" if paused else "pause"):
            self.notify("Resuming." if paused else "Pausing after this step.")

    def action_save(self) -> None:
        if self._send("save"):
            self.notify("Saving a checkpoint after this step.")

    def action_stop(self) -> None:
        self._request_stop()

    def action_quit_app(self) -> None:
        """q: stop, save and quit; a second q (or an attached run) leaves the trainer to itself."""
        if self.quitting or not self.trainer_active:
            self.app.exit(message=self._left_running_message())
            return
        if self.attached:
            self.app.exit(message=f"{self.run_dir.name} keeps training; follow it with `homestar`.")
            return
        self.quitting = True
        self._request_stop()

    def _request_stop(self) -> None:
        if not self.trainer_active:
            self.notify("No trainer is running for this run.", severity="warning")
            return
        if self.process is not None and not self.state.started:
            self.stop_requested = True
            self.process.terminate()  # still preparing: nothing to save yet
        elif not self._send("stop"):
            return
        self.stop_requested = True
        self.state.changed.add("banner")
        self.redraw()
        self.set_timer(self.services.stop_timeout_s, self._stop_timed_out)

    def _stop_timed_out(self) -> None:
        if not self.trainer_active:
            return
        if self.quitting:
            self.app.exit(message=self._left_running_message())
            return
        self.notify(f"The trainer has not stopped after {self.services.stop_timeout_s:.0f} s; it will save and "
                    "stop when its step ends.", severity="warning", timeout=10)

    def _left_running_message(self) -> str | None:
        if self.trainer_active:
            return (f"The trainer of {self.run_dir.name} is finishing its step; it saves and stops by itself "
                    f"(see `homestar runs`).")
        return None

    def action_extend(self) -> None:
        base = max(self.state.total_steps, self.state.step)
        if self.state.phase in ("failed", "interrupted") and not self.trainer_active:
            self.notify("Resume this run from the runs screen.", severity="warning")
            return
        self.app.push_screen(AskStepsScreen("Train for how many more steps?", DEFAULT_EXTEND),
                             lambda n: self._extend(base, n))

    def _extend(self, base: int, more: int | None) -> None:
        if not more:
            return
        target = base + more
        if self.trainer_active:
            if self._send(f"steps {target}"):
                self.state.pending_total = target
                self.notify(f"Training on to step {target:,}.")
            return
        if self.process is not None:
            self.process.wait(10)  # its end is logged; it is releasing the run's lock (milliseconds)
        self.attached = False
        self._start_trainer(resume_args(self.run_dir, target))
        self.redraw()

    def action_back(self) -> None:
        if self.trainer_active and not self.attached:
            self.notify("Training is running: x stops and saves it, q also quits.", severity="warning")
            return
        self.app.pop_screen()

    def action_help(self) -> None:
        show_help(self.app, *self._help())

    def _help(self) -> tuple[str, str, list[tuple[str, str]], str]:
        """The help's key, title, rows and note for this screen."""
        rows = [("p", "pause or resume training"), ("s", "save a checkpoint now"),
                ("e", "train for more steps (asks how many)"), ("x", "stop and save (stay in the app)"),
                ("q", "stop, save and quit" if not self.attached else "quit (the run keeps training)"),
                ("escape", "back, once the run has stopped"), ("ctrl+p", "command palette"),
                ("tab", "focus the loss curve: + and - zoom, arrows pan, r resets"), ("?", "this help")]
        note = ("The chunk map has one cell per chunk, a row per kind of data, a colour per place. On a CPU "
                "run, 'Dev' is the simulated device memory.")
        return "attached" if self.attached else "training", "Training keys", rows, note

    def palette_commands(self):
        """(title, help, callback) for the command palette."""
        return [
            ("Pause or resume training", "Pause after this step, or carry on", self.action_pause),
            ("Save a checkpoint now", "The trainer saves after its current step", self.action_save),
            ("Stop and save", "Save, then stop the trainer; the app stays open", self.action_stop),
            ("Extend the run", "Train for more steps than planned", self.action_extend),
            ("Stop, save and quit", "Save, stop the trainer and leave homestar", self.action_quit_app),
            ("Training help", "The keys of this screen", self.action_help),
        ]
