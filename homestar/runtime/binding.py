"""Which chunk slot each parameter lives in, and pointing it there only while it is in use.

While a module computes, its parameters' `.data` are views into their param chunk's device copy.
Outside use they are a stride-0 view of a one-element NaN buffer of the right shape, dtype and
device: reading one yields NaN, writing one raises, and nothing aliases chunk memory that may
since have moved or changed. Knows nothing of placement or the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from homestar.runtime.chunk import ChunkGroup
from homestar.runtime.layout import Slot


@dataclass(eq=False, slots=True)
class ParamInfo:
    """One (deduplicated) parameter: its name, shape, slot and chunk group."""

    name: str
    param: nn.Parameter
    shape: torch.Size
    slot: Slot
    group: ChunkGroup
    decay: bool
    """False for parameters AdamW must not decay (norms, biases, embeddings)."""
    has_grad: bool = False
    """A gradient reached this parameter since the last step (torch skips it otherwise)."""

    @property
    def index(self) -> int:
        return self.slot.index


class ParamTable:
    """All managed parameters, by layout index and by parameter object."""

    def __init__(self, infos: list[ParamInfo], device: torch.device, dtype: torch.dtype) -> None:
        self.infos = infos
        self._by_param = {id(info.param): info for info in infos}
        poison = torch.full((1,), float("nan"), dtype=dtype, device=device)
        self._placeholders = [poison.expand(info.shape) for info in infos]
        self._bound: dict[int, ParamInfo] = {}
        """Parameters pointing into a chunk now (unbind_all touches only these)."""

    def __iter__(self):
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def of(self, param: torch.Tensor) -> ParamInfo | None:
        return self._by_param.get(id(param))

    def bind(self, info: ParamInfo, device_tensor: torch.Tensor) -> None:
        """Point the parameter at its slot in the param chunk's device copy."""
        info.param.data = info.group.param.view(device_tensor, info.slot, info.shape)
        self._bound[info.index] = info

    def unbind(self, info: ParamInfo) -> None:
        """Point the parameter at the NaN placeholder (no memory, no stale alias)."""
        info.param.data = self._placeholders[info.index]
        self._bound.pop(info.index, None)

    def unbind_many(self, infos: list[ParamInfo]) -> None:
        for info in infos:
            self.unbind(info)

    def unbind_all(self) -> None:
        for info in list(self._bound.values()):
            self.unbind(info)
