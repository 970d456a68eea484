"""The chunked engine: forward/backward, optimizer step, eval and state for one model.

Implements the trainer's Engine protocol (duck-typed) on top of the runtime's pieces: hooks
bring chunks to the device as modules run, placement keeps the budgets, the tracer records each
new shape of work and is replayed afterwards, AdamW runs per chunk group where the group lives.
After the first training trace the engine re-plans which groups live on the device from the
measured non-model memory. Knows nothing of GPT, data, files or the UI.
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Hashable

import torch
from torch import nn

from homestar.errors import BudgetError
from homestar.optim import StepReport
from homestar.runtime.binding import ParamTable
from homestar.runtime.canonical import export_state, import_state
from homestar.runtime.chunk import ChunkGroup
from homestar.runtime.collectives import Collective
from homestar.runtime.config import RuntimeConfig
from homestar.runtime.homes import GroupBytes, plan_homes
from homestar.runtime.hooks import Phase, RuntimeHooks
from homestar.runtime.memory import HostMemory, fmt_bytes
from homestar.runtime.optimizer import ChunkAdamW
from homestar.runtime.placement import Placement
from homestar.runtime.scaler import LossScaler
from homestar.runtime.stream_adam import slice_for, staging_bytes
from homestar.runtime.trace import Tracer

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def default_loss(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return model(idx, targets)[1]


class ChunkedEngine:
    """Trains one model whose parameters live in chunks (build it with `runtime.attach`)."""

    def __init__(
        self,
        *,
        model: nn.Module,
        config: RuntimeConfig,
        table: ParamTable,
        groups: list[ChunkGroup],
        group_bytes: list[GroupBytes],
        placement: Placement,
        host: HostMemory,
        tracer: Tracer,
        adamw: ChunkAdamW,
        loss_fn: LossFn,
    ) -> None:
        self.model = model
        self.config = config
        self.table = table
        self.groups = groups
        self._group_bytes = group_bytes
        self.placement = placement
        self.host = host
        self.tracer = tracer
        self.adamw = adamw
        self.loss_fn = loss_fn
        self.scaler = None
        if config.precision == "fp16":
            self.scaler = LossScaler(scale=config.loss_scale_init, growth_interval=config.loss_scale_growth_interval)
        self.hooks = RuntimeHooks(model, table, placement)
        if adamw.collective.active:  # grads summed onto their owners as backward completes them
            self.hooks.grad_done = adamw.ranks.reduce_in_backward
        self._micro_batches = 0
        """Micro-batches accumulated since the last step (or discarded grads)."""
        self.device = placement.device.device
        self._closed = False
        self._update_resident()

    # -- the Engine protocol --------------------------------------------------------------
    def forward_backward(self, idx: torch.Tensor, targets: torch.Tensor, loss_div: float) -> torch.Tensor:
        idx, targets = self._to_device(idx), self._to_device(targets)
        self.model.train()
        clock = self.placement.device.clock
        with self._work(("train", tuple(idx.shape), tuple(targets.shape))):
            mark = clock.start() if clock else None
            self.hooks.phase = Phase.FORWARD
            with self.hooks.saved_tensors(), self._autocast():
                loss = self.loss_fn(self.model, idx, targets)
            mark = clock.stop("forward", mark) if clock else None
            # the last step's update ran beside this forward; backward writes grads again
            self.adamw.settle()
            self.hooks.phase = Phase.BACKWARD
            # loss_div is the step's micro-batches over all ranks (the Engine protocol), so this
            # rank's last micro-batch is its loss_div / world-th
            self._micro_batches += 1
            comm = self.adamw.collective
            self.hooks.last_backward = comm.active and self._micro_batches >= round(loss_div / comm.world)
            scaled = loss / loss_div
            if self.scaler is not None:
                scaled = scaled * self.scaler.scale
            scaled.backward()
            if clock:
                clock.stop("backward", mark)
        return loss.detach()

    def step(self, lr: float) -> StepReport:
        self._micro_batches = 0
        with self._work(("step",)):
            return self.adamw.step(lr, self.scaler)

    def settle(self) -> None:
        """Wait for the last step's update, which may still run beside the next forward (the
        engine does this itself before anything reads or writes the state; for timing)."""
        self.adamw.settle()

    def zero_grad(self) -> None:
        """Forget the grads accumulated since the last step (a failed step's); nothing is updated."""
        self._micro_batches = 0
        self.adamw.discard_grads()

    def eval_loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        idx, targets = self._to_device(idx), self._to_device(targets)
        self.model.eval()
        with self._work(("eval", tuple(idx.shape), tuple(targets.shape))), torch.no_grad():
            self.hooks.phase = Phase.FORWARD
            with self._autocast():
                loss = self.loss_fn(self.model, idx, targets)
        return loss.detach()

    @contextlib.contextmanager
    def inference(self):
        """Direct no-grad calls of the model (sampling): eval mode, the run's precision, chunks
        fetched by the hooks as modules run (untraced work, least-recently-used eviction).
        Inputs must be on `self.device`."""
        self.model.eval()
        with self._work(None), torch.no_grad(), self._autocast():
            self.hooks.phase = Phase.FORWARD
            yield self.model

    def state_dict(self) -> dict:
        """Canonical state; across ranks, this rank's shard: the parameters of the groups it owns."""
        return self._export(device_views=False)

    def checkpoint_state(self) -> dict:
        """`state_dict()` for a checkpoint writer: chunks homed on the device stay there (views,
        valid until the next step), so the writer stages one tensor at a time, not all of them."""
        return self._export(device_views=True)

    def owned_names(self) -> set[str] | None:
        """Names of the parameters whose optimizer state this rank keeps (its groups'); None on
        one process: all of them."""
        comm = self.adamw.collective
        return None if not comm.active else {info.name for info in self.table if comm.owns(info.group.index)}

    def _export(self, *, device_views: bool) -> dict:
        self.adamw.settle()
        comm = self.adamw.collective
        keep = None if not comm.active else (lambda info: comm.owns(info.group.index))
        return export_state(self.table, self.adamw, self.placement, self.scaler, keep, device_views=device_views)

    def load_state_dict(self, state: dict) -> None:
        self.adamw.settle()
        import_state(state, self.table, self.adamw, self.placement, self.scaler)

    def chunk_snapshot(self) -> list[dict]:
        device = self.placement.device
        out = []
        for chunk in self.placement.chunks:
            if chunk.resident:
                location = "gpu" if device.done(chunk.ready) else "moving"
            else:
                location = "cpu" if device.done(chunk.event) else "moving"
            out.append({"id": chunk.id, "kind": chunk.kind.snapshot_kind, "location": location,
                        "bytes": chunk.nbytes, "group": chunk.group})
        return out

    def memory(self) -> dict[str, float]:
        device = self.placement.device
        now = float(device.used + device.nonmodel_bytes())
        return {"gpu_mem": now, "gpu_peak": max(now, float(self.placement.take_recent_peak())),
                "cpu_mem": float(self.host.used)}

    def close(self) -> None:
        """Remove the hooks and free device and host memory; parameters stay placeholders."""
        if self._closed:
            return
        self._closed = True
        self.adamw.close()
        self.hooks.remove()
        self.placement.close()

    # -- extras ---------------------------------------------------------------------------
    def distribute(self, collective: Collective) -> None:
        """Share the optimizer's work among `collective`'s ranks (group-owner ZeRO); every rank's
        engine must be built alike and given its collective before the first step. Passing the
        collective to `attach` instead also divides the optimizer state's memory among the ranks;
        an engine built that way only accepts the same rank and world here."""
        if any(not g.has_state for g in self.groups) and (collective.rank, collective.world) != (
                self.adamw.collective.rank, self.adamw.collective.world):
            raise ValueError(f"this engine holds optimizer state for rank {self.adamw.collective.rank} of "
                             f"{self.adamw.collective.world}, not rank {collective.rank} of {collective.world}")
        self.adamw.settle()
        collective.balance([g.grad.numel for g in self.groups])  # the owners attach chose, on every rank
        self.adamw.collective = collective
        self._update_resident()

    @property
    def collective(self) -> Collective:
        return self.adamw.collective

    def time_phases(self) -> None:
        """From now on, time forward, backward and the copies each way (`take_phases` reads them)."""
        from homestar.runtime.phases import PhaseClock

        self.placement.device.clock = PhaseClock(cuda=self.device.type == "cuda")

    def take_phases(self) -> dict[str, float]:
        """Seconds of each timed phase since the last call (on CUDA: call after a synchronise)."""
        clock = self.placement.device.clock
        return clock.take() if clock else {}

    def stats(self) -> dict:
        """Counters for tests and benchmarks: fetches, evictions, write-backs, prefetches,
        peak accounted device bytes, the device budget, which groups live on the device, which
        host-homed groups' AdamW streamed through the device in the last step (and how many
        streamed param chunks were updated where they were cached, on the device), which
        groups have optimizer state here and the bytes of that state (master when separate, moments),
        and how often a step's update running beside the next forward was ended early because
        the device had no room left for that forward."""
        return {
            **self.placement.stats,
            "peak_device_bytes": self.placement.peak_device,
            "device_budget": self.placement.device.budget,
            "allocator_peak_bytes": self.placement.device.allocator_peak(),
            "device_groups": [g.index for g in self.groups if g.optimizer_on_device],
            "streamed_groups": self.adamw.streamed_groups(),
            "params_updated_on_device": self.adamw.params_updated_on_device,
            "updates_ended_early": self.adamw.ended_early,
            "reduced_in_backward": self.adamw.ranks.reduced_in_backward,
            "shared_on_device": self.adamw.ranks.shared_on_device,
            "state_groups": [g.index for g in self.groups if g.has_state],
            "optimizer_state_bytes": sum(c.nbytes for g in self.groups for c in g.optimizer_chunks()),
        }

    # -- internals ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _work(self, key: Hashable | None):
        if self._closed:
            raise RuntimeError("engine is closed")
        if key is None or key[0] != "train":
            self.adamw.settle()  # only a training forward runs beside the last step's update
        self.tracer.begin(key)
        self.placement.begin_work()
        try:
            yield
        except BaseException as error:
            where = self._where(key)  # before the phase is reset below
            # what the failed work held beside the chunks, read before anything is let go (its
            # tensors live on in the traceback's frames)
            nonmodel = self.placement.device.nonmodel_bytes() if isinstance(error, torch.OutOfMemoryError) else 0
            self.hooks.phase = Phase.IDLE
            self.adamw.abandon()  # before abort: the step in flight lets go of what it holds
            self.placement.abort()
            self.hooks.reset()
            self.tracer.abandon()
            if isinstance(error, torch.OutOfMemoryError):
                raise BudgetError(self._oom_message(key, where, nonmodel, error)) from error
            raise
        self.hooks.phase = Phase.IDLE
        self.hooks.end_backward()
        recorded = self.tracer.end(self.placement.tail_sample())
        if recorded is not None and recorded.key[0] == "train":
            self._replan()

    def _where(self, key: Hashable | None) -> str:
        """Which part of the work runs: 'step', 'forward' or 'backward' (of a training or eval
        pass), for an error message."""
        if key is not None and key[0] == "step":
            return "step"
        return "backward" if self.hooks.phase is Phase.BACKWARD else "forward"

    def _oom_message(self, key: Hashable | None, where: str, nonmodel: int, error: BaseException) -> str:
        device = self.placement.device
        asked = _TRIED.search(str(error))  # torch's CUDA message says how much it wanted
        wanted = f", {asked.group(1)} wanted" if asked else ""
        traced = self.tracer.traces.get(key)
        before = f" ({fmt_bytes(traced.peak_nonmodel)} at the peak of the last such pass)" if traced else ""
        return (
            f"the device ran out of memory in the {where}{wanted}: {fmt_bytes(device.used)} of chunks, "
            f"{fmt_bytes(nonmodel)} of activations and workspace{before}, "
            f"{fmt_bytes(device.allocator_held())} held by the allocator, "
            f"budget {fmt_bytes(device.budget or 0)}; lower the micro-batch or raise the budget"
        )

    def _replan(self) -> None:
        """Re-decide device homes from the non-model memory every training trace measured
        (the largest: every traced shape must keep fitting); migrate groups that change."""
        peak = max(t.peak_nonmodel for key, t in self.tracer.traces.items() if key[0] == "train")
        nonmodel = int(peak * (1.0 + self.config.nonmodel_headroom))
        wanted = plan_homes(
            self._group_bytes,
            gpu_cap=self.placement.device.usable,
            slack=self.placement.device.slack,
            cpu_cap=_cap(self.host.budget),
            nonmodel=nonmodel,
            policy=self.config.optimizer_placement,
            fill=True,
            step_set=self._stream_step_set(),
        )
        for group, on_device in zip(self.groups, wanted):
            if on_device and not group.optimizer_on_device:
                for chunk in group.chunks():
                    self.placement.home_on_device(chunk)
            elif group.optimizer_on_device and not on_device:
                for chunk in group.chunks():
                    self.placement.home_on_host(chunk)
            group.optimizer_on_device = on_device
        self._update_resident()

    def _stream_step_set(self) -> int:
        """Device bytes streamed AdamW holds at once (its staging sets); 0 when nothing streams."""
        if not self.adamw.split.active:
            return 0
        biggest = max(g.grad for g in self._group_bytes) // self.config.grad_dtype.itemsize
        return staging_bytes(slice_for(biggest), self.config.grad_dtype, self.config.compute_dtype)

    def _update_resident(self) -> None:
        """Resident mode when every chunk lives on the device (the model fits): no per-module
        work at all. Needs grads in the params' dtype (autograd accumulates into `.grad`) and
        one process (the reduce over ranks stages grads itself)."""
        self.hooks.set_resident(
            all(g.optimizer_on_device for g in self.groups)
            and self.config.grad_dtype == self.config.compute_dtype
            and not self.adamw.collective.active
        )

    def _autocast(self):
        if not self.config.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.config.compute_dtype)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)


_TRIED = re.compile(r"Tried to allocate ([0-9.]+ [KMGT]?i?B)")


def _cap(budget: int | None) -> float:
    return float("inf") if budget is None else float(budget)
