"""Hugging Face interop: export a run as a `transformers` GPT-2, start a run from a GPT-2 folder.

`export_run` needs `transformers` (the optional extra `pip install homestar[hf]`) and imports it
only when called; reading a GPT-2 folder (`model_folder`, `init_preset`, `read_weights`,
`read_tokenizer`) needs only safetensors, torch and tokenizers. Nothing here downloads.
"""

from homestar.hf.export import Exported, export_run, require_transformers
from homestar.hf.load import init_preset, model_folder, read_shape, read_tokenizer, read_weights

__all__ = [
    "Exported",
    "export_run",
    "init_preset",
    "model_folder",
    "read_shape",
    "read_tokenizer",
    "read_weights",
    "require_transformers",
]
