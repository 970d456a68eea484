"""Where homestar keeps runs and caches on this machine."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """$HOMESTAR_HOME, else $XDG_DATA_HOME/homestar, else ~/.local/share/homestar."""
    explicit = os.environ.get("HOMESTAR_HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "homestar"


def runs_dir() -> Path:
    return home() / "runs"


def cache_dir() -> Path:
    """Tokenizers and tokenized corpora, keyed by data fingerprint (safe to delete)."""
    return home() / "cache"
