"""The shape of a GPT model, and the arithmetic that follows from it.

Pure data: parameter counts and FLOPs are computed from the shape alone, without allocating a
tensor, so the planner can size a 13B model on a laptop. Knows nothing of devices, chunks or
training.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, slots=True, frozen=True)
class GPTConfig:
    """A GPT-2-style decoder: pre-LayerNorm blocks, GELU MLP of width 4*d_model, learned positions."""

    vocab_size: int
    """Rows of the token embedding (and of the output head)."""
    seq_len: int
    """Longest context the model accepts: rows of the position embedding."""
    d_model: int
    """Width of the residual stream."""
    n_layer: int
    """Number of transformer blocks."""
    n_head: int
    """Attention heads per block; d_model must divide evenly among them."""
    tie_embeddings: bool = True
    """The output head reuses the token embedding matrix (one parameter, counted once)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "d_model", "n_layer", "n_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be true or false, got {self.tie_embeddings!r}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_head

    def block_params(self) -> int:
        """Parameters of one transformer block (two LayerNorms, attention, MLP, all with biases)."""
        d = self.d_model
        layer_norms = 2 * (2 * d)
        attention = (d * 3 * d + 3 * d) + (d * d + d)
        mlp = (d * 4 * d + 4 * d) + (4 * d * d + d)
        return layer_norms + attention + mlp

    def num_params(self) -> int:
        """Exact number of distinct parameters (a tied head is counted once)."""
        d = self.d_model
        embeddings = self.vocab_size * d + self.seq_len * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        final_norm = 2 * d
        return embeddings + self.n_layer * self.block_params() + final_norm + head

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per parameter plus attention scores, 12*layers*seq*d_model."""
        return 6.0 * self.num_params() + 12.0 * self.n_layer * self.seq_len * self.d_model
