"""Activation memory of one micro-batch: what forward keeps for backward, and backward's peaks.

Per-block activation checkpointing or none; the logits with their grad and the loss's fp32
slices, which dominate small models with a large vocabulary. Pure arithmetic on the model's
shape; knows nothing of chunks, budgets or devices.
"""

from __future__ import annotations

from dataclasses import dataclass

from homestar.model import GPTConfig
from homestar.model.gpt import CE_SLICE_ELEMS  # logit elements the loss upcasts to fp32 at once


@dataclass(kw_only=True, slots=True, frozen=True)
class ActivationMemory:
    """Non-chunk bytes of one micro-batch's forward and backward, by phase.

    Measured against plain PyTorch on an H200 (bf16 autocast, chunked loss, tied head): the peak
    is the saved activations plus the larger of two phases, the loss/head backward and one
    block's recompute and backward, never both at once. The model reads above what was measured
    for d_model 128-4096 and micro-batches 2-8 (by 4-13%), and 40% above at micro-batch 1,
    where the loss's fixed-size fp32 slices dominate. Since then checkpointed block inputs count
    in fp32, as an allocator history of the 32-layer 2.7b preset showed them (twice the bf16
    figure the calibration had used: its models were shallow enough not to show it); the
    shallow models' figures above were not re-measured after that change.
    """

    saved: int
    """Kept from forward to backward: each block's input with checkpointing, else every block's
    saved tensors; plus the final LayerNorm's fp32 output."""
    head_phase: int
    """Loss backward: the logits, their grad and the loss's fp32 slices (and an untied head's
    weight grad)."""
    block_phase: int
    """One block's recomputed saved tensors (checkpointing) and its backward's live grads."""
    grad_held: int
    """A tied embedding's grad, which autograd holds from the head's backward to the embedding's
    before the runtime adds it into its grad chunk."""

    @property
    def peak(self) -> int:
        return self.saved + self.grad_held + max(self.head_phase, self.block_phase)


def activation_memory(config: GPTConfig, *, micro_batch: int, seq_len: int, act_bytes: int,
                      checkpointing: bool) -> ActivationMemory:
    """Activation memory of one micro-batch; `act_bytes` 2 for bf16/fp16 autocast, 4 for fp32.

    Per token and block, in [B, T, d_model] tensors of `act_bytes`: forward saves 17 in fp32
    (ln inputs and outputs, qkv 3, attention output, projection input, MLP 4 + 4); under
    autocast the two LayerNorm outputs are fp32 with half-precision casts beside them, 21 in all.
    Backward adds ~19 live (MLP grads 4 + 4, qkv grads, flash-attention accumulators). Attention
    is the fused SDPA kernel: no [T, T] scores are kept.
    """
    tensor = micro_batch * seq_len * config.d_model * act_bytes
    residual = micro_batch * seq_len * config.d_model * 4  # the residual stream is fp32 (`GPT.hidden_states`)
    per_block = (21 if act_bytes < 4 else 17) * tensor
    backward_live = 19 * tensor
    final_norm = 2 * tensor * (4 // act_bytes)  # fp32 output, kept for the head's backward
    if checkpointing:  # each block's fp32 input (seen: 32 x 80 MiB for 2.7b at micro-batch 8, H200)
        saved, block_phase = config.n_layer * residual, per_block + backward_live
    else:
        saved, block_phase = config.n_layer * per_block, backward_live
    logit_elems = micro_batch * seq_len * config.vocab_size
    fp32_slices = (3 if act_bytes < 4 else 2) * min(logit_elems, CE_SLICE_ELEMS) * 4
    head_weight = config.vocab_size * config.d_model * act_bytes
    return ActivationMemory(
        saved=saved + final_norm,
        head_phase=2 * logit_elems * act_bytes + fp32_slices + (0 if config.tie_embeddings else head_weight),
        block_phase=block_phase,
        grad_held=head_weight if config.tie_embeddings else 0,
    )
