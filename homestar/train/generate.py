"""`homestar sample`: text from a run's latest checkpoint, on a plain model (no training state)."""

from __future__ import annotations

from pathlib import Path

import torch

from homestar.errors import CheckpointError, ConfigError
from homestar.train.build import resolve_device
from homestar.train.checkpoint import load_weights
from homestar.train.config import RunConfig


def load_weights_only(run_dir: Path) -> dict:
    """Weights of the newest checkpoint whose weights file checks out (older ones if damaged)."""
    return load_weights(run_dir)[1]


def generate_from_run(run_dir: Path, prompt: str, *, tokens: int, temperature: float, top_k: int | None,
                      seed: int, device: str = "cpu") -> str:
    from tokenizers import Tokenizer

    from homestar.model import GPT, GPTConfig

    if temperature < 0:
        raise ConfigError("--temperature must be zero (greedy) or positive")
    config = RunConfig.load(run_dir)
    try:
        tokenizer = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    except Exception as exc:  # tokenizers raises its own Exception type for any parse failure
        raise ConfigError(f"{run_dir / 'tokenizer.json'} is damaged ({type(exc).__name__})") from None
    weights = load_weights_only(run_dir)
    device = resolve_device(device)
    with torch.device("meta"):
        model = GPT(GPTConfig(**config.model))
    model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name not in weights or weights[name].shape != param.shape:
                raise CheckpointError(f"the checkpoint in {run_dir} does not match the run's model ({name})")
            param.copy_(weights[name])
    model.eval()
    ids = tokenizer.encode(prompt).ids or [0]
    idx = torch.tensor([ids[-model.config.seq_len:]], dtype=torch.long, device=device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = model.generate(idx, tokens, temperature=temperature, top_k=top_k, generator=generator)
    return tokenizer.decode(out[0, idx.shape[1]:].tolist())
