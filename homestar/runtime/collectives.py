"""Group-owner ZeRO collectives over torch.distributed, and their one-process stand-in.

Each chunk group has one owner rank (`balance`: groups shared out by size, every rank computing
the same table from the same layout): only the owner runs AdamW on it and keeps meaningful fp32
master weights and moments for it. After the last backward of a step each group's fp32
grad chunk is summed onto its owner (`reduce`, fp32: grads are accumulated in fp32 and a bf16
sum would drop the small ones); after the owner's update it broadcasts the group's
compute-dtype param chunk (bf16 on GPUs: half the bytes of fp32, and what compute reads).

Under NCCL a host-homed chunk is staged through the device: its upload, the collective and its
copy home are queued on the current stream without blocking the host; only `Pending.settle` (or
`wait`) does. With one process (`Collective()`), every method returns at once: one code path, no
collectives.
Knows nothing of models, data or files; does not create the process group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(kw_only=True, slots=True)
class Pending:
    """An issued asynchronous collective; `wait()` finishes it (and copies a staged result back
    into `target`, when there is one), or `land()` queues that and `settle()` waits for it."""

    work: object | None = None
    staged: torch.Tensor | None = None
    target: torch.Tensor | None = None
    landed: object | None = None
    """The CUDA event after the copy home `land` queued (None: nothing to wait for)."""

    def wait(self) -> None:
        """Finish: the result is in `target` when this returns."""
        self.land()
        self.settle()

    def land(self) -> None:
        """Queue the rest without blocking the host: the current stream waits for the collective
        (NCCL: a stream wait; gloo: done when it returns), then copies a staged result into its
        target (pinned: asynchronously). `settle` blocks until that copy is done. A staged buffer
        was allocated on the current stream, which now waits for the collective: the allocator
        hands its memory to later work only behind it."""
        if self.work is not None:
            self.work.wait()
        if self.staged is not None and self.target is not None:
            self.target.copy_(self.staged, non_blocking=True)  # cost: device -> host copy of one chunk
            if self.staged.is_cuda:
                self.landed = torch.cuda.Event()
                self.landed.record()
        self.work = self.staged = self.target = None  # landed: a second call does nothing

    def settle(self) -> None:
        """Block the host until what `land` queued has finished (a sync on one event)."""
        if self.landed is not None:
            self.landed.synchronize()
            self.landed = None


@dataclass(kw_only=True, slots=True)
class Collective:
    """This process's place among the ranks; world 1 means no collective is ever issued."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where NCCL needs tensors to be (host tensors are staged there); cpu for gloo."""
    owners: tuple[int, ...] | None = field(default=None, repr=False)
    """Owner rank of each chunk group (`balance`); None: group g belongs to rank g % world."""

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

    def balance(self, sizes: list[int]) -> None:
        """Share the chunk groups (elements each, in group order) out by size: each goes to the
        rank owning the fewest elements so far (ties: the lowest rank). Ownership by index alone
        gave one rank of two 1.06x the other's elements at 2.7b (the embedding's chunk is 2.4x
        the others) and 3.6x at 13b (chunks alternate large and small), and the step waits for
        the busiest rank's AdamW."""
        if self.world == 1:
            self.owners = None
            return
        load, owners = [0] * self.world, []
        for size in sizes:
            rank = min(range(self.world), key=lambda r: (load[r], r))
            owners.append(rank)
            load[rank] += size
        self.owners = tuple(owners)

    def owner(self, group_index: int) -> int:
        return group_index % self.world if self.owners is None else self.owners[group_index]

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
        if self.rank == src:  # nothing comes back; a staged upload is kept until the broadcast read it
            return Pending(work=work, staged=None if staged is tensor else staged)
        return self._pending(work, staged, tensor)

    def least(self, value: int) -> int:
        """The smallest of every rank's `value` (a sync); `value` itself on one process."""
        if not self.active:
            return value
        import torch.distributed as dist

        found = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(found, op=dist.ReduceOp.MIN)
        return int(found.item())

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
        if not upload:
            return torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
        # queued on the current stream, which the collective waits for: no host sync (host chunks
        # are pinned); the caller keeps the host buffer unchanged until the collective ends
        return tensor.to(self.device, non_blocking=True)

    @staticmethod
    def _pending(work, staged: torch.Tensor, tensor: torch.Tensor) -> Pending:
        if staged is tensor:
            return Pending(work=work)
        return Pending(work=work, staged=staged, target=tensor)
