"""The small interface between the trainer loop and whatever executes a training step.

The trainer knows only this protocol. `TorchEngine` (plain PyTorch, the reference) and the chunk
runtime's engine (`homestar.runtime.attach`) both implement it, so one loop, one checkpoint format
and one set of tests serve both.

Canonical state (what checkpoints hold, identical for every engine so that a run saved under one
resumes under the other):
- weights: {parameter name -> fp32 CPU tensor}, names as in `model.named_parameters()` (tied
  parameters appear once, under their first name);
- optimizer: {"step": int, "exp_avg": {name -> fp32 CPU tensor}, "exp_avg_sq": {name -> ...}},
  plus engine extras such as {"loss_scale": float} for fp16.
"""

from __future__ import annotations

from typing import Protocol

import torch

from homestar.optim import OptimConfig, StepReport, no_decay  # noqa: F401  (re-exported)


class Engine(Protocol):
    """Executes forward/backward/optimizer for one model; owns its weights and optimizer."""

    def forward_backward(self, idx: torch.Tensor, targets: torch.Tensor, loss_div: float) -> torch.Tensor:
        """Run forward and backward on one micro-batch, accumulating grads of loss / loss_div.
        `loss_div` is the number of micro-batches in the step over all ranks (an engine across
        ranks tells its last micro-batch of the step by it).

        Returns the (undivided) loss as a detached 0-d tensor; reading it is the caller's sync.
        """

    def step(self, lr: float) -> StepReport:
        """Clip by global norm, apply AdamW at this lr, zero the grads."""

    def zero_grad(self) -> None:
        """Forget the grads accumulated since the last step (used to redo a step that failed)."""

    def eval_loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of one batch without grads (the engine may re-plan for the eval shape)."""

    def inference(self):
        """Context manager under which `model(idx)` and `model.generate(...)` may be called
        directly, without grads (the engine makes the weights available as the model runs)."""

    def state_dict(self) -> dict:
        """{"weights": {...}, "optimizer": {...}} in the canonical form above, on the CPU. The
        tensors may share memory with the engine (valid until its next step or load), as
        `nn.Module.state_dict`'s do: clone what must outlive that."""

    def owned_names(self) -> set[str] | None:
        """Names of the parameters whose optimizer state this process keeps; None: all."""

    def checkpoint_state(self) -> dict:
        """`state_dict()` for the checkpoint writer, whose tensors may also live on the device
        (the writer copies them to the host one at a time)."""

    def load_state_dict(self, state: dict) -> None:
        """Inverse of state_dict(); tolerant of either engine's output."""

    def chunk_snapshot(self) -> list[dict] | None:
        """Placement of every chunk ({"id", "kind", "location", "bytes"}), or None if unchunked."""

    def memory(self) -> dict[str, float]:
        """{"gpu_mem": bytes now, "gpu_peak": highest GPU bytes since the previous call,
        "cpu_mem": bytes} attributed to this engine (the step events report the peak: between
        steps a streaming engine holds little, while it runs it fills its budget)."""

    def close(self) -> None:
        """Release device memory, pinned buffers and hooks."""
