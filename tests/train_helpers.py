"""Shared pieces of the trainer and CLI tests: a small real corpus and fast run flags."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_FILES = ["json/encoder.py", "json/decoder.py", "textwrap.py", "shlex.py", "fractions.py", "heapq.py",
                "bisect.py", "colorsys.py", "calendar.py", "argparse.py"]

# Flags that keep a debug run fast on a 2-core CPU while exercising every part of the trainer.
FAST = ["--preset", "debug", "--device", "cpu", "--micro-batch", "4", "--seq-len", "64", "--eval-every", "10",
        "--sample-every", "0", "--headless"]


def make_corpus(folder: Path) -> Path:
    """~400 KB of real Python source, copied so the data fingerprint is stable within a test."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in CORPUS_FILES:
        shutil.copy(STDLIB / name, folder / name.replace("/", "_"))
    return folder


def step_losses(run_dir: Path) -> dict[int, float]:
    """{step: loss} from a run's metrics.jsonl (the last record wins for a repeated step)."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["event"] == "step":
            losses[record["step"]] = record["loss"]
    return losses


def snapshot_tree(folder: Path) -> dict[str, bytes]:
    """Every file's bytes under `folder`, to prove a refused command changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
