"""`attach`: move a model's parameters into chunks and return the engine that trains it.

Steps: list the parameters once each (tied ones under their first name), choose the chunk size
(capped by the device budget, so a large model streams small chunks) and layout, decide which chunk groups live on the device (BudgetError if the model cannot fit
in both budgets), allocate every chunk in its home, copy each parameter in (fp32 master, cast
param copy), then point the parameters at NaN placeholders so the original tensors are freed as
the copy proceeds. Given a `Collective` of several ranks (group-owner ZeRO), this rank allocates
fp32 master and Adam moment chunks only for the groups it owns (shared out by size:
`Collective.balance`) and
plans its budgets for those alone; param and grad chunks exist for every group (compute reads
every param, and each grad chunk is accumulated here before it is reduced onto its owner). A model built on the meta device is initialised one parameter at a time
through `init_fn(name, tensor)`, so no full fp32 copy ever exists outside the chunks. Buffers
move to the compute device. Knows nothing of GPT, data or the trainer.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from homestar.errors import ConfigError
from homestar.optim import OptimConfig, no_decay as default_no_decay
from homestar.runtime.binding import ParamInfo, ParamTable
from homestar.runtime.chunk import Chunk, ChunkGroup, Kind
from homestar.runtime.adam_split import AdamSplit
from homestar.runtime.collectives import Collective
from homestar.runtime.config import RuntimeConfig
from homestar.runtime.engine import ChunkedEngine, LossFn, default_loss
from homestar.runtime.homes import GroupBytes, plan_homes
from homestar.runtime.layout import Layout, choose_chunk_elems, max_chunk_elems, plan_layout
from homestar.runtime.memory import DeviceSpace, HostMemory, SimulatedDevice
from homestar.runtime.optimizer import ChunkAdamW
from homestar.runtime.placement import Placement
from homestar.runtime.states import Move
from homestar.runtime.trace import Tracer

InitFn = Callable[[str, torch.Tensor], None]


def attach(
    model: nn.Module,
    config: RuntimeConfig,
    optim: OptimConfig,
    *,
    loss_fn: LossFn | None = None,
    no_decay: Callable[[str, torch.Tensor], bool] = default_no_decay,
    init_fn: InitFn | None = None,
    collective: Collective | None = None,
) -> ChunkedEngine:
    """Take over `model`'s parameters and return its ChunkedEngine.

    `init_fn(name, tensor)` fills an fp32 CPU tensor in place for a parameter still on the meta
    device; required when the model was built there, ignored otherwise. `collective`: this
    process's rank among those sharing the optimizer's work (default: one process, all state here).
    """
    comm = collective or Collective()
    config = _for_ranks(config, comm)
    named = _unique_parameters(model)
    device = _device_space(config)
    host = HostMemory(config.cpu_budget_bytes, pin=config.device == "cuda")
    layout_budget = device.budget
    if comm.active and config.chunk_elems is None and config.gpu_budget_bytes is None and layout_budget is not None:
        # every rank must cut the same chunks (the collectives pair them up by group), but each
        # found its own GPU's free memory: the chunk size follows the least of them (a sync)
        layout_budget = comm.least(layout_budget)
    layout, group_bytes = plan_chunks([(name, p.numel()) for name, p in named], config, layout_budget, comm)
    homes = plan_homes(
        group_bytes, gpu_cap=device.usable, cpu_cap=_cap(host.budget), slack=device.slack,
        nonmodel=config.nonmodel_estimate_bytes or 0, policy=config.optimizer_placement, fill=False,
    )
    groups, chunks = _make_groups(layout, config, homes, comm)
    placement = Placement(chunks, device, host, Tracer(), prefetch_depth=config.prefetch_depth,
                          headroom=config.nonmodel_headroom, estimate=config.nonmodel_estimate_bytes or 0)
    params = _materialize(model, named, init_fn, device.device, config.compute_dtype)
    infos = [
        ParamInfo(name=name, param=param, shape=param.shape, slot=slot, group=groups[slot.chunk],
                  decay=not no_decay(name, param))
        for (name, param), slot in zip(params, layout.slots)
    ]
    table = ParamTable(infos, device.device, config.compute_dtype)
    # A group's chunks are allocated when its first parameter is packed and each original is
    # freed once packed, so the host never holds the whole fp32 model next to all the chunks.
    allocated: set[int] = set()
    for info, (_, param) in zip(infos, named):
        if info.group.index not in allocated:
            allocated.add(info.group.index)
            for chunk in info.group.chunks():
                placement.allocate_home(chunk)
        _pack(info, param, init_fn, placement)
        table.unbind(info)  # the original tensor is freed here (unless referenced elsewhere)
    _move_buffers(model, device.device)
    adamw = ChunkAdamW(table, groups, placement, optim)
    adamw.collective = comm
    adamw.split = AdamSplit.configured(config.optimizer_stream_share, on_gpu=device.device.type == "cuda")
    return ChunkedEngine(
        model=model, config=config, table=table, groups=groups, group_bytes=group_bytes,
        placement=placement, host=host, tracer=placement.tracer, adamw=adamw,
        loss_fn=loss_fn or default_loss,
    )


def _unique_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    named = list(model.named_parameters())  # deduplicated: tied parameters once
    if not named:
        raise ConfigError("the model has no parameters to train")
    return named


def _device_space(config: RuntimeConfig) -> DeviceSpace:
    if config.device == "cpu":
        return SimulatedDevice(config.gpu_budget_bytes)
    if not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but CUDA is not available")
    from homestar.runtime.cuda import CudaDevice  # CUDA-only code stays out of CPU runs

    return CudaDevice(config.gpu_budget_bytes)


def plan_chunks(sizes: list[tuple[str, int]], config: RuntimeConfig, budget: int | None,
                collective: Collective | None = None) -> tuple[Layout, list[GroupBytes]]:
    """The layout attach uses for (name, numel) pairs under a device budget, and each chunk
    group's bytes on `collective`'s rank (optimizer state only for owned groups; the layout sets
    `collective`'s owners); allocates nothing. The configured chunk size, or the least-waste size
    under a cap derived from the budget (a parameter above the cap, such as a large embedding,
    gets a chunk of its own)."""
    comm = collective or Collective()
    config = _for_ranks(config, comm)
    if config.chunk_elems is not None:
        chunk_elems = config.chunk_elems
    else:
        # A small model's chunks need not reach the default floor: never below its largest parameter.
        floor = min(1 << 20, max((n for _, n in sizes), default=1))
        cap = None if budget is None else max_chunk_elems(budget, bytes_per_elem=working_set_bytes_per_elem(config),
                                                         floor=floor)
        # the cap may stretch a little past a parameter it matches, unless it is the floor (a
        # budget so small that the working set at the cap already takes more than its 1/8)
        chunk_elems = choose_chunk_elems(sizes, align=config.align_elems, max_elems=cap,
                                         stretch=cap is not None and cap > floor)
    layout = plan_layout(sizes, chunk_elems, align=config.align_elems, oversize=True)
    comm.balance([layout.chunk_numel(i) for i in range(layout.n_chunks)])  # who owns each group
    return layout, _group_bytes(layout, config, comm)


def _for_ranks(config: RuntimeConfig, comm: Collective) -> RuntimeConfig:
    """Across several processes grads stay fp32 ("auto" grad precision): the reduce onto each
    group's owner sums in the chunks' dtype, and bf16 would lose the small ones."""
    if comm.world > 1 and config.grad_precision == "auto":
        return dataclasses.replace(config, grad_precision="fp32")
    return config


def working_set_bytes_per_elem(config: RuntimeConfig) -> int:
    """Bytes per chunk element of what streaming puts on the device at once: two param chunks
    in use (a module may straddle two), `prefetch_depth` prefetched, a grad chunk being filled
    and one whose write-back is still reading it."""
    return (2 + config.prefetch_depth) * config.compute_dtype.itemsize + 2 * config.grad_dtype.itemsize


def _group_bytes(layout: Layout, config: RuntimeConfig, comm: Collective) -> list[GroupBytes]:
    out = []
    for index in range(layout.n_chunks):
        elems = layout.chunk_numel(index)
        # master (when separate) + two moments, on the owner alone
        rest = (3 if config.mixed else 2) * 4 * elems if comm.owns(index) else 0
        out.append(GroupBytes(param=elems * config.compute_dtype.itemsize, grad=elems * config.grad_dtype.itemsize,
                              rest=rest))
    return out


def _make_groups(layout: Layout, config: RuntimeConfig, homes: list[bool],
                 comm: Collective) -> tuple[list[ChunkGroup], list[Chunk]]:
    chunks: list[Chunk] = []

    def new(kind: Kind, index: int, dtype: torch.dtype, home: str) -> Chunk:
        chunk = Chunk(id=len(chunks), kind=kind, group=index, numel=layout.chunk_numel(index), dtype=dtype,
                      slots=layout.chunk_slots(index), home=home)
        chunks.append(chunk)
        return chunk

    groups = []
    for index, on_device in enumerate(homes):
        home = "device" if on_device else "host"
        param = new(Kind.PARAM, index, config.compute_dtype, home)
        grad = new(Kind.GRAD, index, config.grad_dtype, home)
        owned = comm.owns(index)  # another rank's group: no master, no moments here
        master = new(Kind.MASTER, index, torch.float32, home) if config.mixed and owned else param
        groups.append(ChunkGroup(
            index=index, param=param, grad=grad, master=master,
            exp_avg=new(Kind.EXP_AVG, index, torch.float32, home) if owned else None,
            exp_avg_sq=new(Kind.EXP_AVG_SQ, index, torch.float32, home) if owned else None,
            optimizer_on_device=on_device,
        ))
    return groups, chunks


def _materialize(model: nn.Module, named, init_fn: InitFn | None, device: torch.device, dtype: torch.dtype):
    """Parameters that can point at placeholders: meta parameters are replaced (ties kept)."""
    if not any(p.is_meta for _, p in named):
        return named
    if init_fn is None:
        raise ConfigError("the model is on the meta device: attach needs an init_fn(name, tensor)")
    placeholder = torch.full((1,), float("nan"), dtype=dtype, device=device)
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in replaced:
                    replaced[id(p)] = nn.Parameter(placeholder.expand(p.shape), requires_grad=p.requires_grad)
                module._parameters[key] = replaced[id(p)]
    return [(name, replaced.get(id(p), p)) for name, p in named]


def _pack(info: ParamInfo, original: torch.Tensor, init_fn: InitFn | None, placement: Placement) -> None:
    """Copy one parameter's value into its master (and param) chunk slots."""
    if original.is_meta:
        value = torch.empty(info.shape, dtype=torch.float32)
        init_fn(info.name, value)
    else:
        value = original.detach()
    group = info.group
    for chunk in {id(c): c for c in (group.master, group.param)}.values():
        chunk.view(placement.writable(chunk), info.slot, info.shape).copy_(value)  # casts for param
        placement.move(chunk, info.index, Move.FILL)


def _move_buffers(model: nn.Module, device: torch.device) -> None:
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is None:
                continue
            if buf.is_meta:
                raise ConfigError(f"buffer {key} is on the meta device; build buffers on the CPU")
            if buf.device != device:
                module._buffers[key] = buf.to(device)


def _cap(budget: int | None) -> float:
    return float("inf") if budget is None else float(budget)
