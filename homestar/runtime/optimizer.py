"""Device-aware AdamW over chunk groups, with torch.optim.AdamW's exact semantics.

Each group's AdamW runs where the group's state lives: on the device for groups homed there, on
the CPU for the rest. The device's groups call torch's fused AdamW kernel (`torch._fused_adamw_`,
what `torch.optim.AdamW(fused=True)` runs) on lists of per-parameter views into the chunks; the
host's groups run the native one-pass kernel (`native`: torch's fused AdamW to the bit) where it
could be built, else torch's kernel slice by slice; so every element sees the same maths as plain
PyTorch. Also as torch: parameters that got no gradient are
skipped, each parameter has its own step count, no-decay parameters get weight_decay 0, global-
norm clipping computes the norm of per-parameter norms, fp16 overflow skips the step.
Per-parameter grad norms are taken on the device as backward writes each grad chunk back, so the
step does not read host grads for the norm; bf16 grads are widened to fp32 as AdamW reads them
(`adam_math`). The first host-homed groups' AdamW may run on the device, their state streamed
through it slice by slice (`stream_adam`), while a worker thread updates the CPU's groups; which
ones is `split`'s decision (`adam_split`), from both engines' times over the last step's update.
At world 1 `step` returns as soon as every update is under way, and the next forward runs beside
them: the CPU's groups go on updating on the worker, the streamed ones are queued by a streamer
thread on the device's lane (streams of their own, so the forward's kernels and fetches never
queue behind them). A group is let go as soon as the forward needs it and its update is written
(CPU) or queued (streamed: later users wait for its last copy's event) (`let_go_group`, called by
the placement); `settle` ends the step before backward or anything that reads or writes the state.
Across ranks (a `Collective` of world > 1, group-owner ZeRO): each group's fp32 grads are summed
onto its owner and its param chunk broadcast back after the owner's update (`rank_exchange`), the
squared norm of the owners' grads is summed over ranks, each owner updates its groups alone. At
world 1 none of that is issued.
Knows nothing of modules, hooks or the trainer.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import torch

from homestar.optim import OptimConfig, StepReport
from homestar.runtime.adam_split import AdamSplit
from homestar.runtime.adam_math import SLICE_ELEMS, Span, fused_adamw, host_adamw, param_norms
from homestar.runtime.binding import ParamInfo, ParamTable
from homestar.runtime.chunk import Chunk, ChunkGroup, Kind
from homestar.runtime.collectives import Collective
from homestar.runtime.in_flight import StepInFlight
from homestar.runtime.placement import Placement
from homestar.runtime.rank_exchange import RankExchange
from homestar.runtime.scaler import LossScaler
from homestar.runtime.states import Move
from homestar.runtime.stream_adam import StagingRing, StreamJob, stream_adamw

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
        self.ranks = RankExchange(groups, self._hold, self._let_go, self._hold_where_cached)
        """What the step exchanges with other ranks (nothing at world 1)."""
        self._infos_of: dict[int, list[ParamInfo]] = defaultdict(list)
        for info in table:
            self._infos_of[info.group.index].append(info)
        self._norms: dict[int, torch.Tensor] = {}
        """Per-parameter grad norms (0-d, on the device) taken as grad chunks were written back
        during backward, by layout index: the host copy holds exactly what was normed, so the
        step need not read host grads for the norm. Forgotten when the step ends."""
        placement.on_write_back = self._note_grad_norms
        self._host_scratch: torch.Tensor | None = None
        """fp32 buffer of one slice on the host, reused by every CPU group's widened grads on
        torch's path (`_scratch`: made when that path first runs)."""
        self.split = AdamSplit()
        """How much of the host-homed groups' AdamW streams through the device (the CPU updates
        the rest at the same time)."""
        self._threads: dict[str, ThreadPoolExecutor] = {}
        """The threads that run the CPU's groups and queue the streamed ones (`_thread`)."""
        self.params_updated_on_device = 0
        """Streamed groups' param chunks updated where they were cached, on the device (over the
        run, for tests and benchmarks)."""
        self._streamed: set[int] = set()
        """Host-homed groups whose AdamW streams through the device (this step, or the last one
        once it ended; their chunks stay on the host: `stream_adam`)."""
        self.ended_early = 0
        """Steps whose update a shortage of device room ended before the forward beside it was
        done with it (over the run, for tests and benchmarks)."""
        self._beside: StepInFlight | None = None
        """The last step whose update ran beside the forward, ended: its engines' times
        (`_follow_last`)."""
        self._inflight: StepInFlight | None = None
        """The last step's updates while they run beside the next forward (see the module doc)."""
        placement.let_go_hold = self.let_go_group
        placement.end_holds = self.end_early

    def step(self, lr: float, scaler: LossScaler | None) -> StepReport:
        self.settle()
        started = time.perf_counter()
        active = [info for info in self.table if info.has_grad]
        by_group: dict[int, list[ParamInfo]] = defaultdict(list)
        for info in active:
            by_group[info.group.index].append(info)
        comm = self.collective
        grads = self.ranks.stage_grads(by_group)
        owned = {index: infos for index, infos in by_group.items() if comm.owns(index)}
        owned_infos = [info for infos in owned.values() for info in infos]
        grad_list = [grads[info.index] for info in owned_infos if info.index in grads]
        if scaler is not None:
            for tensors in _by_device(grad_list).values():
                torch._foreach_mul_(tensors, scaler.inv_scale)
        # the norms taken at write-back hold for these grads unless the step changed them since:
        # unscaled above, or summed over ranks in stage_grads (a group summed during backward
        # was written back, and normed, as its sum)
        cached = {} if scaler is not None else self._norms
        if comm.active:
            cached = {info.index: cached[info.index] for group in self.ranks.reduced
                      for info in self._infos_of[group] if info.index in cached}
        total = self._total_norm(owned_infos, grads, cached)
        if comm.active:  # the global norm: squares of the owners' norms summed over ranks (a sync)
            total = comm.all_reduce_sum((total.float() ** 2).reshape(1)).sqrt().reshape(())
        grad_norm = float(total)  # sync: the step's one host read of a device value
        normed = time.perf_counter()
        timings = self._follow_last()  # before this step's split is chosen
        self._choose_streamed()
        skipped = scaler is not None and not math.isfinite(grad_norm)
        if scaler is not None:
            scaler.update(found_inf=skipped)
        if not skipped:
            coef = self._clip(grad_list, total) if self.config.grad_clip > 0 else None
            timings.update(self._adam_all(owned, grads, lr, coef, defer=self._may_defer()))
            if comm.active:
                shared = time.perf_counter()
                self.ranks.share_params(by_group)  # ends with a host wait for the last copy home
                timings["opt_share_params"] = time.perf_counter() - shared
            self.step_count += bool(active)  # as torch: a step without gradients changes nothing
        if self._inflight is not None:
            self._inflight.by_group = by_group  # finished when the update is (`settle`)
            self._inflight.returned = True
        else:
            self._finish(by_group)
        timings.update(optimizer=time.perf_counter() - started, opt_grads_and_norm=normed - started)
        return StepReport(grad_norm=grad_norm, skipped=skipped, timings=timings)

    # -- stages ---------------------------------------------------------------------------
    def _total_norm(self, infos: list[ParamInfo], grads: dict[int, torch.Tensor],
                    cached: dict[int, torch.Tensor]) -> torch.Tensor:
        """Norm of per-parameter norms, stacked in parameter order on the compute device,
        exactly as torch.nn.utils.clip_grad_norm_ computes it. A grad held on the host whose
        norm is in `cached` (taken on the device at write-back) is not read again."""
        if not infos:
            return torch.tensor(0.0)
        target = self.placement.device.device
        norms: list[torch.Tensor | None] = [None] * len(infos)
        tensors: dict[int, torch.Tensor] = {}
        for pos, info in enumerate(infos):
            if not info.group.optimizer_on_device and info.index in cached:
                norms[pos] = cached[info.index]
            else:
                tensors[pos] = grads[info.index]
        positions: dict[torch.device, list[int]] = defaultdict(list)
        for pos, tensor in tensors.items():
            positions[tensor.device].append(pos)
        for device, pos_list in positions.items():
            found = param_norms([tensors[p] for p in pos_list])  # a pass over these grads
            if device != target:  # cost: one small host -> device copy
                found = list(torch.stack(found).to(target).unbind())
            for pos, norm in zip(pos_list, found):
                norms[pos] = norm
        return torch.linalg.vector_norm(torch.stack(norms), 2.0)

    def _clip(self, grads: list[torch.Tensor], total: torch.Tensor) -> torch.Tensor | None:
        """Scale the fp32 grads as torch's clip_grad_norm_ does; return the coefficient (None
        when it is 1: no pass over the grads at all). bf16 grads are scaled as they are widened
        to fp32 for AdamW. (Folding the scale into the fused AdamW as its `grad_scale` divisor
        would save the pass but round differently from plain PyTorch.)"""
        coef = torch.clamp(self.config.grad_clip / (total + _NORM_EPS), max=1.0)
        if float(coef) >= 1.0:  # a read of a value `total`'s host read already waited for
            return None
        for device, tensors in _by_device([g for g in grads if g.dtype == torch.float32]).items():
            torch._foreach_mul_(tensors, coef.to(device))
        return coef

    def _choose_streamed(self) -> None:
        """The first host-homed groups this rank updates (the next forward needs them first, and
        backward drained their grads last), as many as `split` says."""
        hosted = [g for g in self.groups
                  if not g.optimizer_on_device and g.has_state and self.collective.owns(g.index)]
        count = self.split.streamed([g.grad.numel for g in hosted])
        self._streamed = {g.index for g in hosted[:count]}

    def streamed_groups(self) -> list[int]:
        """Host-homed groups whose AdamW ran on the device in the last step."""
        return sorted(self._streamed)

    def _may_defer(self) -> bool:
        """Whether this step may return before its AdamW ends: on one process (ranks share the
        params after the update)."""
        return not self.collective.active

    def _follow_last(self) -> dict[str, float]:
        """The last step's update, timed while the forward ran beside it: each engine over its
        own work (the CPU's on its worker, the streamed groups' on the device's clock, read now
        that the device is past them). An automatic split follows these times, the ones of the
        update as training runs it; they are reported as this step's `opt_cpu_adam`,
        `opt_streamed_adam` and `stream_share`."""
        flight, self._beside = self._beside, None
        if flight is None:
            return {}
        return self._engine_times(flight, flight.stopwatch.seconds() if flight.stopwatch is not None else 0.0)

    def _engine_times(self, flight: StepInFlight, streamed_s: float) -> dict[str, float]:
        """Both engines' seconds over one step's update, and the share streamed, as reported;
        an automatic split follows them."""
        times = {}
        if flight.cpu_elems:
            times["opt_cpu_adam"] = flight.cpu_seconds
        if flight.streamed_elems:
            times["opt_streamed_adam"] = streamed_s
        if flight.cpu_elems and flight.streamed_elems:
            times["stream_share"] = flight.streamed_elems / (flight.streamed_elems + flight.cpu_elems)
            self.split.follow(flight.cpu_elems, flight.cpu_seconds, flight.streamed_elems, streamed_s)
        return times

    def _adam_all(self, owned: dict[int, list[ParamInfo]], grads: dict[int, torch.Tensor], lr: float,
                  coef: torch.Tensor | None, *, defer: bool) -> dict[str, float]:
        """AdamW for every owned group: the CPU's groups on a worker thread (torch's kernels
        release the GIL) while this thread drives the device's (homed there, or streamed), so
        both engines run at once. Every placement call stays on this thread: the groups' chunks
        are held before the threads start and let go after they are past them. `defer`: return
        once everything is under way (the module doc); else when everything is done."""
        dev = [(self.groups[i], infos) for i, infos in owned.items() if self.groups[i].optimizer_on_device]
        streamed = [(self.groups[i], infos) for i, infos in owned.items() if i in self._streamed]
        cpu = [(self.groups[i], infos) for i, infos in owned.items()
               if not self.groups[i].optimizer_on_device and i not in self._streamed]
        held = [(group, infos, self._hold_state(group, infos)) for group, infos in cpu]
        host_coef = None if coef is None or not held else coef.cpu()  # one small copy, not one per group
        times: dict[str, float] = {}
        flight = StepInFlight()
        flight.cpu_elems, flight.streamed_elems = (sum(g.grad.numel for g, _ in part) for part in (cpu, streamed))
        for group, infos, _ in held:
            flight.hold(group, infos)

        def cpu_work() -> None:
            begin = time.perf_counter()
            try:
                for group, infos, state in held:
                    self._update(group, infos, grads, lr, host_coef, state)
                    flight.mark(group.index)
            finally:
                flight.release_waiters([group.index for group, _, _ in held])
            flight.cpu_seconds = time.perf_counter() - begin

        if held and (dev or streamed or defer):
            flight.futures.append(self._thread("cpu").submit(cpu_work))
            self._inflight = flight  # from here a failure settles the worker before anything is let go
        else:
            cpu_work()
        begin = time.perf_counter()
        device = self.placement.device
        # the device-homed groups first: their scratch may need room that the streamed groups'
        # cached param chunks, held for their update below, would no longer give up
        self._update_on_device(dev, grads, lr, coef)
        if streamed:
            first = streamed[0][0]  # the ring before the jobs hold cached param chunks, for the same reason
            ring = StagingRing(self.placement.scratch, self.placement.free_scratch,
                               max(group.master.numel for group, _ in streamed), first.grad.dtype,
                               None if first.param is first.master else first.param.dtype)
            wide_coef = None if coef is None or first.grad.dtype == torch.float32 else coef  # fp32: clipped
            if defer:
                self._stream_beside(flight, streamed, ring, wide_coef, lr)
                return times
            try:
                jobs = [self._stream_job(group, infos) for group, infos in streamed]
                done = stream_adamw(jobs, ring, device, coef=wide_coef, lr=lr, config=self.config)
            finally:
                ring.close()
            device.host_wait(done[-1])  # sync: the streamed groups' host buffers hold their update
            times["opt_streamed_adam"] = time.perf_counter() - begin
            for group, infos in streamed:
                self._let_go_state(group, infos)
        if defer and flight.futures:
            return times
        self._inflight = None
        flight.wait_threads()  # re-raises what the worker raised
        for group, infos, _ in held:
            self._let_go_state(group, infos)
        times.update(self._engine_times(flight, times.get("opt_streamed_adam", 0.0)))
        return times

    def _stream_beside(self, flight: StepInFlight, streamed: list[tuple[ChunkGroup, list[ParamInfo]]],
                       ring: StagingRing, coef: torch.Tensor | None, lr: float) -> None:
        """The streamed groups' AdamW queued by the streamer thread on the device's lane, so
        that neither this thread nor the next forward's kernels and fetches queue behind it
        (queuing a large model's slices fills the driver's queue: the queuing thread blocks).
        Their chunks are held here first; each group is let go with the event of its last copy."""
        flight.ring, flight.coef, flight.lane = ring, coef, self.placement.device.lane()
        self._inflight = flight  # a failure below settles: what is held by then is let go
        jobs = []
        for group, infos in streamed:
            jobs.append(self._stream_job(group, infos))
            flight.hold(group, infos)
        indices = [group.index for group, _ in streamed]

        def stream_work() -> None:
            try:
                with flight.lane.running():
                    watch = flight.lane.stopwatch()  # the split follows the lane's time (`_follow_last`)
                    stream_adamw(jobs, ring, flight.lane, coef=coef, lr=lr, config=self.config,
                                 queued=lambda i, event: flight.mark(indices[i], event))
                    watch.stop()
                    flight.stopwatch = watch
            finally:
                flight.release_waiters(indices)

        flight.futures.append(self._thread("stream").submit(stream_work))

    def _thread(self, name: str) -> ThreadPoolExecutor:
        """The worker thread for the CPU's AdamW ("cpu") or the streamer ("stream"); made once."""
        pool = self._threads.get(name)
        if pool is None:
            if name == "cpu":
                pool = ThreadPoolExecutor(1, thread_name_prefix="homestar-cpu-adam", initializer=torch.set_num_threads,
                                          initargs=(worker_threads(torch.get_num_threads()),))
            else:
                pool = ThreadPoolExecutor(1, thread_name_prefix="homestar-stream-adam")
            self._threads[name] = pool
        return pool

    def let_go_group(self, chunk: Chunk, wait: bool = True) -> bool:
        """Compute is about to use `chunk`, which the last step's update may still hold: once
        that update is past the chunk's group (waited for, unless `wait` is False), let go of
        the group's state. True when the step no longer holds the chunk (the placement calls
        this before acquiring or prefetching a chunk in use)."""
        flight = self._inflight
        if flight is None or chunk.group not in flight.holding:
            return True
        if not flight.wait_for(chunk.group, block=wait):
            return False
        if chunk.group not in flight.updated:
            self.settle()  # the update failed: re-raises its error
        group, infos = flight.holding.pop(chunk.group)
        self._let_go_state(group, infos, after=flight.updated[chunk.group])
        return True

    def end_early(self) -> bool:
        """The device has no room left while the last step's update still holds chunks there
        (cached params updated in place, the staging ring): end it now. True when it did."""
        if self._inflight is None or not self._inflight.returned:
            return False  # inside the step: its holds end with it
        self.ended_early += 1
        self.settle()
        return True

    def settle(self) -> None:
        """End the last step if its update still runs: wait for both threads, let go of
        everything the step held, order the device's compute behind the lane, forget the step's
        grads; re-raises what a thread raised. Nothing to do when no step is in flight."""
        flight, self._inflight = self._inflight, None
        if flight is None:
            return
        try:
            flight.wait_threads()
            self._beside = flight  # its engines' times, read once the device is past them
        finally:
            for index, (group, infos) in flight.holding.items():
                self._let_go_state(group, infos, after=flight.updated.get(index))
            if flight.lane is not None:
                self.placement.device.join(flight.lane)
            if flight.ring is not None:
                flight.ring.close()  # on the compute stream, now behind the lane
            self._finish(flight.by_group)

    def _stream_job(self, group: ChunkGroup, infos: list[ParamInfo]) -> StreamJob:
        """A streamed group's host buffers (its grads were staged there), held (a device copy is
        written back first if newer, then dropped: the update rewrites them all), its step
        counts moved to the device and advanced. A separate param chunk cached on the device is
        held there instead and updated in place: its new values stay on the device for the next
        forward (newer than the host copy, which is written back if the chunk is ever evicted),
        sparing a copy down now and one up then."""
        master, exp_avg, exp_avg_sq = (self._hold(c, infos) for c in (group.master, group.exp_avg, group.exp_avg_sq))
        param, cached = None, False
        if group.param is not group.master:
            param = self._hold_where_cached(group.param, infos)
            cached = param is group.param.device  # held on the device: updated there
            self.params_updated_on_device += cached
        steps = [self._step_tensor(info, self.placement.device.device) for info in infos]
        torch._foreach_add_(steps, 1)
        spans = [Span(offset=i.slot.offset, numel=i.slot.numel, step=self.steps[i.index], decay=i.decay)
                 for i in infos]
        return StreamJob(spans=spans, grad=group.grad.host, master=master, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                         param=param, param_on_device=cached)

    def _update_on_device(self, dev: list[tuple[ChunkGroup, list[ParamInfo]]], grads: dict[int, torch.Tensor],
                          lr: float, coef: torch.Tensor | None) -> None:
        """The device-homed groups, one after the other: hold, update, let go. bf16 grads widen
        into one fp32 buffer sized for the largest chunk, budgeted like a chunk (the device may
        be full) and reused by every group. Its own function so no tensor of it outlives the call."""
        if not dev:
            return
        wide = None
        if dev[0][0].grad.dtype != torch.float32:
            wide = self.placement.scratch(max(group.grad.numel for group, _ in dev), torch.float32)
        for group, infos in dev:
            state = self._hold_state(group, infos)
            self._update(group, infos, grads, lr, coef, state, None if wide is None else wide[:group.grad.numel])
            self._let_go_state(group, infos)
        if wide is not None:
            self.placement.free_scratch(wide)

    def _hold_state(self, group: ChunkGroup, infos: list[ParamInfo]) -> tuple[torch.Tensor, ...]:
        """Master, both moments and (when separate) the param chunk, where they live; the step
        counts moved there too."""
        state = tuple(self._hold(c, infos) for c in (group.master, group.exp_avg, group.exp_avg_sq))
        if group.param is not group.master:
            state += (self._hold(group.param, infos),)
        for info in infos:
            self._step_tensor(info, state[0].device)
        return state

    def _let_go_state(self, group: ChunkGroup, infos: list[ParamInfo], after=None) -> None:
        """Let go of the group's state chunks; `after`: the event of queued copies that still
        read or write their host buffers (later users wait for it)."""
        for chunk in {id(c): c for c in (group.param, group.master, group.exp_avg, group.exp_avg_sq)}.values():
            if after is not None:
                self.placement.release_after(chunk, [info.index for info in infos], after)
            else:
                self._let_go(chunk, infos)

    def _update(self, group: ChunkGroup, infos: list[ParamInfo], grads: dict[int, torch.Tensor], lr: float,
                coef: torch.Tensor | None, state: tuple[torch.Tensor, ...], wide: torch.Tensor | None = None) -> None:
        """The AdamW maths of one group on tensors already held (no placement calls: this may
        run on the worker thread). `wide`: the device side's fp32 buffer for bf16 grads."""
        master, exp_avg, exp_avg_sq = state[:3]
        param = state[3] if group.param is not group.master else None
        torch._foreach_add_([self.steps[info.index] for info in infos], 1)
        if group.grad.dtype != torch.float32 and wide is None:  # bf16 grads on the host
            spans = [Span(offset=i.slot.offset, numel=i.slot.numel, step=self.steps[i.index], decay=i.decay)
                     for i in infos]
            # the native kernel's threads: as many as torch's here (the worker's are worker_threads')
            host_adamw(spans, group.grad.host, master, exp_avg, exp_avg_sq, param, self._scratch,
                       coef=coef, lr=lr, config=self.config, threads=torch.get_num_threads())
            return
        if wide is not None:  # bf16 grads on the device: the whole chunk widened at once
            wide.copy_(group.grad.device)  # held there: a device-side group
            if coef is not None:
                wide.mul_(coef.to(wide.device))
            grads = {info.index: group.grad.view(wide, info.slot, info.shape) for info in infos}
        for decay in (True, False):
            chosen = [info for info in infos if info.decay is decay]
            if chosen:
                fused_adamw([group.master.view(master, i.slot, i.shape) for i in chosen],
                            [grads[i.index] for i in chosen],
                            [group.exp_avg.view(exp_avg, i.slot, i.shape) for i in chosen],
                            [group.exp_avg_sq.view(exp_avg_sq, i.slot, i.shape) for i in chosen],
                            [self.steps[i.index] for i in chosen], lr=lr, config=self.config, decay=decay)
        if param is not None:
            param.copy_(master)  # fp32 master -> compute dtype, whole chunk

    def _note_grad_norms(self, chunk: Chunk, tensor: torch.Tensor) -> None:
        """A grad chunk's device copy is about to be written back: take the norm of each
        parameter's grad in it there (device kernels queued on the compute stream, no sync)."""
        if chunk.kind is not Kind.GRAD:
            return
        infos = [info for info in self._infos_of[chunk.group] if info.has_grad]
        if infos:
            found = param_norms([chunk.view(tensor, info.slot, info.shape) for info in infos])
            self._norms.update(zip((info.index for info in infos), found))

    @property
    def collective(self) -> Collective:
        """Which ranks share the work; groups not owned here get no update here."""
        return self.ranks.collective

    @collective.setter
    def collective(self, collective: Collective) -> None:
        self.ranks.collective = collective

    def close(self) -> None:
        """End a step still in flight (its errors are dropped: the engine is going away) and
        stop the threads that were started."""
        self.abandon()
        for pool in self._threads.values():
            pool.shutdown()
        self._threads.clear()

    def discard_grads(self) -> None:
        """Forget every accumulated gradient (a failed step's) without updating anything."""
        self.settle()
        self._finish({})

    def abandon(self) -> None:
        """After a failure mid-work: end a step still in flight, dropping its errors (the
        failure that got here is the one to report)."""
        with contextlib.suppress(Exception):
            self.settle()

    def _finish(self, by_group: dict[int, list[ParamInfo]]) -> None:
        """Release the staged grads, discard every gradient, forget who had one."""
        self.ranks.let_go_grads(by_group)
        self._norms.clear()
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

    def _hold_where_cached(self, chunk: Chunk, infos: list[ParamInfo]) -> torch.Tensor:
        """`_hold`, except that a host-homed chunk cached on the device is held there: its device
        copy is read or rewritten in place (let go as written: newer than its host copy)."""
        if chunk.home == "host" and chunk.resident and not chunk.in_use():
            return self.placement.hold_resident(chunk, [info.index for info in infos])
        return self._hold(chunk, infos)

    def _let_go(self, chunk: Chunk, infos: list[ParamInfo]) -> None:
        self.placement.release(chunk, [info.index for info in infos], Move.RELEASE, wrote=True)

    def _scratch(self) -> torch.Tensor:
        if self._host_scratch is None:
            self._host_scratch = torch.empty(SLICE_ELEMS, dtype=torch.float32)  # once per run
        return self._host_scratch

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


def worker_threads(cores: int) -> int:
    """Threads for the CPU's AdamW while this thread drives the device beside it: one core in
    eight (at most two) is left to this thread's copy and kernel launches and the driver's own
    threads. Otherwise the update's parallel loops, which end with their slowest thread, wait
    on a thread that shares its core. H200 machine, 16 cores (BENCHMARKS.md): AdamW of 1.3b
    0.247 s with 16 threads, 0.234 with 14, 0.237 with 12; 2.7b 0.583 with 16, 0.559 with 13.
    The CPU's AdamW is bound by host memory, so the threads left out cost it nothing measurable
    even alone (14 threads 3.22 G params/s, 16 threads 2.95: `bench/host_contention.py`)."""
    return max(1, cores - min(2, cores // 8))


def _by_device(tensors: list[torch.Tensor]) -> dict[torch.device, list[torch.Tensor]]:
    out: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for tensor in tensors:
        out[tensor.device].append(tensor)
    return out
