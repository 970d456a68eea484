"""Placement: keeps chunks where compute and the optimizer need them, within the budgets.

The device is a cache over host-homed chunks plus the chunks homed on the device. `acquire`
brings a chunk to the device (evicting held chunks, Belady on the trace), marks its tensors
COMPUTE and prefetches what the trace says comes next; `release` ends the use. Host access
(`host_tensor`) writes back a newer device copy first. Every state change goes through
`states.transition` (or its batch form, one call per chunk). While a trace is being recorded
the coming non-model peaks are unknown, so the device keeps only the working set (released
chunks of the kind being acquired are evicted) and reserves the configured estimate; each
moment samples the non-model peak since the previous one. The same code runs on the simulated device and on CUDA; only the
`DeviceSpace` differs. Knows nothing of modules, autograd or the optimizer's maths.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from homestar.errors import BudgetError
from homestar.runtime.chunk import Chunk
from homestar.runtime.eviction import choose_victims
from homestar.runtime.memory import DeviceSpace, HostMemory, fmt_bytes
from homestar.runtime.states import Move, StateError, TensorState
from homestar.runtime.trace import Tracer


class Placement:
    """Moves chunks between the host and the device; owns the budgets' enforcement."""

    def __init__(
        self, chunks: list[Chunk], device: DeviceSpace, host: HostMemory, tracer: Tracer, *,
        prefetch_depth: int, headroom: float = 0.0, estimate: int = 0,
    ) -> None:
        self.chunks = chunks
        self.device = device
        self.host = host
        self.tracer = tracer
        self.prefetch_depth = prefetch_depth
        self.headroom = headroom
        self.estimate = estimate
        """Non-model bytes to expect before a trace measured them (the config's estimate)."""
        self._by_ptr: dict[int, Chunk] = {}
        self._cached: dict[int, Chunk] = {}
        """Host-homed chunks with a device copy: the only eviction candidates."""
        self.stats = {"fetches": 0, "evictions": 0, "writebacks": 0, "prefetches": 0}
        self.peak_device = 0
        """Highest accounted device bytes seen: resident chunks plus measured non-model memory."""
        self._recent_peak = 0
        """The same since the last `take_recent_peak`."""
        self.on_write_back: Callable[[Chunk, torch.Tensor], None] | None = None
        """Called with a chunk and its device copy right before that copy is written back (the
        optimizer takes grad norms there, on the device, as backward drains grads)."""
        self.end_holds: Callable[[], bool] | None = None
        """Called when room is short and nothing can be evicted: an optimizer step still holding
        chunks beside the next forward ends and lets them go. True when it did."""
        self.let_go_hold: Callable[[Chunk, bool], bool] | None = None
        """Called with a chunk in use before compute acquires it (wait True) or a prefetch
        fetches it (wait False): an optimizer step still updating it beside the next forward
        lets it go, once done with it (waited for when asked). True when it is not held there."""

    # -- compute access -------------------------------------------------------------------
    def acquire(self, chunk: Chunk, indices: Iterable[int]) -> torch.Tensor:
        """Bring `chunk` to the device, mark the given slots COMPUTE, prefetch; device tensor."""
        if chunk.computing and self.let_go_hold is not None:
            self.let_go_hold(chunk, True)  # a step's update still holding it lets go first (may wait)
        sampling = self.tracer.sampling
        # the peak since the previous moment (CUDA: one allocator query); replays past the
        # sampled ones take the trace's figure instead of paying for the query
        sample = self.device.nonmodel_peak() if sampling else None
        self.tracer.access(chunk.id, sample)
        nonmodel = self.tracer.expected() if sample is None else sample
        chunk.last_access = self.tracer.clock
        resident, empty = chunk.resident, chunk.is_empty()
        chunk.move_many(indices, Move.ACQUIRE)  # first: in use, it cannot be chosen as a victim
        if self.tracer.recording:
            self._evict_kind(chunk)  # warm-up: the coming peaks are unknown, keep the cache lean
        # also when resident: activations may have grown into the chunks' share of the budget
        self._make_room(0 if resident else chunk.nbytes, nonmodel)
        if not resident:
            self._fetch(chunk, make_room=False, empty=empty)
        self._await_ready(chunk)
        self._peak(self.device.used + nonmodel)
        self.prefetch(nonmodel)
        if sampling:
            self.device.open_window()  # after this moment's own allocations
        return chunk.device

    def hold_resident(self, chunk: Chunk, indices: Iterable[int]) -> torch.Tensor:
        """Mark the given slots of a chunk that has a device copy COMPUTE, so it stays there,
        and return that copy: for the optimizer, which reads or rewrites a cached copy in place.
        Not an access of the trace: whether a chunk is still cached when the step comes must not
        change the step's trace (a trace that changes is recorded again, and recording evicts)."""
        if not chunk.resident:
            raise RuntimeError(f"{chunk!r} has no device copy")
        chunk.move_many(indices, Move.ACQUIRE)
        self._await_ready(chunk)
        return chunk.device

    def _await_ready(self, chunk: Chunk) -> None:
        """Compute uses the chunk's device copy after its pending upload (if any) lands."""
        if chunk.ready is not None:
            self.device.compute_wait(chunk.ready, chunk.device)  # stream wait, no host sync
            chunk.ready = None

    def release(self, chunk: Chunk, indices: Iterable[int], move: Move, *, wrote: bool = False) -> None:
        """End a use of the given slots; `wrote` marks the device copy newer than the host's."""
        chunk.move_many(indices, move)
        if wrote and chunk.home == "host" and chunk.resident:
            chunk.device_dirty = True

    def release_after(self, chunk: Chunk, indices: Iterable[int], event) -> None:
        """End a hold whose memory queued work still reads or writes until `event`. A host
        buffer's next user waits for it (a fetch's stream wait, the host's wait in
        `host_tensor`); a device copy (rewritten in place, so newer than the host's) is used by
        compute, written back or freed only after it (`_await_ready`)."""
        if chunk.resident:
            chunk.ready = event
            self.release(chunk, indices, Move.RELEASE, wrote=True)
        else:
            chunk.event = event
            self.release(chunk, indices, Move.RELEASE)

    def begin_work(self) -> None:
        """A run of work starts: its first moment measures from here."""
        if self.tracer.sampling:
            self.device.open_window()

    def tail_sample(self) -> int | None:
        """Non-model peak since the last moment (None when the run is not sampling)."""
        return self.device.nonmodel_peak() if self.tracer.sampling else None

    def move(self, chunk: Chunk, index: int, move: Move) -> None:
        """A state move of one slot outside acquire/release (reset, fill, clear)."""
        chunk.move(index, move)

    def offload_if_done(self, chunk: Chunk) -> None:
        """Write a held chunk back now if the trace says this run will not use it again."""
        if chunk.resident and chunk.home == "host" and not chunk.in_use() and self.tracer.replaying:
            if self.tracer.distance(chunk.id) == float("inf"):
                self._evict(chunk)

    def owner_of(self, tensor: torch.Tensor) -> Chunk | None:
        """The chunk whose device copy `tensor` views, if any."""
        return self._by_ptr.get(tensor.untyped_storage().data_ptr())

    # -- host access ----------------------------------------------------------------------
    def host_tensor(self, chunk: Chunk, *, drop_device: bool) -> torch.Tensor:
        """The chunk's host buffer holding its latest data, safe for the host to read or write.

        Writes back a newer device copy (and drops the device copy when `drop_device`); then
        waits for the chunk's transfers (a host sync on one event).
        """
        if chunk.home != "host":
            raise RuntimeError(f"{chunk!r} has no host buffer")
        if chunk.resident and (drop_device or chunk.device_dirty):
            if chunk.in_use():
                raise RuntimeError(f"{chunk!r} is in use on the device")
            if drop_device:
                self._evict(chunk)
            else:
                self._before_write_back(chunk)
                chunk.event = self.device.write_back(chunk.device, chunk.host, chunk.event)
                chunk.device_dirty = False
                self.stats["writebacks"] += 1
        self.device.host_wait(chunk.event)  # sync: the host touches this buffer next
        chunk.event = None
        return chunk.host

    def acquire_on_host(self, chunk: Chunk, indices: Iterable[int]) -> torch.Tensor:
        """Make the host buffer authoritative (device copy dropped) and mark slots COMPUTE."""
        host = self.host_tensor(chunk, drop_device=True)
        chunk.move_many(indices, Move.ACQUIRE)
        return host

    def writable(self, chunk: Chunk) -> torch.Tensor:
        """The chunk's home copy, safe to overwrite from the host (a host-homed chunk's device
        copy is dropped: it would be stale)."""
        if chunk.home == "host":
            return self.host_tensor(chunk, drop_device=True)
        return chunk.device

    def allocate_home(self, chunk: Chunk) -> None:
        """Give a new chunk zeroed memory in its home space."""
        if chunk.home == "host":
            chunk.host = self.host.alloc(chunk.numel, chunk.dtype, zero=True)
            return
        self._make_room(chunk.nbytes)
        chunk.device = self.device.alloc(chunk.numel, chunk.dtype, zero=True)
        self._by_ptr[chunk.device.untyped_storage().data_ptr()] = chunk
        self._note_peak()

    def abort(self) -> None:
        """After a failure mid-run: end every use still open so the chunks can move again."""
        for chunk in self.chunks:
            for index, record in chunk.records.items():
                while record.state is TensorState.COMPUTE:
                    chunk.move(index, Move.RELEASE)

    def drop_device_copy(self, chunk: Chunk) -> None:
        """Forget a host-homed chunk's device copy without writing it back (the host is newer)."""
        if chunk.resident and chunk.home == "host":
            if chunk.in_use():
                raise RuntimeError(f"{chunk!r} is in use on the device")
            self._discard(chunk)

    def read(self, chunk: Chunk) -> torch.Tensor:
        """A CPU tensor with the chunk's latest data (a view of the host buffer, or a copy)."""
        if chunk.home == "host":
            return self.host_tensor(chunk, drop_device=False)
        self.device.synchronize()  # sync: state export only
        return chunk.device.to("cpu", copy=True)

    # -- homes ----------------------------------------------------------------------------
    def home_on_device(self, chunk: Chunk) -> None:
        """Make the device copy the only copy; the host buffer returns to the pool."""
        if chunk.home == "device":
            return
        if not chunk.resident:
            self._fetch(chunk)
        self.device.host_wait(chunk.event)  # sync: the host buffer is about to be reused
        self.host.release(chunk.host)
        self._cached.pop(chunk.id, None)
        chunk.forget_views()
        chunk.host, chunk.event, chunk.home, chunk.device_dirty = None, None, "device", False
        self._note_peak()

    def home_on_host(self, chunk: Chunk) -> None:
        """Give a device-homed chunk a host buffer; its device copy stays as a clean cache."""
        if chunk.home == "host":
            return
        chunk.host = self.host.alloc(chunk.numel, chunk.dtype)
        chunk.event = self.device.write_back(chunk.device, chunk.host, None)
        chunk.home, chunk.device_dirty = "host", False
        self._cached[chunk.id] = chunk

    def clear(self, chunk: Chunk) -> None:
        """Discard the chunk's data (grads after a step): all slots FREE, zero on next use."""
        if chunk.in_use():
            raise StateError(f"illegal move clear for {chunk!r}: it is in use")
        chunk.move_many(list(chunk.records), Move.CLEAR)
        if chunk.home == "device":
            chunk.device.zero_()  # device-homed chunks always hold valid data
        else:
            self.drop_device_copy(chunk)

    # -- prefetch, fetch, evict -----------------------------------------------------------
    def prefetch(self, nonmodel: int) -> None:
        """Fetch the next chunks of the replayed trace if room exists (Belady-consistent);
        `nonmodel`: the non-model bytes of the moment just taken."""
        for chunk_id in self.tracer.upcoming(self.prefetch_depth):
            chunk = self.chunks[chunk_id]
            if chunk.resident or chunk.is_empty():
                continue
            if chunk.computing and not (self.let_go_hold and self.let_go_hold(chunk, False)):
                continue  # held on the host by an update not yet done with it
            wanted = self.tracer.distance(chunk_id)
            room = self._room(nonmodel)
            victims = choose_victims(self._candidates(), chunk.nbytes, room, self._distance, farther_than=wanted)
            if victims is None:
                return
            for victim in victims:
                self._evict(victim)
            self._fetch(chunk, make_room=False)
            self.stats["prefetches"] += 1
            self._peak(self.device.used + nonmodel)

    def _fetch(self, chunk: Chunk, *, make_room: bool = True, empty: bool | None = None) -> None:
        if make_room:
            self._make_room(chunk.nbytes)
        empty = chunk.is_empty() if empty is None else empty
        src = None if empty else chunk.host  # an empty chunk needs zeros, not a copy
        chunk.device, chunk.ready = self.device.fetch(src, chunk.numel, chunk.dtype, chunk.event)
        if src is not None:
            chunk.event = chunk.ready  # the upload reads the host buffer until then
        chunk.device_dirty = False
        self._by_ptr[chunk.device.untyped_storage().data_ptr()] = chunk
        if chunk.home == "host":
            self._cached[chunk.id] = chunk
        self.stats["fetches"] += 1  # callers note the peak: they know the non-model figure

    def _make_room(self, need: int, nonmodel: int | None = None) -> None:
        room = self._room(nonmodel)
        if room >= need:
            return
        victims = choose_victims(self._candidates(), need, room, self._distance)
        if victims is None and self.end_holds is not None and self.end_holds():
            room = self._room(nonmodel)  # the step let go of its holds (and its staging ring)
            if room >= need:
                return
            victims = choose_victims(self._candidates(), need, room, self._distance)
        if victims is None:
            in_use = sum(c.nbytes for c in self.chunks if c.resident and (c.in_use() or c.home == "device"))
            raise BudgetError(
                f"device budget of {fmt_bytes(self.device.budget or 0)} too small: {fmt_bytes(in_use)} of chunks "
                f"in use or living there, {fmt_bytes(self._reserve(nonmodel))} for activations and workspace, "
                f"{fmt_bytes(need)} more needed; lower the micro-batch or raise the budget"
            )
        for victim in victims:
            self._evict(victim)

    def _evict_kind(self, keep: Chunk) -> None:
        """Evict every held host-homed chunk of `keep`'s kind but `keep`: while a trace is
        recorded the device holds only the working set (param chunks in use, one grad chunk)."""
        for chunk in self._candidates():
            if chunk.kind is keep.kind and chunk is not keep:
                self._evict(chunk)

    def _evict(self, chunk: Chunk) -> None:
        self._await_ready(chunk)  # work still writing the device copy (an update in place) ends first
        if chunk.device_dirty and not chunk.is_empty():
            self._before_write_back(chunk)
            chunk.event = self.device.write_back(chunk.device, chunk.host, chunk.event)  # async D2H
            self.stats["writebacks"] += 1
        self._discard(chunk)
        self.stats["evictions"] += 1

    def scratch(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A transient device buffer charged to the budget like a chunk (held chunks are evicted
        to make room); give it back with `free_scratch`."""
        nbytes = numel * dtype.itemsize
        self._make_room(nbytes)
        out = self.device.alloc(numel, dtype)
        self._note_peak()
        return out

    def free_scratch(self, tensor: torch.Tensor) -> None:
        self.device.free(tensor)

    def _before_write_back(self, chunk: Chunk) -> None:
        if self.on_write_back is not None:
            self.on_write_back(chunk, chunk.device)

    def _discard(self, chunk: Chunk) -> None:
        del self._by_ptr[chunk.device.untyped_storage().data_ptr()]
        self._cached.pop(chunk.id, None)
        chunk.forget_views()
        self.device.free(chunk.device)
        chunk.device, chunk.ready, chunk.device_dirty = None, None, False

    def _candidates(self) -> list[Chunk]:
        return [c for c in self._cached.values() if not c.computing]

    def _distance(self, chunk: Chunk) -> float:
        return self.tracer.distance(chunk.id)

    def _reserve(self, nonmodel: int | None = None) -> int:
        """Device bytes to leave for non-model memory now: the trace's forecast for the coming
        moments; untraced, the highest of what is in use now, the run's peak so far and (while
        a trace is recorded) the configured estimate; plus the configured headroom."""
        measured = self.tracer.reserve()
        if measured is None:
            now = self.device.nonmodel_bytes() if nonmodel is None else nonmodel
            measured = max(now, self.tracer.run_peak, self.estimate if self.tracer.recording else 0)
        return int(measured * (1.0 + self.headroom))

    def _room(self, nonmodel: int | None = None) -> float:
        return self.device.room(self._reserve(nonmodel))

    def _note_peak(self) -> None:
        self._peak(self.device.used + self.device.nonmodel_bytes())

    def _peak(self, nbytes: int) -> None:
        self.peak_device = max(self.peak_device, nbytes)
        self._recent_peak = max(self._recent_peak, nbytes)

    def take_recent_peak(self) -> int:
        """Highest accounted device bytes since the previous call (then starts a new window)."""
        peak, self._recent_peak = self._recent_peak, 0
        return peak

    def close(self) -> None:
        """Forget every chunk's memory (after a device sync); the spaces' books go to zero."""
        self.device.synchronize()  # sync: queued copies must finish before memory goes away
        for chunk in self.chunks:
            chunk.host = chunk.device = chunk.event = chunk.ready = None
            chunk.forget_views()
        self._by_ptr.clear()
        self._cached.clear()
        self.device.close()
        self.host.close()
