"""Hooks that fetch parameters' chunks for compute and gather gradients into grad chunks.

- Forward: a module's pre-hook acquires the chunks of the parameters it owns and binds them;
  its post-hook releases and unbinds them (nested and repeated calls count uses).
- Saved tensors: while the engine runs forward, autograd's saved tensors that view a param
  chunk are packed as (chunk, geometry) instead of holding device memory; backward's unpack
  fetches the chunk again (wherever it went meanwhile) and holds it for backward.
- Activation checkpointing: recompute runs the pre-hooks again during backward; there they hold
  the chunk for backward, and the post-hooks release nothing (each parameter's hold ends as its
  gradient arrives).
- Gradients: a post-accumulate-grad hook adds each parameter's gradient into its slot of the
  grad chunk (fp32, or bf16 under bf16), drops `.grad`, and ends the parameter's backward hold. Tied parameters
  get one accumulated gradient from autograd; parameters that get none are swept by `end_backward`.
- Across ranks, in the step's last backward: once a grad chunk has received every gradient it
  will get, `grad_done` is told (the optimizer starts summing it onto its owner rank there, on
  the device, while backward goes on); the chunk stays held until the next chunk completes or
  backward ends, then `grad_done`'s finisher runs and the chunk is let go. Chunks whose
  parameters did not all get a gradient are handed over at the end of backward, in chunk order.
  Every rank thus issues the same collectives in the same order as long as the same parameters
  get gradients on every rank (true of models without data-dependent branches, such as GPT).
- Resident mode (`set_resident`), for a model whose every chunk lives on the device: parameters
  stay bound to their slots and `.grad` aliases the grad chunk's slot, which autograd accumulates
  into in place; the module and grad hooks are taken off (modules run torch's hook-free path, and
  backward calls no Python per parameter), no saved-tensor hooks are installed. Which parameters
  got a gradient is read when the work ends, from each `.grad`'s version counter (an in-place add
  bumps it): nothing moves, so no per-module or per-gradient bookkeeping is paid.
Knows nothing of the optimizer, the trainer or what the model is.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch
from torch import nn

from homestar.runtime.binding import ParamInfo, ParamTable
from homestar.runtime.chunk import Chunk, Kind
from homestar.runtime.placement import Placement
from homestar.runtime.states import Move, TensorState


class Phase(Enum):
    IDLE = "idle"
    FORWARD = "forward"
    BACKWARD = "backward"


@dataclass(frozen=True, slots=True)
class _Packed:
    """A saved tensor that viewed a param chunk, kept as geometry instead of memory."""

    chunk: Chunk
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class RuntimeHooks:
    """Installs and serves the module, saved-tensor and gradient hooks for one model."""

    def __init__(self, model: nn.Module, table: ParamTable, placement: Placement) -> None:
        self.table = table
        self.placement = placement
        self.phase = Phase.IDLE
        self._backward_held: set[int] = set()
        self._learning: dict[int, list[int]] = {}
        """Per param chunk, the slots of its parameters that take gradients."""
        for info in table:
            slots = self._learning.setdefault(info.group.param.id, [])
            if info.param.requires_grad:
                slots.append(info.index)
        self._open: dict[nn.Module, list[list[ParamInfo]]] = {}
        """Per module, a stack (nested calls) of the parameters each running call acquired."""
        self._handles = []
        """The grad hooks' handles while installed (not in resident mode)."""
        self._module_hooks = [(module, self._make_pre(owned), self._make_post(owned))
                              for module in model.modules() if (owned := self._owned(module))]
        self._module_handles = []
        """The module hooks' handles while installed (not in resident mode)."""
        self.resident = False
        """Every parameter bound and every grad aliasing its chunk (see `set_resident`)."""
        self._resident_grads: list[list] = []
        """In resident mode, [info, its `.grad`, that grad's version when last read] per learning
        parameter (`_note_resident_grads`)."""
        self._settle = list({id(c): c for info in table for c in (info.group.param, info.group.grad)}.values())
        """Chunks whose slots forward and backward leave in HOLD_AFTER_* (reset settles them)."""
        self.grad_done: Callable[[Chunk], Callable[[], None]] | None = None
        """Called with a grad chunk (held on the device) that got all its gradients in the last
        backward of a step; returns what to run before the chunk is let go."""
        self.last_backward = False
        """This backward is the step's last (set by the engine): completed grad chunks are
        handed to `grad_done`."""
        self._expected: dict[int, int] = {}
        for info in table:
            if info.param.requires_grad:
                self._expected[info.group.grad.id] = self._expected.get(info.group.grad.id, 0) + 1
        self._arrived: dict[int, int] = {}
        self._handed: set[int] = set()
        """Grad chunks handed to `grad_done` in this backward."""
        self._pending: list[tuple[Chunk, list[int], Callable[[], None]]] = []
        """Handed chunks still held, with the slots to let go and the finisher to run first."""
        self._adding: tuple[Chunk, list[int]] | None = None
        """The grad chunk backward is adding gradients into, held with the slots it added so
        far: one placement access (trace, room, prefetch) per run of gradients into one chunk,
        not one per parameter. Let go when a gradient for another chunk arrives, when all of
        its gradients did, or when backward ends."""
        self._attach_module_hooks()
        self._attach_grad_hooks()

    def set_resident(self, on: bool) -> None:
        """Enter or leave resident mode (call between works; every param and grad chunk must
        live on the device to enter). Leaving unbinds the parameters and drops the `.grad`
        aliases; grads already accumulated stay in their chunks (and count as arrived)."""
        if on == self.resident:
            return
        self.resident = on
        if not on:
            self._note_resident_grads()
            self._resident_grads.clear()
            self._attach_module_hooks()
            self._attach_grad_hooks()
            self.table.unbind_all()
            for info in self.table:
                info.param.grad = None
            return
        self._detach_module_hooks()
        self._detach_grad_hooks()
        for info in self.table:
            self.table.bind(info, info.group.param.device)
            if info.param.requires_grad:
                chunk = info.group.grad
                grad = _aliasing(chunk.view(chunk.device, info.slot, info.shape))
                info.param.grad = grad  # autograd adds into it in place
                self._resident_grads.append([info, grad, grad._version])

    def remove(self) -> None:
        self.set_resident(False)
        self._detach_module_hooks()
        self._detach_grad_hooks()

    def _attach_grad_hooks(self) -> None:
        for info in self.table:
            if info.param.requires_grad:
                self._handles.append(info.param.register_post_accumulate_grad_hook(self._grad_hook))

    def _detach_grad_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _note_resident_grads(self) -> None:
        """Resident mode: mark the parameters whose `.grad` autograd added into since the last
        read (its version moved) as having a gradient, their grad slots as filled (one state
        move per chunk). A `.grad` replaced from outside (set to None, so that autograd made a
        new one) is added into the slot and the alias put back."""
        filled: dict[int, tuple[Chunk, list[int]]] = {}
        for entry in self._resident_grads:
            info, grad, seen = entry
            current = info.param.grad
            if current is not grad:
                if current is not None:
                    grad.add_(current)  # a gradient autograd stored beside the chunk
                info.param.grad = grad
            if grad._version != seen:
                entry[2] = grad._version
                info.has_grad = True
                chunk = info.group.grad
                filled.setdefault(chunk.id, (chunk, []))[1].append(info.index)
        for chunk, indices in filled.values():
            chunk.move_many(indices, Move.FILL)  # the slots hold data

    def _attach_module_hooks(self) -> None:
        for module, pre, post in self._module_hooks:
            self._module_handles.append(module.register_forward_pre_hook(pre))
            self._module_handles.append(module.register_forward_hook(post, always_call=True))

    def _detach_module_hooks(self) -> None:
        for handle in self._module_handles:
            handle.remove()
        self._module_handles.clear()

    def saved_tensors(self):
        """Context for the forward pass: pack chunk views as geometry, re-fetch on unpack
        (nothing to do in resident mode: chunks never move)."""
        if self.resident:
            return contextlib.nullcontext()
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    # -- forward --------------------------------------------------------------------------
    def _owned(self, module: nn.Module) -> list[ParamInfo]:
        infos = [self.table.of(p) for p in module._parameters.values() if p is not None]
        return [info for info in infos if info is not None]

    def _make_pre(self, owned: list[ParamInfo]):
        by_chunk: dict[int, list[ParamInfo]] = {}
        for info in owned:
            by_chunk.setdefault(info.group.param.id, []).append(info)
        batches = [(infos[0].group.param, [info.index for info in infos], infos) for infos in by_chunk.values()]

        def pre_hook(module, args):
            taken: list = []
            self._open.setdefault(module, []).append(taken)  # what the post-hook releases
            for chunk, indices, infos in batches:  # one access per chunk, not per parameter
                if self.phase is Phase.BACKWARD:
                    self._hold_for_backward(chunk, infos)  # recompute: released as each grad arrives
                else:
                    self.placement.acquire(chunk, indices)
                    taken.append((chunk, indices, infos))
                device_tensor = chunk.device
                for info in infos:
                    self.table.bind(info, device_tensor)

        return pre_hook

    def _make_post(self, owned: list[ParamInfo]):
        def post_hook(module, args, output):
            calls = self._open.get(module)
            for chunk, indices, infos in calls.pop() if calls else ():
                self.placement.release(chunk, indices, Move.RELEASE_FWD)  # one batch per chunk
                if chunk.computing == 0:
                    self.table.unbind_many(infos)
                else:  # a nested or backward use still holds some: unbind only the others
                    self.table.unbind_many([i for i in infos if chunk.records[i.index].state is not TensorState.COMPUTE])

        return post_hook

    # -- saved tensors --------------------------------------------------------------------
    def _pack(self, tensor: torch.Tensor):
        chunk = self.placement.owner_of(tensor)
        if chunk is None or chunk.kind is not Kind.PARAM:
            return tensor
        return _Packed(chunk, tensor.size(), tensor.stride(), tensor.storage_offset())

    def _unpack(self, packed):
        if not isinstance(packed, _Packed):
            return packed
        slot = packed.chunk.slot_at(packed.offset)
        if slot is not None:
            self._hold_for_backward(packed.chunk, [self.table.infos[slot.index]])
        return packed.chunk.device.as_strided(packed.size, packed.stride, packed.offset)

    def _hold_for_backward(self, chunk: Chunk, infos: list[ParamInfo]) -> None:
        """Acquire the chunk for backward for those of its parameters not held yet in this
        backward pass, and with them every other parameter of the chunk that will get a
        gradient: one access per chunk per backward, not one per module (or saved tensor) that
        uses it, since backward reaches a chunk's parameters together (each hold still ends as
        its gradient arrives)."""
        held = self._backward_held
        fresh = {info.index for info in infos if info.index not in held}
        if fresh:
            fresh.update(index for index in self._learning[chunk.id] if index not in held)
            self.placement.acquire(chunk, sorted(fresh))
            held.update(fresh)

    def _end_hold(self, info: ParamInfo) -> None:
        if info.index in self._backward_held:
            self._backward_held.discard(info.index)
            self.table.unbind(info)
            self.placement.release(info.group.param, [info.index], Move.RELEASE_BWD)

    # -- gradients ------------------------------------------------------------------------
    def _grad_hook(self, param: torch.Tensor) -> None:
        info = self.table.of(param)
        grad, param.grad = param.grad, None
        chunk = info.group.grad
        device_tensor = self._add_into(chunk, info.index)
        chunk.view(device_tensor, info.slot, info.shape).add_(grad)  # accumulates in the chunk's dtype (fp32 casts)
        del device_tensor  # letting the chunk go below may write it back and free its device copy
        info.has_grad = True
        self._end_hold(info)
        self._arrived[chunk.id] = self._arrived.get(chunk.id, 0) + 1
        if self._arrived[chunk.id] < self._expected[chunk.id]:
            return  # more of its gradients come in this backward: kept held
        _, held = self._adding
        self._adding = None
        if self.last_backward and self.grad_done:
            self._hand_over(chunk, held)  # stays held until the next one completes
        else:
            self._let_go_grads(chunk, held)

    def _add_into(self, chunk: Chunk, index: int) -> torch.Tensor:
        """Hold `chunk`'s slot `index` for a gradient to be added; the device copy."""
        if self._adding is not None and self._adding[0] is chunk:
            chunk.move(index, Move.ACQUIRE)  # the chunk is held on the device already
            self._adding[1].append(index)
            return chunk.device
        self._stop_adding()
        device_tensor = self.placement.acquire(chunk, [index])
        self._adding = (chunk, [index])
        return device_tensor

    def _stop_adding(self) -> None:
        if self._adding is not None:
            chunk, held = self._adding
            self._adding = None
            self._let_go_grads(chunk, held)

    def _let_go_grads(self, chunk: Chunk, held: list[int]) -> None:
        self.placement.release(chunk, held, Move.RELEASE_BWD, wrote=True)
        self.placement.offload_if_done(chunk)

    def _hand_over(self, chunk: Chunk, held: list[int]) -> None:
        """Tell `grad_done` (the chunk is held); finish and let go the one handed before, so
        one collective runs while backward computes the next chunk's gradients."""
        self._handed.add(chunk.id)
        finish = self.grad_done(chunk)
        self._flush()
        self._pending.append((chunk, held, finish))

    def _flush(self) -> None:
        while self._pending:
            chunk, held, finish = self._pending.pop(0)
            self.placement.release(chunk, held, Move.RELEASE_BWD, wrote=True)
            finish()  # after the release: it may mark the device copy as not worth writing back
            self.placement.offload_if_done(chunk)

    def _hand_over_rest(self) -> None:
        """End of the last backward: chunks holding gradients that were not handed over yet
        (some of their parameters got none this time), in chunk order; then finish them all."""
        if not (self.last_backward and self.grad_done):
            return
        filled: dict[int, tuple[Chunk, list[int]]] = {}
        for info in self.table:
            chunk = info.group.grad
            if info.has_grad and chunk.id not in self._handed:
                filled.setdefault(chunk.id, (chunk, []))[1].append(info.index)
        for chunk_id in sorted(filled):
            chunk, indices = filled[chunk_id]
            self.placement.acquire(chunk, indices)
            self._hand_over(chunk, indices)
        self._flush()

    def end_backward(self) -> None:
        """End every backward hold still open (params that got no gradient) and reset states."""
        self._stop_adding()  # a chunk some of whose parameters got no gradient
        for index in sorted(self._backward_held):
            self._end_hold(self.table.infos[index])
        self._hand_over_rest()
        self.reset()

    def reset(self) -> None:
        """End of a forward (and backward): every tensor back to HOLD (or FREE), all unbound
        (resident mode: the gradients that arrived noted instead)."""
        if self.resident:
            self._note_resident_grads()
        self._backward_held.clear()
        self._open.clear()
        self._arrived.clear()
        self._handed.clear()
        self._pending.clear()  # emptied by end_backward; only a failed run leaves some (abandoned)
        self._adding = None  # likewise
        self.last_backward = False
        if not self.resident:
            self.table.unbind_all()
        for chunk in self._settle:
            chunk.settle()  # one pass per chunk, not one state move per tensor


def _aliasing(view: torch.Tensor) -> torch.Tensor:
    """A tensor on `view`'s memory with a version counter of its own: a view shares its base's,
    so an add into one parameter's grad would look like an add into every parameter's of the
    chunk (`_note_resident_grads` reads each parameter's)."""
    return torch.empty(0, dtype=view.dtype, device=view.device).set_(
        view.untyped_storage(), view.storage_offset(), view.size(), view.stride())
