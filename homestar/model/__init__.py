"""The GPT model and its named presets, in plain PyTorch.

Knows nothing of chunks, memory placement, data or training loops: the runtime attaches to a
`GPT` from outside, the trainer reads a `Preset` for shapes and defaults.
"""

from homestar.model.config import GPTConfig
from homestar.model.gpt import GPT, cross_entropy
from homestar.model.presets import (
    Preset,
    TrainDefaults,
    list_presets,
    load_preset,
    load_preset_file,
    preset_names,
)

__all__ = [
    "GPT",
    "GPTConfig",
    "Preset",
    "TrainDefaults",
    "cross_entropy",
    "list_presets",
    "load_preset",
    "load_preset_file",
    "preset_names",
]
