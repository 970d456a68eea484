"""The trainer as a child process: started, watched, asked to stop; no Textual here.

Training runs in its own process so that a CUDA error, an out-of-memory kill or a slow step can
never take the app down or freeze it. The child gets its own session (a closed terminal does not
kill it mid-save; the runs screen can attach to it later). Its stderr goes to a temporary file,
not a pipe, so a chatty child can never block on a full pipe; on failure its last line is shown.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path

STDERR_TAIL = 16 << 10
"""Bytes read from the end of stderr to find the last line (a traceback can be long)."""


class TrainerProcess:
    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
                 nice: int = 0):
        """`nice`: how much lower the child's CPU priority is than the app's (0: the same)."""
        self.argv = list(argv)
        self.env = env
        self.cwd = cwd
        self.nice = nice
        self._proc: subprocess.Popen | None = None
        self._stderr = None

    def start(self) -> None:
        """Spawn the child (a fork and exec: a few ms, fine on the UI thread)."""
        self._stderr = tempfile.TemporaryFile(prefix="homestar-trainer-")
        self._proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr,
            env=self.env, cwd=self.cwd, start_new_session=True,
        )
        if self.nice:
            try:  # set before the child starts its thread pools, which inherit it
                os.setpriority(os.PRIO_PROCESS, self._proc.pid, os.getpriority(os.PRIO_PROCESS, 0) + self.nice)
            except OSError:
                self.nice = 0  # not permitted here: the child keeps the app's priority

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def poll(self) -> int | None:
        """The exit status once the child has ended (negative: killed by that signal), else None."""
        return self._proc.poll() if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait(self, timeout: float) -> int | None:
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def terminate(self) -> None:
        """SIGTERM: the trainer saves and stops at the end of its step (before training: just exits)."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self.running:
            try:
                os.kill(self._proc.pid, signum)
            except ProcessLookupError:
                pass

    def error_line(self) -> str:
        """The last non-empty line the child wrote to stderr: its one-line reason, or a traceback's end."""
        if self._stderr is None:
            return ""
        self._stderr.flush()
        size = self._stderr.seek(0, os.SEEK_END)
        self._stderr.seek(max(0, size - STDERR_TAIL))
        text = self._stderr.read().decode("utf-8", errors="replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            return ""
        return lines[-1].removeprefix("homestar: error: ")

    def close(self) -> None:
        """Forget the child (it keeps running if it still is) and drop the stderr file."""
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
