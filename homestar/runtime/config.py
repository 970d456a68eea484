"""Settings of the chunk runtime, validated when built.

Plain data owned by the runtime: which device computes, how much memory each side may use, the
chunk size and the numeric precision. Knows nothing of models, data or the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from homestar.errors import ConfigError

_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_PLACEMENTS = ("auto", "host", "device")


NONMODEL_HEADROOM = 0.05
"""The default `RuntimeConfig.nonmodel_headroom` (the planner reserves the same)."""


@dataclass(kw_only=True, slots=True)
class RuntimeConfig:
    """How the runtime places chunks and computes."""

    device: str = "cpu"
    """"cuda" computes on the GPU; "cpu" computes on the CPU against a *simulated* device memory
    space (same chunk movement, eviction and budgets, two accounting spaces on one machine)."""
    gpu_budget_bytes: int | None = None
    """Cap for everything on the device: chunks plus, on CUDA, the non-model memory the trace
    measured (activations, workspace). None: the card's free memory on CUDA, unlimited when
    simulated."""
    cpu_budget_bytes: int | None = None
    """Cap for host memory the runtime allocates for chunks (pinned memory included). None: no cap."""
    chunk_elems: int | None = None
    """Elements per chunk. None: the size with the least waste under a cap derived from the
    device budget (`layout.max_chunk_elems`); a parameter larger than a chunk gets its own."""
    nonmodel_estimate_bytes: int | None = None
    """Expected peak of non-model device memory (activations, logits, workspace) before a trace
    has measured it, e.g. the planner's estimate. attach raises BudgetError when the budget
    cannot hold it next to the chunks' working set, and the warm-up run reserves it."""
    precision: str = "fp32"
    """"fp32" (param chunks double as master weights), "bf16" (bf16 compute, fp32 master) or
    "fp16" (fp16 compute, fp32 master, dynamic loss scaling)."""
    grad_precision: str = "auto"
    """dtype of grad chunks. "auto": bf16 under bf16 (autograd's grads of bf16 weights are bf16
    already; stored as they come, host memory is 16 bytes per parameter, not 18, and half the
    bytes cross PCIe; accumulation over micro-batches then rounds to bf16 each time), fp32
    otherwise (fp16 unscales in fp32) and whenever several processes share the work (their
    reduce sums in the chunks' dtype). "fp32": always fp32."""
    optimizer_placement: str = "auto"
    """Where AdamW runs per chunk group. "auto": groups whose whole state fits in the device
    margin the warm-up trace measured run on the device, the rest on the CPU. "host": on the CPU
    unless the host budget forces a group onto the device. "device": every group on the device
    (BudgetError if it cannot fit)."""
    optimizer_stream_share: float | None = None
    """Fraction of the host-homed groups' elements whose AdamW streams through the device
    (state copied in slice by slice, updated there, copied back) while the CPU updates the rest
    at the same time. None ("auto"): on a CUDA device start at half and follow both engines'
    measured rates from step to step; on the simulated device 0."""
    prefetch_depth: int = 2
    """How many upcoming chunk accesses (in trace order) may be fetched ahead of use."""
    nonmodel_headroom: float = NONMODEL_HEADROOM
    """Fraction added to the measured non-model memory when budgeting the device. The trace
    holds the allocator's peak between moments and its unreleasable split blocks, but a replay
    can peak a little above its recording (seen: 2.7b at micro-batch 8 under an 8 GiB cap ran
    out of memory in its second step, 0.13 GiB above the 4.5 GiB the first step had measured,
    with no margin); 5% covers that for a few percent of the chunk cache."""
    align_elems: int = 64
    """Every parameter starts at a multiple of this many elements inside its chunk."""
    loss_scale_init: float = 2.0**16
    """fp16 only: initial dynamic loss scale (as torch.amp.GradScaler)."""
    loss_scale_growth_interval: int = 2000
    """fp16 only: good steps between two doublings of the loss scale."""

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"runtime device must be 'cuda' or 'cpu', not {self.device!r}")
        if self.precision not in _PRECISIONS:
            raise ConfigError(f"precision must be one of {sorted(_PRECISIONS)}, not {self.precision!r}")
        if self.grad_precision not in ("auto", "fp32"):
            raise ConfigError(f"grad_precision must be 'auto' or 'fp32', not {self.grad_precision!r}")
        if self.optimizer_placement not in _PLACEMENTS:
            raise ConfigError(f"optimizer_placement must be one of {_PLACEMENTS}")
        for name in ("gpu_budget_bytes", "cpu_budget_bytes", "chunk_elems", "nonmodel_estimate_bytes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, not {value}")
        if self.optimizer_stream_share is not None and not 0.0 <= self.optimizer_stream_share <= 1.0:
            raise ConfigError(f"optimizer_stream_share must lie in [0, 1], not {self.optimizer_stream_share}")
        if self.prefetch_depth < 0 or self.align_elems < 1 or self.nonmodel_headroom < 0:
            raise ConfigError("prefetch_depth and nonmodel_headroom must be >= 0, align_elems >= 1")
        if self.loss_scale_init <= 0 or self.loss_scale_growth_interval < 1:
            raise ConfigError("loss_scale_init must be positive and its growth interval >= 1")

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype of param chunks and of autocast."""
        return _PRECISIONS[self.precision]

    @property
    def grad_dtype(self) -> torch.dtype:
        """dtype of grad chunks (see `grad_precision`)."""
        if self.grad_precision == "auto" and self.precision == "bf16":
            return torch.bfloat16
        return torch.float32

    @property
    def mixed(self) -> bool:
        """True when compute runs in half precision against fp32 master weights."""
        return self.precision != "fp32"
