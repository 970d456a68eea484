"""Atomic writes for the on-disk caches (tokenizers, token files).

A cache entry is either absent or complete: files are written under a temporary name in the
same folder and renamed into place (`os.replace`, atomic on one filesystem), so a process killed
mid-write leaves at worst a stray temporary that later runs ignore. Knows nothing of what the
entries hold.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the whole new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # cost: one disk flush, so a power cut cannot keep a torn file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temp_dir_beside(final: Path) -> Path:
    """A fresh empty folder next to `final` (same filesystem, so it can be renamed onto it)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}-", suffix=".tmp", dir=final.parent))


def commit_dir(tmp: Path, final: Path) -> bool:
    """Move the finished folder `tmp` to `final`, replacing a stale `final`.

    Returns False (and removes `tmp`) when another process committed `final` first, which
    happens when several ranks build the same entry at once; their copy is then as good as ours.
    """
    if final.exists():
        shutil.rmtree(final, ignore_errors=True)  # a stale or damaged entry being rebuilt
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True
