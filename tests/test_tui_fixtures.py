"""Shared inputs of the app's tests (no tests here): a recorded run, a fake machine and plan.

Everything is read from tests/fixtures/recorded_run/, written by hand with fixed numbers, so the
screens can be drawn exactly the same way on every machine, without a model or a GPU.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

from homestar.train.events import read_events

FIXTURES = Path(__file__).parent / "fixtures" / "recorded_run"
FAKE_TRAINER = FIXTURES / "fake_trainer.py"
NOW = 1764504600.0
"""The clock the tests give the app: ten minutes after the recorded run began."""


def machine(gpu: bool = True) -> SimpleNamespace:
    raw = json.loads((FIXTURES / "machine.json").read_text())
    gpus = tuple(SimpleNamespace(**g) for g in raw.pop("gpus"))
    return SimpleNamespace(gpus=gpus if gpu else (), **raw)


def plans(gpu_mem_gib=None, cpu_mem_gib=None) -> list[SimpleNamespace]:
    return [SimpleNamespace(**p) for p in json.loads((FIXTURES / "plans.json").read_text())]


def recorded_events() -> list[dict]:
    return read_events(FIXTURES / "metrics.jsonl")


def copy_run(root: Path, name: str, *, extra: list[dict] = (), checkpoints: tuple[int, ...] = (100,),
             mtime: float = NOW - 300) -> Path:
    """The recorded run under `root` as `name`, with `extra` events appended and empty checkpoint folders."""
    import os

    path = root / name
    path.mkdir(parents=True)
    config = json.loads((FIXTURES / "config.json").read_text())
    config["name"] = name
    (path / "config.json").write_text(json.dumps(config))
    shutil.copy(FIXTURES / "metrics.jsonl", path / "metrics.jsonl")
    with open(path / "metrics.jsonl", "a") as f:
        for event in extra:
            f.write(json.dumps(event) + "\n")
    for step in checkpoints:
        (path / "checkpoints" / f"step_{step:07d}").mkdir(parents=True)
    os.utime(path / "metrics.jsonl", (mtime, mtime))
    return path


def fake_command(args: list[str]) -> list[str]:
    """Runs the stand-in trainer (replays the recorded run, obeys the control file) instead of homestar."""
    return [sys.executable, str(FAKE_TRAINER), *args]


def make_test_app(tmp_path: Path, **kwargs):
    from homestar.tui import make_app

    settings = dict(machine=machine(), plans=lambda m, g, c: plans(g, c), runs_root=tmp_path / "runs",
                    train_command=fake_command, clock=lambda: NOW, poll_s=0.05, redraw_s=0.05)
    settings.update(kwargs)
    return make_app(**settings)
