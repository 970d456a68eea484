"""Saved runs as the `runs` table and the app's runs screen see them, read from their folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from homestar.errors import HomestarError
from homestar.paths import home, runs_dir
from homestar.train.run_files import checkpoint_step, list_checkpoints
from homestar.train.config import RunConfig
from homestar.train.events import read_events
from homestar.train.lock import is_locked


@dataclass(kw_only=True, slots=True)
class RunInfo:
    name: str
    path: Path
    preset: str
    step: int
    """Last step logged."""
    saved_step: int | None
    """Step of the newest checkpoint (None: nothing saved yet)."""
    total_steps: int
    loss: float | None
    status: str
    """"running", "finished", "stopped", "failed", "interrupted" (killed) or "broken" (unreadable)."""
    resumable: bool
    updated: float


def read_run(path: Path) -> RunInfo:
    """Summarise one run folder; a damaged folder comes back with status "broken", never raises."""
    try:
        config = RunConfig.load(path)
    except HomestarError:
        return RunInfo(name=path.name, path=path, preset="?", step=0, saved_step=None, total_steps=0, loss=None,
                       status="broken", resumable=False, updated=_mtime(path))
    events = read_events(path / "metrics.jsonl")
    steps = [e for e in events if e["event"] == "step"]
    last_end = next((e for e in reversed(events) if e["event"] in ("end", "start")), None)
    status = None
    if is_locked(path):
        status = "running"
    elif last_end is not None and last_end["event"] == "end":
        status = str(last_end.get("status", "stopped"))
    checkpoints = list_checkpoints(path)
    saved = checkpoint_step(checkpoints[-1]) if checkpoints else None
    if status is None:  # killed: done anyway if its last checkpoint is the final step
        status = "finished" if saved is not None and saved >= config.steps else "interrupted"
    return RunInfo(
        name=path.name, path=path, preset=config.preset,
        step=int(steps[-1]["step"]) if steps else 0, saved_step=saved, total_steps=config.steps,
        loss=float(steps[-1]["loss"]) if steps else None, status=status,
        resumable=status != "running", updated=_mtime(path / "metrics.jsonl"),
    )


def list_runs(root: Path) -> list[RunInfo]:
    """Every run folder under `root`, plus those started elsewhere with --run-dir (when `root`
    is the default runs folder, which keeps that list), newest first."""
    folders = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    if root == runs_dir():
        folders += [p for p in _remembered() if p.parent != root]
    runs = [read_run(p) for p in dict.fromkeys(folders) if _is_run(p)]
    return sorted(runs, key=lambda r: r.updated, reverse=True)


def remember_run(run_dir: Path) -> None:
    """Note a run folder outside the default runs folder so that `homestar runs` lists it too."""
    run_dir = run_dir.resolve()
    if run_dir.parent == runs_dir().resolve() or run_dir in _remembered():
        return
    _elsewhere_file().parent.mkdir(parents=True, exist_ok=True)
    with open(_elsewhere_file(), "a", encoding="utf-8") as f:
        f.write(f"{run_dir}\n")


def _elsewhere_file() -> Path:
    return home() / "runs-elsewhere.txt"


def _remembered() -> list[Path]:
    try:
        lines = _elsewhere_file().read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return [Path(line) for line in lines if line.strip() and "\0" not in line]


def _is_run(path: Path) -> bool:
    try:
        return (path / "config.json").is_file()
    except (OSError, ValueError):  # a damaged runs-elsewhere.txt line: too long a name, a NUL
        return False


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
