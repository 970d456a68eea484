"""The default corpus: the running Python's own standard library source, always on the machine.

No download and no `datasets`: the `.py` files are read straight from the stdlib folder. Test
suites, site-packages and machine-specific files are left out, and a deterministic subset of
about `BUDGET_BYTES` is kept (files ranked by a hash of their relative path, so the subset mixes
every package instead of stopping at the letter "e"), then read in path order. Knows nothing of
tokenizers or training.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from homestar.errors import DataError

BUDGET_BYTES = 10_000_000
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                       "__pycache__"})
FORMAT_VERSION = "stdlib-v1"  # bump when the selection or reading rules change


@dataclass(frozen=True, slots=True)
class StdlibCorpus:
    """The chosen files of the standard library (paths relative to `root`, sorted)."""

    root: Path
    files: tuple[str, ...]
    nbytes: int


def find_stdlib(budget_bytes: int = BUDGET_BYTES) -> StdlibCorpus:
    """List and select the corpus files. Cost: one directory walk and one stat per file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    sizes = _candidate_sizes(root) if root.is_dir() else {}
    if not sizes:
        raise DataError(f"the built-in corpus (Python standard library source) is not at {root}; "
                        "pass --data PATH to train on your own text")
    ranked = sorted(sizes, key=lambda rel: hashlib.sha1(rel.encode()).digest())
    chosen, total = [], 0
    for rel in ranked:
        if total >= budget_bytes:
            break
        chosen.append(rel)
        total += sizes[rel]
    return StdlibCorpus(root=root, files=tuple(sorted(chosen)), nbytes=total)


def fingerprint(corpus: StdlibCorpus) -> str:
    """sha256 over relative paths and contents: stable across machines with the same Python.

    Cost: reads the whole subset (~10 MB, about 0.1 s warm).
    """
    h = hashlib.sha256(FORMAT_VERSION.encode())
    for rel in corpus.files:
        h.update(rel.encode() + b"\x00")
        h.update((corpus.root / rel).read_bytes())
        h.update(b"\x00")
    return h.hexdigest()


def read_texts(corpus: StdlibCorpus) -> Iterator[str]:
    """Each file's text in path order; the rare file that is not UTF-8 is skipped (always the same)."""
    for rel in corpus.files:
        try:
            text = (corpus.root / rel).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if text:
            yield text


def _candidate_sizes(root: Path) -> dict[str, int]:
    """{relative posix path: size} of the stdlib's .py files worth training on."""
    sizes: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(("config-", "."))]
        for name in filenames:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                path = Path(dirpath, name)
                sizes[path.relative_to(root).as_posix()] = path.stat().st_size
    return sizes
