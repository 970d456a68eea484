"""Group-owner ZeRO collectives over torch.distributed, and their one-process stand-in.

Chunk group g is owned by rank g % world: only the owner runs AdamW on it and keeps meaningful
fp32 master weights and moments for it. After the last backward of a step each group's fp32
grad chunk is summed onto its owner (`reduce`, fp32: grads are accumulated in fp32 and a bf16
sum would drop the small ones); after the owner's update it broadcasts the group's
compute-dtype param chunk (bf16 on GPUs: half the bytes of fp32, and what compute reads).

With one process (`Collective()`), every method returns at once: one code path, no collectives.
Knows nothing of models, data or files; does not create the process group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(kw_only=True, slots=True)
class Pending:
    """An issued asynchronous collective; `wait()` finishes it (and copies a staged result back
    into `target`, when there is one; a staged buffer is kept alive until then either way)."""

    work: object | None = None
    staged: torch.Tensor | None = None
    target: torch.Tensor | None = None

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
        if self.staged is not None and self.target is not None:
            self.target.copy_(self.staged)  # cost: device -> host copy of a staged chunk


@dataclass(kw_only=True, slots=True)
class Collective:
    """This process's place among the ranks; world 1 means no collective is ever issued."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where NCCL needs tensors to be (host tensors are staged there); cpu for gloo."""

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world}")

    @classmethod
    def current(cls) -> "Collective":
        """The default process group's rank and size, or world 1 when none is initialised."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), device=device)

    @property
    def active(self) -> bool:
        return self.world > 1

    def owner(self, group_index: int) -> int:
        return group_index % self.world

    def owns(self, group_index: int) -> bool:
        return self.owner(group_index) == self.rank

    # -- collectives (each a no-op at world 1) -------------------------------------------------
    def reduce_to_owner(self, tensor: torch.Tensor, group_index: int) -> Pending:
        """Start summing `tensor` over ranks into the owner's copy (others' copies: undefined)."""
        import torch.distributed as dist

        if not self.active:
            return Pending()
        staged = self._stage(tensor)
        work = dist.reduce(staged, dst=self.owner(group_index), op=dist.ReduceOp.SUM, async_op=True)
        return self._pending(work, staged, tensor)

    def broadcast_from_owner(self, tensor: torch.Tensor, group_index: int) -> Pending:
        """Start copying the owner's `tensor` into every other rank's."""
        import torch.distributed as dist

        if not self.active:
            return Pending()
        src = self.owner(group_index)
        # staged on the backend's device under NCCL: the owner uploads its copy and keeps it (no
        # copy back); the others receive into an empty buffer (no upload) and copy it home
        staged = self._stage(tensor, upload=self.rank == src)
        work = dist.broadcast(staged, src=src, async_op=True)
        if self.rank == src:
            return Pending(work=work, staged=None if staged is tensor else staged)
        return self._pending(work, staged, tensor)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place, and wait (a sync)."""
        import torch.distributed as dist

        if self.active:
            staged = self._stage(tensor)
            dist.all_reduce(staged, op=dist.ReduceOp.SUM)
            if staged is not tensor:
                tensor.copy_(staged)
        return tensor

    # -- helpers ------------------------------------------------------------------------------
    def _stage(self, tensor: torch.Tensor, *, upload: bool = True) -> torch.Tensor:
        """The tensor itself where the backend can use it, else a copy on the backend's device
        (cost: one host -> device copy per collective on a host-homed chunk under NCCL; none
        without `upload`: an empty buffer the collective fills)."""
        if tensor.device == self.device or self.device.type == "cpu" and tensor.device.type == "cpu":
            return tensor.contiguous() if not tensor.is_contiguous() else tensor
        return tensor.to(self.device) if upload else torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)

    @staticmethod
    def _pending(work, staged: torch.Tensor, tensor: torch.Tensor) -> Pending:
        if staged is tensor:
            return Pending(work=work)
        return Pending(work=work, staged=staged, target=tensor)
