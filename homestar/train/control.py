"""Requests to a running trainer: signals and the run folder's `control` file.

The app (or a user) asks a trainer in another process to pause, resume, save now, stop, or train to
more steps by writing one word per line into RUN_DIR/control (atomically: write a temporary file,
then rename). The trainer polls the file between steps (one stat call, no sync) and removes it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

COMMANDS = ("pause", "resume", "save", "stop", "steps")


def send(run_dir: Path, command: str) -> None:
    """Ask the trainer of `run_dir` to act; `command` is one of COMMANDS ("steps N" takes a number)."""
    word = command.split()[0] if command.split() else ""
    if word not in COMMANDS:
        raise ValueError(f"unknown control command {command!r}")
    path = run_dir / "control"
    existing = path.read_text() if path.exists() else ""
    tmp = run_dir / f".control.{os.getpid()}"
    tmp.write_text(existing + command.strip() + "\n")
    os.replace(tmp, path)


class Control:
    def __init__(self, run_dir: Path):
        self.path = run_dir / "control"
        self.stop_requested = False
        self.extend_to: int | None = None
        self._pending: list[str] = []

    def request_stop(self) -> None:
        """Signal-safe: only sets a flag the loop reads between steps."""
        self.stop_requested = True

    def poll(self) -> str | None:
        """The next action for the loop: "stop", "save", "pause" or None."""
        self._read()
        if self.stop_requested or "stop" in self._pending:
            self._pending.clear()
            return "stop"
        while self._pending:
            word = self._pending.pop(0)
            if word in ("save", "pause"):
                return word
        return None

    def requeue(self, word: str) -> None:
        """Hand `word` back to the next poll (a request that cannot be served yet)."""
        self._pending.insert(0, word)

    def wait_while_paused(self, interval: float = 0.2) -> str:
        """Sleep until "resume" ("running") or "stop"/a signal ("stop")."""
        while True:
            self._read()
            if self.stop_requested or "stop" in self._pending:
                self._pending.clear()
                return "stop"
            if "resume" in self._pending:
                self._pending.remove("resume")
                return "running"
            time.sleep(interval)

    def _read(self) -> None:
        if not self.path.exists():
            return
        try:
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
            self.path.unlink()
        except OSError:
            return
        for line in lines:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "steps" and len(parts) == 2 and parts[1].isdecimal():
                self.extend_to = int(parts[1])
            elif parts[0] in COMMANDS:
                self._pending.append(parts[0])
