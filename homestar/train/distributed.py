"""This process's rank among the training processes torchrun started, and the few collectives
the trainer itself needs (agreeing on a run folder, a stop, a mean loss).

`torchrun --nproc-per-node N -m homestar train ...` sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; `join_from_env` turns them into the default process group (gloo on
the CPU, NCCL on GPUs). Without torchrun (WORLD_SIZE unset or 1) nothing is initialised and
every method here returns at once. Knows nothing of engines, chunks or models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from homestar.errors import ConfigError


@dataclass(kw_only=True, slots=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes metrics, config and the tokenizer."""
        return self.rank == 0

    def broadcast(self, value):
        """Rank 0's `value` on every rank (any picklable object; a sync)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order, on every rank (a sync)."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a small CPU tensor over ranks (a sync)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        out = value.detach().float().clone()
        if dist.get_backend() == "nccl":  # NCCL reduces device tensors only
            out = out.cuda()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.cpu() / self.world


def join_from_env(device: str) -> Ranks:
    """Join the process group torchrun described in the environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "gloo"
        if device == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}")
            torch.cuda.set_device(local_rank)
            backend = "nccl"
        dist.init_process_group(backend=backend)
    _share_cores(world, rank)
    return Ranks(rank=rank, world=world, local_rank=local_rank)


def _share_cores(world: int, rank: int) -> None:
    """torchrun sets OMP_NUM_THREADS=1 when it is unset, which would run each rank's CPU AdamW on
    one core. Give each rank its share of the cores it may run on instead: the processes on this
    machine that may run on the same cores (the same affinity mask; one small gather at start)
    split them, so ranks pinned to their own cores keep them all and a cgroup's quota is
    honoured (`planner.probe.cpu_cores`). A user's own setting above 1 stays."""
    import socket

    import torch.distributed as dist

    from homestar.planner.probe import cpu_cores

    if os.environ.get("OMP_NUM_THREADS", "1") != "1":
        return
    mask = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    seen: list = [None] * world
    dist.all_gather_object(seen, (socket.gethostname(), mask))
    sharing = sum(1 for other in seen if other == seen[rank])
    torch.set_num_threads(max(1, cpu_cores() // sharing))


def leave(*, together: bool) -> None:
    """Tear the process group down at the end of a run (no-op when none exists). `together`
    (the run ended well): first wait until every rank is here, so that no rank closes its
    connections while another may still use them. (Seen before this wait: under gloo, a rank that
    had finished a run aborted at exit, "terminate called without an active exception", in a few
    of some thirty two-rank resumes on a loaded 2-core machine.) After a failure a rank leaves at
    once: the others may never get here."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
