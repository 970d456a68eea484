"""Names inside a run folder, readable without importing torch (the runs table needs only these)."""

from __future__ import annotations

from pathlib import Path

_PREFIX = "step_"


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:07d}"


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(_PREFIX):])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (temporary folders of interrupted saves excluded)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))
