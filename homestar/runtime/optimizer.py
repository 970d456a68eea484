"""Device-aware AdamW over chunk groups, with torch.optim.AdamW's exact semantics.

Each group's AdamW runs where the group's state lives: on the device for groups homed there, on
the CPU for the rest. Both call torch's fused AdamW kernel (`torch._fused_adamw_`, what
`torch.optim.AdamW(fused=True)` runs) on lists of per-parameter views into the chunks, so every
element sees the same maths as plain PyTorch. Also as torch: parameters that got no gradient are
skipped, each parameter has its own step count, no-decay parameters get weight_decay 0, global-
norm clipping computes the norm of per-parameter norms, fp16 overflow skips the step.
Across ranks (a `Collective` of world > 1, group-owner ZeRO): each group's fp32 grads are summed
onto its owner, the squared norm of the owners' grads is summed over ranks, each owner updates
its groups alone and broadcasts their param chunks. At world 1 none of that is issued.
Knows nothing of modules, hooks or the trainer.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

import torch

from homestar.optim import OptimConfig, StepReport
from homestar.runtime.binding import ParamInfo, ParamTable
from homestar.runtime.chunk import Chunk, ChunkGroup
from homestar.runtime.collectives import Collective
from homestar.runtime.placement import Placement
from homestar.runtime.scaler import LossScaler
from homestar.runtime.states import Move

_NORM_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s


class ChunkAdamW:
    """AdamW for every managed parameter, one chunk group at a time."""

    def __init__(self, table: ParamTable, groups: list[ChunkGroup], placement: Placement, config: OptimConfig) -> None:
        self.table = table
        self.groups = groups
        self.placement = placement
        self.config = config
        self.steps: dict[int, torch.Tensor] = {}
        """Per-parameter step count (0-d fp32, as torch's fused AdamW keeps it), by layout index."""
        self.step_count = 0
        """Optimizer steps applied (skipped steps excluded)."""
        self.collective = Collective()
        """Which ranks share the work; groups not owned here get no update here."""

    def step(self, lr: float, scaler: LossScaler | None) -> StepReport:
        started = time.perf_counter()
        active = [info for info in self.table if info.has_grad]
        by_group: dict[int, list[ParamInfo]] = defaultdict(list)
        for info in active:
            by_group[info.group.index].append(info)
        grads = self._stage_grads(by_group)
        comm = self.collective
        owned = {index: infos for index, infos in by_group.items() if comm.owns(index)}
        grad_list = [grads[info.index] for infos in owned.values() for info in infos]
        if scaler is not None:
            for tensors in _by_device(grad_list).values():
                torch._foreach_mul_(tensors, scaler.inv_scale)
        total = self._total_norm(grad_list)
        if comm.active:  # the global norm: squares of the owners' norms summed over ranks (a sync)
            total = comm.all_reduce_sum((total.float() ** 2).reshape(1)).sqrt().reshape(())
        grad_norm = float(total)  # sync: the step's one host read of a device value
        skipped = scaler is not None and not math.isfinite(grad_norm)
        if scaler is not None:
            scaler.update(found_inf=skipped)
        if not skipped:
            if self.config.grad_clip > 0:
                self._clip(grad_list, total)
            for index, infos in owned.items():
                self._adam_group(self.groups[index], infos, grads, lr)
            if comm.active:
                self._share_params(by_group)
            self.step_count += bool(active)  # as torch: a step without gradients changes nothing
        self._finish(by_group)
        return StepReport(grad_norm=grad_norm, skipped=skipped, timings={"optimizer": time.perf_counter() - started})

    # -- stages ---------------------------------------------------------------------------
    def _stage_grads(self, by_group: dict[int, list[ParamInfo]]) -> dict[int, torch.Tensor]:
        """Each active grad as a view where its group's optimizer runs (grad chunks held)."""
        grads: dict[int, torch.Tensor] = {}
        pending = []
        for index, infos in by_group.items():
            chunk = self.groups[index].grad
            tensor = self._hold(chunk, infos)
            # issued in group order on every rank; gloo/NCCL run them while the next is staged
            pending.append(self.collective.reduce_to_owner(tensor, index))
            for info in infos:
                grads[info.index] = chunk.view(tensor, info.slot, info.shape)
        for work in pending:
            work.wait()
        return grads

    def _share_params(self, by_group: dict[int, list[ParamInfo]]) -> None:
        """Broadcast each updated group's param chunk from its owner; two in flight at once, so
        the copy of one overlaps the staging of the next while holding at most two chunks."""
        in_flight: list = []
        for index, infos in by_group.items():
            chunk = self.groups[index].param
            in_flight.append((self.collective.broadcast_from_owner(self._hold(chunk, infos), index), chunk, infos))
            if len(in_flight) > 1:
                self._land(*in_flight.pop(0))
        for item in in_flight:
            self._land(*item)

    def _land(self, work, chunk: Chunk, infos: list[ParamInfo]) -> None:
        work.wait()
        self._let_go(chunk, infos)

    def _total_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Norm of per-parameter norms, stacked in parameter order on the first gradient's
        device, exactly as torch.nn.utils.clip_grad_norm_ computes it."""
        if not grads:
            return torch.tensor(0.0)
        first = grads[0].device
        norms: list[torch.Tensor | None] = [None] * len(grads)
        positions: dict[torch.device, list[int]] = defaultdict(list)
        for pos, grad in enumerate(grads):
            positions[grad.device].append(pos)
        for device, pos_list in positions.items():
            found = torch._foreach_norm([grads[p] for p in pos_list], 2.0)
            if device != first:  # cost: one small copy (a sync when it goes GPU -> CPU)
                found = list(torch.stack(found).to(first).unbind())
            for pos, norm in zip(pos_list, found):
                norms[pos] = norm
        return torch.linalg.vector_norm(torch.stack(norms), 2.0)

    def _clip(self, grads: list[torch.Tensor], total: torch.Tensor) -> None:
        coef = torch.clamp(self.config.grad_clip / (total + _NORM_EPS), max=1.0)
        for device, tensors in _by_device(grads).items():
            torch._foreach_mul_(tensors, coef.to(device))

    def _adam_group(self, group: ChunkGroup, infos: list[ParamInfo], grads: dict[int, torch.Tensor], lr: float) -> None:
        master = self._hold(group.master, infos)
        exp_avg = self._hold(group.exp_avg, infos)
        exp_avg_sq = self._hold(group.exp_avg_sq, infos)
        beta1, beta2 = self.config.betas
        for decay in (True, False):
            chosen = [info for info in infos if info.decay is decay]
            if not chosen:
                continue
            steps = [self._step_tensor(info, master.device) for info in chosen]
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(
                [group.master.view(master, i.slot, i.shape) for i in chosen],
                [grads[i.index] for i in chosen],
                [group.exp_avg.view(exp_avg, i.slot, i.shape) for i in chosen],
                [group.exp_avg_sq.view(exp_avg_sq, i.slot, i.shape) for i in chosen],
                [],
                steps,
                amsgrad=False,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=self.config.weight_decay if decay else 0.0,
                eps=self.config.eps,
                maximize=False,
                grad_scale=None,
                found_inf=None,
            )
        if group.param is not group.master:
            self._hold(group.param, infos).copy_(master)  # fp32 master -> compute dtype, whole chunk
            self._let_go(group.param, infos)
        for chunk in (group.master, group.exp_avg, group.exp_avg_sq):
            self._let_go(chunk, infos)

    def discard_grads(self) -> None:
        """Forget every accumulated gradient (a failed step's) without updating anything."""
        self._finish({})

    def _finish(self, by_group: dict[int, list[ParamInfo]]) -> None:
        """Release the staged grads, discard every gradient, forget who had one."""
        for index, infos in by_group.items():
            self._let_go(self.groups[index].grad, infos)
        for group in self.groups:
            self.placement.clear(group.grad)
        for info in self.table:
            info.has_grad = False

    # -- helpers --------------------------------------------------------------------------
    def _hold(self, chunk: Chunk, infos: list[ParamInfo]) -> torch.Tensor:
        indices = [info.index for info in infos]
        if self.groups[chunk.group].optimizer_on_device:
            return self.placement.acquire(chunk, indices)
        return self.placement.acquire_on_host(chunk, indices)

    def _let_go(self, chunk: Chunk, infos: list[ParamInfo]) -> None:
        self.placement.release(chunk, [info.index for info in infos], Move.RELEASE, wrote=True)

    def _step_tensor(self, info: ParamInfo, device: torch.device) -> torch.Tensor:
        step = self.steps.get(info.index)
        if step is None:
            step = torch.zeros((), dtype=torch.float32, device=device)
        elif step.device != device:
            step = step.to(device)  # the group changed home
        self.steps[info.index] = step
        return step

    def param_step(self, info: ParamInfo) -> int:
        step = self.steps.get(info.index)
        return 0 if step is None else int(step.item())  # sync: state export only

    def set_param_step(self, info: ParamInfo, value: int) -> None:
        device = self.placement.device.device if info.group.optimizer_on_device else torch.device("cpu")
        if value <= 0:
            self.steps.pop(info.index, None)
        else:
            self.steps[info.index] = torch.tensor(float(value), dtype=torch.float32, device=device)


def _by_device(tensors: list[torch.Tensor]) -> dict[torch.device, list[torch.Tensor]]:
    out: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for tensor in tensors:
        out[tensor.device].append(tensor)
    return out
