"""Text from a model in training: encode a prompt, generate, decode the continuation."""

from __future__ import annotations

import torch


def sample_text(engine, model, tokenizer, prompt: str, *, max_tokens: int, generator: torch.Generator | None,
                device: str, temperature: float = 0.8, top_k: int | None = 40) -> str:
    """The continuation of `prompt`; `engine.inference()` makes the model's weights usable for it."""
    ids = tokenizer.encode(prompt).ids or [0]
    seq_len = model.config.seq_len
    idx = torch.tensor([ids[-seq_len:]], dtype=torch.long, device=device)
    with engine.inference():
        out = model.generate(idx, max_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return tokenizer.decode(out[0, idx.shape[1]:].tolist())
