"""Training events: plain dataclasses, and the sinks that record or show them.

The trainer emits events; sinks decide what to do with them (append to metrics.jsonl, print a
headless progress line). The app reads metrics.jsonl, so every event is one JSON object per line
with an "event" field naming its kind. Knows nothing of models, chunks or the UI.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, TextIO

from homestar.train import faults


@dataclass(kw_only=True, slots=True)
class Event:
    kind: ClassVar[str] = "event"
    time: float
    step: int

    def record(self) -> dict:
        return {"event": self.kind, **asdict(self)}


@dataclass(kw_only=True, slots=True)
class Start(Event):
    kind: ClassVar[str] = "start"
    run: str
    preset: str
    params: int
    total_steps: int
    tokens_per_step: int
    runtime: str
    device: str
    precision: str
    resumed: bool = False


@dataclass(kw_only=True, slots=True)
class Step(Event):
    kind: ClassVar[str] = "step"
    loss: float
    lr: float
    tokens: int
    """Tokens trained on since the run began (all steps)."""
    tok_s: float
    tflops: float
    gpu_mem: float
    """Bytes of GPU (or simulated device) memory in use by training."""
    cpu_mem: float
    """Bytes of host memory in use by the training process (RSS)."""
    grad_norm: float = 0.0
    skipped: bool = False
    step_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(kw_only=True, slots=True)
class Eval(Event):
    kind: ClassVar[str] = "eval"
    loss: float


@dataclass(kw_only=True, slots=True)
class Sample(Event):
    kind: ClassVar[str] = "sample"
    prompt: str
    text: str


@dataclass(kw_only=True, slots=True)
class Checkpoint(Event):
    kind: ClassVar[str] = "checkpoint"
    path: str


@dataclass(kw_only=True, slots=True)
class Chunks(Event):
    kind: ClassVar[str] = "chunks"
    chunks: list[dict]
    """One dict per chunk: {"id", "kind": param|grad|master|moments, "location": gpu|cpu|moving, "bytes"}."""


@dataclass(kw_only=True, slots=True)
class Status(Event):
    """A change of state the user should see: paused, resumed, waiting for memory."""

    kind: ClassVar[str] = "status"
    state: str
    message: str = ""


@dataclass(kw_only=True, slots=True)
class Error(Event):
    kind: ClassVar[str] = "error"
    message: str


@dataclass(kw_only=True, slots=True)
class End(Event):
    kind: ClassVar[str] = "end"
    status: str
    """"finished" (reached its steps), "stopped" (asked to stop, saved) or "failed"."""


class JsonlSink:
    """Appends one line per event to metrics.jsonl, flushed at once so readers see it live."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")

    def __call__(self, event: Event) -> None:
        line = json.dumps(event.record(), separators=(",", ":")) + "\n"
        faults.reach("event", lambda: self._cut(line))
        self._file.write(line)
        self._file.flush()
        if isinstance(event, (Checkpoint, End)):
            os.fsync(self._file.fileno())  # the log must not lag the checkpoint it names

    def _cut(self, line: str) -> None:
        """Half a line on disk: what a crash mid-write leaves (fault injection only)."""
        self._file.write(line[: len(line) // 2])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ConsoleSink:
    """The headless progress printer: one line per logged step, eval, sample and checkpoint."""

    def __init__(self, stream: TextIO | None = None, every: int = 1):
        self.stream = stream or sys.stdout
        self.every = max(1, every)
        self._total = 0

    def __call__(self, event: Event) -> None:
        line = self._format(event)
        if line:
            print(line, file=self.stream, flush=True)

    def _format(self, event: Event) -> str | None:
        if isinstance(event, Start):
            self._total = event.total_steps
            verb = "resuming" if event.resumed else "training"
            return (f"{verb} {event.run}: preset {event.preset} ({event.params / 1e6:,.1f}M params), "
                    f"{event.runtime} runtime on {event.device} ({event.precision}), "
                    f"step {event.step} -> {event.total_steps}")
        if isinstance(event, Step):
            if event.step % self.every and event.step != self._total:
                return None
            return (f"step {event.step:>6}/{self._total} | loss {event.loss:.4f} | lr {event.lr:.2e} | "
                    f"{event.tok_s:,.0f} tok/s | {event.tflops:.2f} TFLOP/s | "
                    f"gpu {event.gpu_mem / 2**30:.2f} GiB | cpu {event.cpu_mem / 2**30:.2f} GiB")
        if isinstance(event, Eval):
            return f"eval   {event.step:>6} | val loss {event.loss:.4f}"
        if isinstance(event, Sample):
            return f"sample {event.step:>6} | {event.prompt!r} -> {event.text!r}"
        if isinstance(event, Checkpoint):
            return f"saved  {event.step:>6} | {event.path}"
        if isinstance(event, Status):
            return f"{event.state} | {event.message}"
        if isinstance(event, Error):
            return f"error  | {event.message}"
        if isinstance(event, End):
            return f"{event.status} at step {event.step}"
        return None


def read_events(path: Path) -> list[dict]:
    """Every well-formed event in a metrics.jsonl; a cut or garbled line is skipped, not fatal."""
    events: list[dict] = []
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return events
    for line in raw.splitlines():
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(record, dict) and isinstance(record.get("event"), str) and _well_typed(record):
            events.append(record)
    return events


def _well_typed(record: dict) -> bool:
    """A step must be a whole number and a loss a number (and a step event has both): readers
    do arithmetic on them."""
    if record["event"] == "step" and not ("step" in record and "loss" in record):
        return False
    step, loss = record.get("step", 0), record.get("loss", 0.0)
    return (isinstance(step, int) and not isinstance(step, bool)
            and isinstance(loss, (int, float)) and not isinstance(loss, bool))


def truncate_events(path: Path, step: int) -> None:
    """Drop events logged after `step` (work a resume will redo), atomically.

    Keeps the log equal to what an uninterrupted run would have written up to that step.
    """
    kept = [e for e in read_events(path) if not isinstance(e.get("step"), int) or e["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in kept:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
