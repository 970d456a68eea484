"""`homestar export`: a run's checkpoint as a Hugging Face `transformers` GPT-2 folder.

Writes config.json (GPT2Config, through the installed `transformers`, so the file is what that
version reads), model.safetensors with GPT2LMHeadModel's names and layouts, and the run's
tokenizer as a fast tokenizer (tokenizer.json, tokenizer_config.json, special_tokens_map.json),
so `GPT2LMHeadModel.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)` load it
offline. The folder is built beside OUT and renamed into place: a failed export leaves nothing.
Reads only the checkpoint's weights (never its optimizer state). Knows run folders and
checkpoints, nothing of engines, chunks or the trainer loop.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from homestar.errors import ConfigError
from homestar.hf.gpt2 import config_fields, to_gpt2
from homestar.train.checkpoint import load_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(kw_only=True, slots=True, frozen=True)
class Exported:
    """What `export_run` wrote."""

    path: Path
    """The folder transformers loads."""
    step: int
    """The checkpoint step whose weights it holds."""
    params: int
    """Parameters written (a tied head counted once)."""


def export_run(run_dir: Path, out_dir: Path, *, step: int | None = None, dtype: str = "fp32") -> Exported:
    """Export checkpoint `step` of the run (default: the newest intact one) to `out_dir`, which
    must not exist or be empty. Raises ConfigError/CheckpointError with a one-line reason."""
    transformers = require_transformers()
    from homestar.data.tokenizer import eot_id, read_tokenizer_file
    from homestar.train.config import RunConfig

    run_dir, out_dir = Path(run_dir).expanduser(), Path(out_dir).expanduser()
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a folder")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    _check_out_dir(out_dir)
    config = RunConfig.load(run_dir)
    tokenizer = read_tokenizer_file(run_dir / "tokenizer.json")
    eot = eot_id(tokenizer, where=str(run_dir / "tokenizer.json"))
    fields = config_fields(config.model, eot_id=eot, where=str(run_dir / "config.json"))
    step, weights = load_weights(run_dir, step)
    tensors = _gpt2_tensors(weights, DTYPES[dtype])
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_config(transformers, tmp, fields, DTYPES[dtype])
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        _write_tokenizer(tmp, tokenizer, eot_name=tokenizer.id_to_token(eot), max_length=config.seq_len)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); the rename below needs the name free
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Exported(path=out_dir, step=step, params=sum(t.numel() for t in tensors.values()))


def require_transformers():
    """The `transformers` module, or ConfigError telling how to install it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("this needs Hugging Face transformers: pip install homestar[hf]") from None
    return transformers


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir} already exists and is not empty; export into a new folder")


def _gpt2_tensors(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """GPT-2 names and layouts, in `dtype`. Empties `weights` as it goes, so the host holds about
    one copy of the model (plus one tensor) instead of two."""
    out = {}
    for name in list(weights):
        hf_name, tensor = to_gpt2(name, weights.pop(name))
        out[hf_name] = tensor.to(dtype).contiguous()  # a copy for transposed or converted tensors
    return out


def _write_config(transformers, folder: Path, fields: dict, dtype: torch.dtype) -> None:
    config = transformers.GPT2Config(**fields)
    # transformers 5 names the field `dtype`; 4.x `torch_dtype`.
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", dtype)
    config.save_pretrained(folder)


def _write_tokenizer(folder: Path, tokenizer, *, eot_name: str, max_length: int) -> None:
    """The run's tokenizer unchanged (tokenizer.json) and the settings that make transformers load
    it as a generic fast tokenizer (any transformers version: no per-model rebuilding of the
    pipeline), decoding without the legacy clean-up of spaces that would change the text."""
    (folder / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    special = {"bos_token": eot_name, "eos_token": eot_name, "unk_token": eot_name}
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
                "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
