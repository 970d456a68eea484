"""Reading a local Hugging Face GPT-2 folder (shape, weights, tokenizer) to start a run from it.

Reads `config.json`, the weights (`model.safetensors`, sharded safetensors with their index, or
`pytorch_model.bin` loaded with `weights_only=True`, so no code is unpickled) and the tokenizer
(`tokenizer.json`, or GPT-2's `vocab.json` + `merges.txt`) with json, safetensors, torch and
tokenizers alone: starting from a folder does not need `transformers`, and nothing here touches
the network. Knows nothing of engines, chunks or the trainer: it hands back a `GPTConfig`, a
{homestar parameter name: fp32 CPU tensor} dict and a `tokenizers.Tokenizer`.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from homestar.data.tokenizer import EOT, eot_id, read_tokenizer_file
from homestar.errors import CheckpointError, ConfigError, DataError
from homestar.hf.gpt2 import HEAD, from_gpt2, shape_from_config
from homestar.model import GPT, GPTConfig, Preset, list_presets

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
"""Where transformers' `save_pretrained` puts weights, in the order they are looked for."""


def model_folder(path: str | Path) -> Path:
    """The folder as a Path, or ConfigError when it is not a Hugging Face model folder."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"--init-from {folder}: no such folder")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--init-from {folder}: no config.json there; give a folder written by "
                          "transformers' save_pretrained")
    return folder


def read_shape(folder: Path) -> GPTConfig:
    """The model shape that `folder/config.json` describes (a GPT-2 config), or ConfigError."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable or not JSON ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} is not a model config (not a JSON object)")
    return shape_from_config(raw, where=str(path))


def init_preset(folder: Path, *, seq_len: int | None = None) -> Preset:
    """A preset for a run started from `folder`: its GPT-2 shape (positions cut to `seq_len` when
    given), named after the folder, with the training defaults (learning rate, batch, schedule)
    of the shipped preset closest in parameter count."""
    shape = read_shape(folder)
    if seq_len is not None:
        if seq_len > shape.seq_len:
            raise ConfigError(f"--seq-len {seq_len} is longer than the {shape.seq_len} positions of the model "
                              f"in {folder}")
        shape = replace(shape, seq_len=seq_len)
    n = shape.num_params()
    nearest = min(list_presets(), key=lambda p: (abs(math.log(p.params / n)), p.name))
    return Preset(name=folder.resolve().name or "custom", description=f"GPT-2 weights from {folder}",
                  model=shape, train=nearest.train)


def read_weights(folder: Path, shape: GPTConfig) -> dict[str, torch.Tensor]:
    """{homestar parameter name: fp32 CPU tensor} for a model of `shape` from the folder's weights.

    Conv1D weights are transposed into nn.Linear's layout (one copy each); a tied head is
    dropped (it is the embedding); the position table keeps its first `shape.seq_len` rows.
    Raises CheckpointError when the weights are missing, unreadable or of another shape.
    Cost: the whole model once in fp32 host memory, plus one tensor in flight.
    """
    weights = {}
    for hf_name, tensor in _tensors(folder):
        mapped = from_gpt2(hf_name, tensor)
        if mapped is None or (mapped[0] == HEAD and shape.tie_embeddings):
            continue
        name, value = mapped
        if name == "wpe.weight" and value.dim() == 2:
            value = value[: shape.seq_len]  # a shorter --seq-len keeps the first positions
        weights[name] = value.to(torch.float32).contiguous()  # copies unless already fp32 and laid out
    _check_against(weights, shape, folder)
    return weights


def read_tokenizer(folder: Path, *, vocab_size: int) -> Tokenizer:
    """The folder's tokenizer: `tokenizer.json`, else a byte-level BPE built from GPT-2's
    `vocab.json` + `merges.txt`. It must have an end-of-text token and fit in `vocab_size`."""
    if (folder / "tokenizer.json").is_file():
        tok = read_tokenizer_file(folder / "tokenizer.json")
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        tok = _from_vocab_and_merges(folder)
    else:
        raise ConfigError(f"{folder} has no tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    if tok.get_vocab_size() > vocab_size:
        raise ConfigError(f"{folder}: the tokenizer has {tok.get_vocab_size():,} tokens, more than the model's "
                          f"vocab_size {vocab_size:,}")
    return tok


def _from_vocab_and_merges(folder: Path) -> Tokenizer:
    """GPT-2's own pipeline: byte-level pre-tokenizer (no prefix space unless the folder's
    tokenizer_config.json asks for one), BPE, byte-level decoder, `<|endoftext|>` special."""
    try:
        bpe = models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    except Exception as exc:  # tokenizers raises a bare Exception for any parse failure
        raise DataError(f"{folder}: vocab.json or merges.txt is not a valid BPE ({type(exc).__name__})") from None
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=_add_prefix_space(folder))
    tok.decoder = decoders.ByteLevel()
    if tok.token_to_id(EOT) is not None:  # reuses the id vocab.json gives it (50256 in GPT-2)
        tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    eot_id(tok, where=str(folder / "vocab.json"))
    return tok


def _add_prefix_space(folder: Path) -> bool:
    try:
        settings = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(settings, dict) and settings.get("add_prefix_space") is True


def _tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of the folder's weight files, one file open at a time."""
    found = next((name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if found is None:
        raise CheckpointError(f"{folder} has no weights (model.safetensors or pytorch_model.bin)")
    for path in _weight_files(folder, found):
        if path.suffix == ".safetensors":
            yield from _safetensors(path)
        else:
            yield from _torch_file(path).items()


def _weight_files(folder: Path, found: str) -> list[Path]:
    if not found.endswith(".index.json"):
        return [folder / found]
    try:
        index = json.loads((folder / found).read_text(encoding="utf-8"))
        shards = sorted(set(index["weight_map"].values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{folder / found} is damaged ({type(exc).__name__})") from None
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: weight shard {missing[0]} named in {found} is missing")
    return [folder / s for s in shards]


def _safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                yield name, f.get_tensor(name)  # one tensor read from disk into memory
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path} is unreadable ({type(exc).__name__})") from None


def _torch_file(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, no code
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        raise CheckpointError(f"{path} is unreadable or holds more than tensors ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _check_against(weights: dict, shape: GPTConfig, folder: Path) -> None:
    """CheckpointError unless `weights` has exactly the parameters of a GPT of `shape`."""
    with torch.device("meta"):  # names and shapes only: nothing allocated
        expected = {name: tuple(p.shape) for name, p in GPT(shape).named_parameters()}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{folder}: the weights do not match its config.json (missing {missing[:3]}, "
                              f"unexpected {extra[:3]})")
    for name, want in expected.items():
        if tuple(weights[name].shape) != want:
            raise CheckpointError(f"{folder}: {name} has shape {tuple(weights[name].shape)}, "
                                  f"config.json implies {want}")
