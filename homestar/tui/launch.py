"""From what the user chose in the app to the trainer's command line; no Textual here.

The app always runs the trainer headless with an explicit `--run-dir`, so it knows where the
run's metrics.jsonl will appear before the child has written anything.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from homestar.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass(kw_only=True, slots=True)
class TrainOptions:
    """The home screen's choices; None leaves a setting to the trainer's default."""

    preset: str
    steps: int = 1000
    data: str | None = None
    """A folder or file, or a dataset name; None: the embedded corpus."""
    micro_batch: int | None = None
    accum: int | None = None
    precision: str = "auto"
    gpu_mem_gib: float | None = None
    cpu_mem_gib: float | None = None

    def __post_init__(self) -> None:
        if not self.preset:
            raise ConfigError("choose a preset")
        if self.steps < 1:
            raise ConfigError(f"steps must be a positive whole number, got {self.steps}")
        for name in ("micro_batch", "accum"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be a positive whole number, got {value}")
        for name in ("gpu_mem_gib", "cpu_mem_gib"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"the {name[:3].upper()} budget must be a positive number of GiB, got {value}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}")
        if self.data is not None and not self.data.strip():
            self.data = None


def train_args(options: TrainOptions, run_dir: Path) -> list[str]:
    """`homestar train ...` arguments (without the program) for these choices."""
    args = ["train", "--headless", "--run-dir", str(run_dir), "--preset", options.preset,
            "--steps", str(options.steps)]
    optional = {"--data": options.data, "--micro-batch": options.micro_batch, "--accum": options.accum,
                "--gpu-mem-gib": options.gpu_mem_gib, "--cpu-mem-gib": options.cpu_mem_gib}
    for flag, value in optional.items():
        if value is not None:
            args += [flag, str(value)]
    if options.precision != "auto":
        args += ["--precision", options.precision]
    return args


def resume_args(run_dir: Path, steps: int | None = None) -> list[str]:
    args = ["resume", str(run_dir), "--headless"]
    return args + ["--steps", str(steps)] if steps is not None else args


def cli_train_args(argv: list[str], runs_root: Path, now: float | None = None) -> tuple[list[str], Path]:
    """`homestar train FLAGS` as typed, made headless and given a run folder if it had none."""
    args = list(argv[1:] if argv and argv[0] == "train" else argv)
    run_dir = _flag(args, "--run-dir")
    if run_dir is None:
        path = new_run_dir(runs_root, _flag(args, "--preset") or "auto", now)
        args += ["--run-dir", str(path)]
    else:
        path = Path(run_dir).expanduser()
    if "--headless" not in args:
        args.insert(0, "--headless")
    return ["train", *args], path


def _flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def new_run_dir(root: Path, preset: str, now: float | None = None) -> Path:
    """A fresh folder name under `root`: PRESET-YYYYMMDD-HHMMSS (with -2, -3... if taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    base = "run" if preset == "auto" else preset
    path = root / f"{base}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = root / f"{base}-{stamp}-{n}"
    return path


def python_command(args: list[str]) -> list[str]:
    """The default way to run homestar: this interpreter, `-m homestar`."""
    return [sys.executable, "-m", "homestar", *args]
