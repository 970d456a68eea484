"""Converting chunk contents to and from the canonical checkpoint form.

Canonical state is what every engine saves and loads: {"weights": {name: fp32 CPU tensor},
"optimizer": {"step": int, "exp_avg": {name: ...}, "exp_avg_sq": {name: ...}, extras}} (any
mappings: a loaded checkpoint's read each tensor from its file when asked, once), names as
`model.named_parameters()` lists them (tied parameters once). Moments appear for parameters
that have optimizer state (torch's rule: a parameter that never had a gradient has none).
Extras: "param_steps" when parameters' step counts differ, the fp16 loss scale, the CPU/GPU split
of AdamW when it follows measured rates. Across ranks
(group-owner ZeRO) a rank loads every parameter's weights but moments and step counts only for the
groups it owns: the others have no chunks for them here.
Knows nothing of files, models or the trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from homestar.errors import CheckpointError
from homestar.runtime.binding import ParamInfo, ParamTable
from homestar.runtime.chunk import Chunk
from homestar.runtime.optimizer import ChunkAdamW
from homestar.runtime.placement import Placement
from homestar.runtime.scaler import LossScaler
from homestar.runtime.states import Move


def export_state(table: ParamTable, adamw: ChunkAdamW, placement: Placement, scaler: LossScaler | None,
                 keep: Callable[[ParamInfo], bool] | None = None, *, device_views: bool = False) -> dict:
    """Canonical state of the parameters `keep` selects (all by default: one rank's shard
    otherwise); "step" and extras are the whole optimizer's.

    Like `nn.Module.state_dict`, the tensors share memory with the engine: views into the host
    chunk buffers (a chunk homed on the device is copied to the host once), valid as of this
    call until the next step or load; clone what must outlive that. A checkpoint of a model that
    fills the host therefore stages no second copy of it. With `device_views`, chunks homed on the
    device are not copied either: their tensors are views of device memory, which a writer copies
    one at a time (`train.checkpoint.tensor_file`)."""
    cache: dict[int, torch.Tensor] = {}
    if device_views:
        placement.device.synchronize()  # sync: state export only; the views are read after it

    def read(chunk: Chunk, info) -> torch.Tensor:
        if chunk.id not in cache:
            on_device = device_views and chunk.home == "device"
            cache[chunk.id] = chunk.device if on_device else placement.read(chunk)  # may write back or sync
        return chunk.view(cache[chunk.id], info.slot, info.shape)  # fp32 chunks: a view, no copy

    weights, exp_avg, exp_avg_sq, steps = {}, {}, {}, {}
    for info in table:
        if keep is not None and not keep(info):
            continue
        weights[info.name] = read(info.group.master, info)
        step = adamw.param_step(info)
        if step > 0 and info.group.has_state:
            steps[info.name] = step
            exp_avg[info.name] = read(info.group.exp_avg, info)
            exp_avg_sq[info.name] = read(info.group.exp_avg_sq, info)
    optimizer: dict = {"step": adamw.step_count, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if len(set(steps.values())) > 1 or any(s != adamw.step_count for s in steps.values()):
        optimizer["param_steps"] = steps
    if scaler is not None:
        optimizer.update(scaler.state_dict())
    optimizer.update(adamw.split.state_dict())
    return {"weights": weights, "optimizer": optimizer}


def import_state(state: dict, table: ParamTable, adamw: ChunkAdamW, placement: Placement, scaler: LossScaler | None) -> None:
    weights = state.get("weights")
    if not isinstance(weights, Mapping):
        raise CheckpointError("checkpoint state has no 'weights'")
    _check_names(weights, table)
    optimizer = state.get("optimizer") or {}
    exp_avg, exp_avg_sq = optimizer.get("exp_avg", {}), optimizer.get("exp_avg_sq", {})
    step = int(optimizer.get("step", 0))
    param_steps = optimizer.get("param_steps", {})
    for info in table:
        group = info.group
        value = weights[info.name]  # may be read from a file now (a lazy mapping): once, then dropped
        _write(placement, group.master, info, value)
        if group.param is not group.master:
            _write(placement, group.param, info, value)
        if not group.has_state:
            continue  # another rank owns the group: its master and moments live there
        has_state = info.name in exp_avg and info.name in exp_avg_sq
        for chunk, source in ((group.exp_avg, exp_avg), (group.exp_avg_sq, exp_avg_sq)):
            _write(placement, chunk, info, source[info.name] if has_state else None)
        adamw.set_param_step(info, int(param_steps.get(info.name, step)) if has_state else 0)
    adamw.step_count = step
    if scaler is not None:
        scaler.load_state_dict(optimizer)
    adamw.split.load_state_dict(optimizer)


def _write(placement: Placement, chunk: Chunk, info, value: torch.Tensor | None) -> None:
    """Overwrite one slot in the chunk's home copy; None clears it to zeros (FREE)."""
    view = chunk.view(placement.writable(chunk), info.slot, info.shape)
    if value is None:
        view.zero_()
        placement.move(chunk, info.index, Move.CLEAR)
    else:
        view.copy_(value.detach().reshape(info.shape))  # casts; host->device copy for device homes
        placement.move(chunk, info.index, Move.FILL)


def _check_names(weights: Mapping, table: ParamTable) -> None:
    expected = {info.name: info.shape for info in table}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise CheckpointError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    shape_of = getattr(weights, "shape_of", None) or (lambda name: weights[name].shape)  # lazy: from headers
    for name, shape in expected.items():
        if tuple(shape_of(name)) != tuple(shape):
            raise CheckpointError(f"checkpoint weight {name} has shape {tuple(shape_of(name))}, model {tuple(shape)}")
