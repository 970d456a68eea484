"""Named model presets: one small TOML file each, shipped as the package `homestar._presets`.

A preset is data: a model shape (`GPTConfig`) and the training defaults that suit it. This module
reads and validates the files; every problem with one becomes a `ConfigError` naming the file.
Knows nothing of the machine a preset will run on (that is the planner's job) nor of training.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from homestar.errors import ConfigError
from homestar.model.config import GPTConfig


@dataclass(kw_only=True, slots=True, frozen=True)
class TrainDefaults:
    """Training hyper-parameters a preset recommends; the command line may override each."""

    lr: float
    """Peak learning rate, reached after warmup."""
    min_lr: float
    """Learning rate at the end of the decay."""
    warmup_steps: int
    """Steps of linear warmup from 0 to lr."""
    micro_batch: int
    """Sequences per forward/backward."""
    accum: int
    """Micro-batches accumulated per optimizer step."""
    weight_decay: float
    """AdamW decoupled weight decay (matrices only)."""
    grad_clip: float
    """Global gradient L2 norm clip; 0 disables it."""
    beta1: float
    beta2: float

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be between 0 and lr ({self.lr}), got {self.min_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.micro_batch < 1 or self.accum < 1:
            raise ValueError(f"micro_batch and accum must be >= 1, got {self.micro_batch} and {self.accum}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must lie in [0, 1), got {self.beta1} and {self.beta2}")


@dataclass(kw_only=True, slots=True, frozen=True)
class Preset:
    """A named model shape with its training defaults."""

    name: str
    description: str
    model: GPTConfig
    train: TrainDefaults

    @property
    def params(self) -> int:
        """Exact parameter count of the model (tied head counted once)."""
        return self.model.num_params()


# Schema: key -> (accepted types, default or _REQUIRED). Ints are accepted where floats are
# expected (`lr = 1` is valid TOML for 1.0); bools are never numbers here.
_REQUIRED = object()
_FLOAT = (float, int)
_TOP_KEYS: dict[str, tuple[tuple[type, ...], Any]] = {
    "name": ((str,), _REQUIRED),
    "description": ((str,), ""),
    "model": ((dict,), _REQUIRED),
    "train": ((dict,), _REQUIRED),
}
_MODEL_KEYS: dict[str, tuple[tuple[type, ...], Any]] = {
    "vocab_size": ((int,), _REQUIRED),
    "seq_len": ((int,), _REQUIRED),
    "d_model": ((int,), _REQUIRED),
    "n_layer": ((int,), _REQUIRED),
    "n_head": ((int,), _REQUIRED),
    "tie_embeddings": ((bool,), True),
}
_TRAIN_KEYS: dict[str, tuple[tuple[type, ...], Any]] = {
    "lr": (_FLOAT, _REQUIRED),
    "min_lr": (_FLOAT, _REQUIRED),
    "warmup_steps": ((int,), _REQUIRED),
    "micro_batch": ((int,), _REQUIRED),
    "accum": ((int,), _REQUIRED),
    "weight_decay": (_FLOAT, _REQUIRED),
    "grad_clip": (_FLOAT, _REQUIRED),
    "beta1": (_FLOAT, _REQUIRED),
    "beta2": (_FLOAT, _REQUIRED),
}


def list_presets() -> list[Preset]:
    """Every shipped preset, smallest model first."""
    presets = [load_preset_file(path) for path in _preset_files().values()]
    return sorted(presets, key=lambda p: (p.params, p.name))


def preset_names() -> list[str]:
    """Names of the shipped presets, smallest model first."""
    return [p.name for p in list_presets()]


def load_preset(name: str) -> Preset:
    """The shipped preset called `name`; ConfigError listing the choices when there is none."""
    path = _preset_files().get(name)
    if path is None:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    preset = load_preset_file(path)
    if preset.name != name:
        raise ConfigError(f"preset file {path} is named {preset.name!r}, expected {name!r}")
    return preset


def load_preset_file(path: str | Path | Traversable) -> Preset:
    """Read and validate one preset TOML file; any problem -> ConfigError naming the file."""
    try:
        data = tomllib.loads(_read_text(path))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"preset file {path}: broken TOML: {exc}") from None
    try:
        top = _checked(data, _TOP_KEYS, "")
        model = GPTConfig(**_checked(top["model"], _MODEL_KEYS, "model."))
        train = TrainDefaults(**_checked(top["train"], _TRAIN_KEYS, "train."))
    except ValueError as exc:
        raise ConfigError(f"preset file {path}: {exc}") from None
    return Preset(name=top["name"], description=top["description"], model=model, train=train)


def _read_text(path: str | Path | Traversable) -> str:
    source = Path(path) if isinstance(path, str) else path
    try:
        return source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"preset file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"preset file {path} cannot be read: {exc}") from None


def _checked(table: dict, schema: dict[str, tuple[tuple[type, ...], Any]], prefix: str) -> dict:
    """The table's values with defaults filled in; ValueError on unknown, missing or mistyped keys."""
    unknown = sorted(set(table) - set(schema))
    if unknown:
        raise ValueError(f"unknown key {prefix}{unknown[0]}; expected {', '.join(prefix + k for k in schema)}")
    out = {}
    for key, (types, default) in schema.items():
        if key not in table:
            if default is _REQUIRED:
                raise ValueError(f"missing key {prefix}{key}")
            out[key] = default
            continue
        value = table[key]
        if isinstance(value, bool) != (bool in types) or not isinstance(value, types):
            wanted = " or ".join(t.__name__ for t in types).replace("dict", "table")
            raise ValueError(f"{prefix}{key} must be {wanted}, got {value!r}")
        out[key] = float(value) if types is _FLOAT else value
    return out


def _preset_files() -> dict[str, Path | Traversable]:
    """{file stem: file} of the shipped presets: the installed package, else the source tree."""
    try:
        folder: Path | Traversable = resources.files("homestar._presets")
    except ModuleNotFoundError:
        folder = Path(__file__).resolve().parents[2] / "presets"
    if not folder.is_dir():
        return {}
    files = (entry for entry in folder.iterdir() if entry.name.endswith(".toml"))
    return {entry.name.removesuffix(".toml"): entry for entry in files}
