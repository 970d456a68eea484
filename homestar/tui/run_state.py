"""What the training screen shows, folded from a run's events: no Textual, no files, no clock.

`RunState.apply(events)` takes events as metrics.jsonl holds them (dicts) and keeps the latest
figures, the loss and memory histories, the chunk placement, the samples and the run's phase.
Each change names the sections it touched in `changed`, so the screen redraws only those.
"""

from __future__ import annotations

import re
from collections import deque

MEMORY_HISTORY = 120
"""Points kept for the memory sparklines."""
SAMPLES_KEPT = 5
SMOOTHING = 0.3
"""Weight of the newest step in the moving averages of tokens/s, TFLOP/s and step time."""

ACTIVE = ("starting", "running", "paused")
"""Phases in which a trainer is (or should be) at work."""


class RunState:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.run = ""
        self.preset = ""
        self.params = 0
        self.total_steps = 0
        self.runtime = ""
        self.device = ""
        self.precision = ""
        self.resumed = False
        self.started = False
        self.step = 0
        self.loss: float | None = None
        self.eval_loss: float | None = None
        self.lr: float | None = None
        self.tokens = 0
        self.tok_s: float | None = None
        self.tflops: float | None = None
        self.step_s: float | None = None
        self.gpu_mem: float | None = None
        self.cpu_mem: float | None = None
        self.train_steps: list[int] = []
        self.train_losses: list[float] = []
        self.eval_steps: list[int] = []
        self.eval_losses: list[float] = []
        self.gpu_history: deque[float] = deque(maxlen=MEMORY_HISTORY)
        self.cpu_history: deque[float] = deque(maxlen=MEMORY_HISTORY)
        self.chunks: list[dict] | None = None
        self.chunks_step = 0
        self.samples: deque[dict] = deque(maxlen=SAMPLES_KEPT)
        self.saved_step: int | None = None
        self.saved_time: float | None = None
        self.phase = "starting"
        self.message = ""
        self.errors: list[str] = []
        self.pending_total: int | None = None
        self._last_step_time: float | None = None
        self.changed: set[str] = {"all"}

    # -- folding events ----------------------------------------------------------------------
    def apply(self, events: list[dict]) -> None:
        for event in events:
            handler = self._HANDLERS.get(event.get("event", ""))
            if handler is not None:
                try:
                    handler(self, event)
                except (KeyError, TypeError, ValueError):
                    continue  # a malformed event from an older or newer trainer is skipped

    def _start(self, e: dict) -> None:
        self.run, self.preset = str(e["run"]), str(e["preset"])
        self.params, self.total_steps = int(e["params"]), int(e["total_steps"])
        self.runtime, self.device, self.precision = str(e["runtime"]), str(e["device"]), str(e["precision"])
        self.resumed = bool(e.get("resumed", False))
        self.started, self.step = True, int(e["step"])
        self.phase, self.message, self.errors = "running", "", []
        self._last_step_time = None
        self.changed |= {"banner", "stats", "chunks"}

    def _step(self, e: dict) -> None:
        step, loss = int(e["step"]), float(e["loss"])
        self.step, self.loss, self.lr, self.tokens = step, loss, float(e["lr"]), int(e["tokens"])
        self.train_steps.append(step)
        self.train_losses.append(loss)
        step_s = float(e.get("step_s") or 0.0)
        time_ = float(e["time"])
        if step_s <= 0 and self._last_step_time is not None:
            step_s = time_ - self._last_step_time
        self._last_step_time = time_
        self.tok_s = _smooth(self.tok_s, float(e["tok_s"]))
        self.tflops = _smooth(self.tflops, float(e["tflops"]))
        if step_s > 0:
            self.step_s = _smooth(self.step_s, step_s)
        self.gpu_mem, self.cpu_mem = float(e["gpu_mem"]), float(e["cpu_mem"])
        self.gpu_history.append(self.gpu_mem)
        self.cpu_history.append(self.cpu_mem)
        if self.phase == "starting":
            self.phase = "running"
        self.changed |= {"stats", "plot", "memory", "banner"}

    def _eval(self, e: dict) -> None:
        self.eval_loss = float(e["loss"])
        self.eval_steps.append(int(e["step"]))
        self.eval_losses.append(self.eval_loss)
        self.changed |= {"stats", "plot"}

    def _sample(self, e: dict) -> None:
        self.samples.appendleft({"step": int(e["step"]), "prompt": str(e["prompt"]), "text": str(e["text"])})
        self.changed.add("samples")

    def _checkpoint(self, e: dict) -> None:
        self.saved_step, self.saved_time = int(e["step"]), float(e["time"])
        self.changed |= {"stats", "banner"}

    def _chunks(self, e: dict) -> None:
        self.chunks, self.chunks_step = list(e["chunks"]), int(e["step"])
        self.changed.add("chunks")

    def _status(self, e: dict) -> None:
        state, self.message = str(e["state"]), str(e.get("message", ""))
        if state in ("paused", "running") and self.phase in ("starting", "running", "paused"):
            self.phase = state
        elif state == "extended":
            match = re.search(r"(\d+) steps", self.message)
            if self.pending_total is not None or match:
                self.total_steps = self.pending_total or int(match.group(1))
                self.pending_total = None
        self.changed |= {"banner", "stats"}

    def _error(self, e: dict) -> None:
        self.errors.append(str(e["message"]))
        self.phase = "failed"
        self.changed.add("banner")

    def _end(self, e: dict) -> None:
        status = str(e["status"])
        self.phase = status if status in ("finished", "stopped", "failed") else "stopped"
        self.step = max(self.step, int(e["step"]))
        self.changed |= {"banner", "stats"}

    _HANDLERS = {"start": _start, "step": _step, "eval": _eval, "sample": _sample, "checkpoint": _checkpoint,
                 "chunks": _chunks, "status": _status, "error": _error, "end": _end}

    # -- what the app itself learns ----------------------------------------------------------
    def process_exited(self, code: int, message: str, *, stop_requested: bool = False) -> None:
        """The trainer process ended (its events already applied); explain an unexpected end."""
        if code != 0 and stop_requested and not self.started:
            self.phase = "stopped"  # stopped on request before training began: nothing lost
        elif code != 0:
            if message and not self.errors:  # the trainer's own `error` event, if any, says it best
                self.errors.append(message)
            if not self.errors:
                self.errors.append(f"the trainer exited with status {code}")
            if self.phase not in ("finished", "stopped"):
                self.phase = "failed"
        elif self.phase in ACTIVE:
            self.phase = "stopped"
        self.changed.add("banner")

    def trainer_gone(self) -> None:
        """A followed run's trainer vanished without an `end` event (killed, machine reset)."""
        if self.phase in ACTIVE:
            self.phase = "interrupted"
            self.changed.add("banner")

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.changed.add("banner")

    def take_changes(self) -> set[str]:
        changed, self.changed = self.changed, set()
        return changed

    # -- derived figures ---------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.phase in ACTIVE

    @property
    def eta_s(self) -> float | None:
        """Seconds to the last step at the recent pace; None before a pace is known."""
        if self.step_s is None or not self.total_steps:
            return None
        return max(0, self.total_steps - self.step) * self.step_s

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    @property
    def error(self) -> str:
        return self.errors[-1] if self.errors else ""


def _smooth(previous: float | None, value: float) -> float:
    return value if previous is None else previous + SMOOTHING * (value - previous)
