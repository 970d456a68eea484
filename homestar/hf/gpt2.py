"""GPT-2 as Hugging Face `transformers` writes it: parameter names, layouts and config fields.

homestar's GPT and GPT2LMHeadModel have the same modules under the same names; two things differ:
GPT-2 keeps its projections in `Conv1D` modules, whose weight is stored [in, out] where
`nn.Linear` stores [out, in], and its names sit under `transformer.`. This module translates
names, tensors and configs both ways. Pure data and tensor views: it imports neither
`transformers` nor the trainer, and knows nothing of files or runs.
"""

from __future__ import annotations

import math

import torch

from homestar.errors import ConfigError
from homestar.model import GPTConfig
from homestar.model.gpt import LN_EPS

PREFIX = "transformer."
HEAD = "lm_head.weight"
_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
_BUFFERS = (".attn.bias", ".attn.masked_bias")
"""Causal-mask buffers that older GPT-2 files carry; not parameters, rebuilt by every model."""

GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
"""transformers' names for GELU with the tanh approximation (homestar's MLP activation)."""
SHAPE_FIELDS = ("vocab_size", "seq_len", "d_model", "n_layer", "n_head", "tie_embeddings")
"""The GPTConfig fields GPT-2 can express; a run whose model has any other field cannot export."""

DEFAULTS = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
    "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False, "tie_word_embeddings": True,
}
"""GPT2Config's defaults: `save_pretrained` leaves out of config.json every value equal to them."""


def is_conv1d(name: str) -> bool:
    """Whether a homestar parameter is stored transposed ([in, out]) in a GPT-2 file."""
    return name.startswith("h.") and name.endswith(_CONV1D)


def to_gpt2(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(GPT-2 name, tensor in GPT-2's layout) of one homestar parameter; a transposed view
    (the caller makes it contiguous, one copy) or the tensor itself."""
    if name == HEAD:
        return HEAD, tensor
    return PREFIX + name, tensor.t() if is_conv1d(name) else tensor


def from_gpt2(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """(homestar name, tensor in nn.Linear layout) of one GPT-2 tensor; None for mask buffers.

    Accepts the names of GPT2LMHeadModel (`transformer.h.0...`) and of the bare GPT2Model
    (`h.0...`, as in OpenAI's original upload). Returns a transposed view for Conv1D weights.
    """
    if name.startswith(PREFIX):
        name = name[len(PREFIX):]
    if name.endswith(_BUFFERS):
        return None
    return name, tensor.t() if is_conv1d(name) else tensor


def shape_from_config(raw: dict, *, where: str) -> GPTConfig:
    """homestar's GPTConfig for a GPT-2 config.json, or ConfigError naming what does not fit."""
    if raw.get("model_type") != "gpt2":
        raise ConfigError(f"{where}: model_type {raw.get('model_type')!r} is not GPT-2; "
                          "--init-from takes GPT-2-family models (model_type \"gpt2\")")
    cfg = {**DEFAULTS, **raw}
    if "n_positions" not in raw and "n_ctx" in raw:  # the oldest GPT-2 configs name it n_ctx
        cfg["n_positions"] = raw["n_ctx"]
    _check_computes_the_same(cfg, where)
    try:
        return GPTConfig(vocab_size=cfg["vocab_size"], seq_len=cfg["n_positions"], d_model=cfg["n_embd"],
                         n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                         tie_embeddings=bool(cfg["tie_word_embeddings"]))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_computes_the_same(cfg: dict, where: str) -> None:
    """Refuse the GPT-2 options that make a model homestar's GPT would compute differently."""
    problems = []
    if cfg["activation_function"] not in GELU_TANH:
        problems.append(f"activation {cfg['activation_function']!r} (homestar uses GELU, tanh approximation)")
    if cfg["n_inner"] not in (None, 4 * cfg["n_embd"]):
        problems.append(f"n_inner {cfg['n_inner']} (homestar's MLP is 4 * n_embd = {4 * cfg['n_embd']} wide)")
    eps = cfg["layer_norm_epsilon"]
    if not isinstance(eps, (int, float)) or not math.isclose(eps, LN_EPS, rel_tol=1e-6):
        problems.append(f"layer_norm_epsilon {eps} (homestar uses {LN_EPS})")
    if not cfg["scale_attn_weights"] or cfg["scale_attn_by_inverse_layer_idx"]:
        problems.append("attention scaled other than by 1/sqrt(head_dim)")
    if cfg["add_cross_attention"]:
        problems.append("cross-attention layers")
    if problems:
        raise ConfigError(f"{where}: homestar's GPT cannot reproduce this GPT-2 variant: {'; '.join(problems)}")


def config_fields(model: dict, *, eot_id: int, where: str) -> dict:
    """GPT2Config keyword arguments for a run's model shape (RunConfig.model), or ConfigError
    when the shape has a field GPT-2 cannot express."""
    extra = sorted(set(model) - set(SHAPE_FIELDS))
    if extra:
        raise ConfigError(f"{where}: the model has {', '.join(extra)}, which GPT-2 cannot express; "
                          "it cannot be exported as a transformers GPT-2")
    shape = GPTConfig(**model)
    return {
        "vocab_size": shape.vocab_size, "n_positions": shape.seq_len, "n_embd": shape.d_model,
        "n_layer": shape.n_layer, "n_head": shape.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": LN_EPS,
        # homestar trains without dropout; keep it so for whoever fine-tunes the export further.
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "tie_word_embeddings": shape.tie_embeddings, "bos_token_id": eot_id, "eos_token_id": eot_id,
        "architectures": ["GPT2LMHeadModel"],
    }
