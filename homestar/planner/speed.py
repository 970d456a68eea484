"""The speed estimate: training tokens per second of a fitted plan, from three floors.

A step's time is, per micro-batch, the largest of compute, PCIe traffic and the runtime's own
host-side work (prefetch on a side stream and asynchronous kernels overlap them), plus the
optimizer once per step:
- compute: tokens x FLOPs per token (6 per parameter plus attention, one more forward when
  activations are checkpointed) at 50% of the card's dense bf16/fp16 matmul peak, less for small
  micro-batches (x tokens / (tokens + 1024)). The peak comes from a rough table by compute
  capability (the reference H200 does 790 TFLOP/s; consumer cards far less); on the CPU, 40
  GFLOP/s of fp32 peak per core.
- PCIe: param chunks not cached on the GPU cross twice per micro-batch (forward, and backward
  after eviction), grads of host-homed groups (bf16 under bf16, else fp32) drain once and come
  back for accumulation, cached params are fetched again after each optimizer step; all at the
  pinned rate with both directions busy (48 GB/s each way on the reference box, 55 GB/s one way
  alone).
- runtime: hooks and bookkeeping per block (7 ms on a GPU, 3 ms when every chunk lives there, 15
  ms on the CPU; measured; it bounds small models and micro-batches on fast cards).
- optimizer: groups homed on the GPU at 122 G params/s; the host-homed ones split between the
  CPU's fused AdamW (4.7 G params/s per 16 cores alone, about a quarter of that while the GPU
  streams) and the GPU, through which each parameter's state crosses PCIe (14 bytes each way).
Checked on the H200 against the chunk runtime at micro-batch 8 x 1024 (2026-11-30): within 5%
with every group resident, within 15% with half of them; a 1.3B model streamed through an
8.75 GiB budget ran 1.8x slower than estimated.

Figures are the reference box's (one H200, 16 cores, measured 2026-11-30) scaled down for
other machines; they rank presets and flag hopeless ones, they are no benchmark. Knows nothing
of presets, budgets or verdicts.
"""

from __future__ import annotations

from dataclasses import dataclass

from homestar.model import GPTConfig
from homestar.planner.memory import PRECISION_BYTES
from homestar.planner.placement import Fit
from homestar.planner.probe import GPUInfo


@dataclass(kw_only=True, slots=True, frozen=True)
class GpuClass:
    """Rough speed of one GPU generation."""

    matmul_tflops: float
    """Dense bf16/fp16 matmul peak (fp32 accumulation) of a typical card of the generation."""
    pcie_gbs: float
    """Pinned host<->GPU copy rate, GB/s each way with both directions busy."""


GPU_CLASSES: dict[tuple[int, int], GpuClass] = {
    (7, 0): GpuClass(matmul_tflops=100.0, pcie_gbs=10.0),   # V100
    (7, 5): GpuClass(matmul_tflops=25.0, pcie_gbs=10.0),    # Turing: RTX 20xx, T4
    (8, 0): GpuClass(matmul_tflops=280.0, pcie_gbs=20.0),   # A100
    (8, 6): GpuClass(matmul_tflops=30.0, pcie_gbs=20.0),    # Ampere consumer: RTX 30xx, A10
    (8, 7): GpuClass(matmul_tflops=10.0, pcie_gbs=10.0),    # Jetson Orin
    (8, 9): GpuClass(matmul_tflops=40.0, pcie_gbs=20.0),    # Ada: RTX 40xx, L4, L40
    (9, 0): GpuClass(matmul_tflops=790.0, pcie_gbs=48.0),   # H100/H200 (measured on an H200)
    (10, 0): GpuClass(matmul_tflops=1000.0, pcie_gbs=48.0),  # B200
    (12, 0): GpuClass(matmul_tflops=50.0, pcie_gbs=40.0),   # Blackwell consumer: RTX 50xx
}
UNKNOWN_GPU = GpuClass(matmul_tflops=20.0, pcie_gbs=10.0)
"""A card older than the table, or one only budgeted for: assume an old consumer one."""


@dataclass(kw_only=True, slots=True, frozen=True)
class SpeedFacts:
    """Throughput figures of the estimate and the bar for a useful speed."""

    mfu: float = 0.5
    """Share of the matmul peak that compute reaches with large micro-batches. Plain PyTorch
    reached 0.72 on the H200 (508 TFLOP/s for a 1.3B model at micro-batch 8 x 1024); 0.5 leaves
    room for consumer cards and their drivers."""
    mfu_half_tokens: int = 1024
    """Micro-batch tokens at which the reached share is half of `mfu`."""
    runtime_block_s: float = 0.007
    """Host-side time of the chunk runtime per block and micro-batch on a GPU (hooks, chunk
    bookkeeping, event waits), overlapped with GPU work: the 24-block 1.3B model streamed under
    8 GiB took 0.17 s for forward and backward at micro-batch 2, compute included (H200,
    2026-11-30; 14.5 ms a block before the hooks' bookkeeping was cut)."""
    resident_block_s: float = 0.003
    """The same floor when every chunk lives on the GPU (no hooks' work; kernel launches bound
    small micro-batches): the resident 24-block 355M model took 0.073 s for forward and backward
    at micro-batch 2 (H200, 2026-11-30)."""
    cpu_runtime_block_s: float = 0.015
    """The same when the CPU trains (not re-measured since the cut)."""
    fp32_share: float = 0.25
    """fp32 training speed on a GPU relative to its bf16 peak (TF32 tensor cores at best)."""
    cpu_gflops_per_core: float = 40.0
    """fp32 matmul peak of one CPU core (AVX2/AVX-512 FMA)."""
    cpu_adam_params_s: float = 4.7e9
    """torch's fused CPU AdamW on `cpu_adam_cores` cores."""
    cpu_adam_cores: int = 16
    cpu_adam_contended: float = 0.27
    """Share of `cpu_adam_params_s` the CPU keeps while PCIe copies stream the GPU's share through
    host memory: 1.14-1.4 G params/s measured on the H200 box (2.7b and 1.3b at 8 GiB)."""
    stream_bytes: int = 14
    """Bytes each way per parameter whose AdamW streams through the GPU (fp32 master and moments,
    a bf16 grad in, a bf16 param out)."""
    gpu_adam_params_s: float = 122e9
    useful_tokens: int = 100_000_000
    useful_seconds: float = 86_400.0
    """A preset trains at a useful speed when `useful_tokens` train within this many seconds:
    100 M tokens a day, about 1,160 tokens/s."""

    def __post_init__(self) -> None:
        numbers = (self.mfu, self.fp32_share, self.cpu_gflops_per_core, self.cpu_adam_params_s,
                   self.gpu_adam_params_s, self.useful_seconds)
        if min(numbers) <= 0 or self.mfu > 1 or min(self.mfu_half_tokens, self.runtime_block_s,
                                                         self.resident_block_s, self.cpu_runtime_block_s) < 0 \
                or self.cpu_adam_cores < 1 or not 0 < self.cpu_adam_contended <= 1 or self.stream_bytes < 1:
            raise ValueError("speed facts must be positive (mfu at most 1)")
        if self.useful_tokens < 1:
            raise ValueError("useful_tokens must be >= 1")

    @property
    def useful_tok_s(self) -> float:
        return self.useful_tokens / self.useful_seconds


def gpu_class(gpu: GPUInfo | None) -> GpuClass:
    """The table's row for this card: its capability, else the closest listed one below it."""
    if gpu is None:
        return UNKNOWN_GPU
    known = [cap for cap in GPU_CLASSES if cap <= gpu.capability]
    return GPU_CLASSES[max(known)] if known else UNKNOWN_GPU


def tokens_per_second(fit: Fit, config: GPTConfig, *, accum: int, gpu: GpuClass, cores: int,
                      facts: SpeedFacts = SpeedFacts()) -> float:
    """Estimated training tokens/s of a fitted plan with `accum` micro-batches per step."""
    est = fit.est
    tokens = est.micro_batch * est.seq_len
    flops = tokens * config.flops_per_token() * (4 / 3 if est.checkpointing else 1.0)
    efficiency = facts.mfu * tokens / (tokens + facts.mfu_half_tokens)
    data = est.data
    cpu_adam = facts.cpu_adam_params_s * cores / facts.cpu_adam_cores
    if est.device == "cpu":
        micro = max(flops / (cores * facts.cpu_gflops_per_core * 1e9 * efficiency),
                    config.n_layer * facts.cpu_runtime_block_s)
        return tokens * accum / (accum * micro + data.layout.total_elems / cpu_adam)
    peak = gpu.matmul_tflops * 1e12 * (facts.fp32_share if data.precision == "fp32" else 1.0)
    streamed, on_cpu = fit.streamed, fit.streamed_elems
    uncached = streamed.param - fit.cached_param_bytes
    traffic = 2 * uncached + (2 - 1 / accum) * streamed.grad
    # resident mode needs every group on the GPU and grads in the params' dtype (not fp16's fp32)
    resident = fit.steady_groups == data.n_chunks and data.grad_bytes == PRECISION_BYTES[data.precision]
    overhead = config.n_layer * (facts.resident_block_s if resident else facts.runtime_block_s)
    micro = max(flops / (peak * efficiency), traffic / (gpu.pcie_gbs * 1e9), overhead)
    # host-homed groups: split between the contended CPU and the GPU's PCIe stream (the runtime
    # balances the two by their measured rates)
    host_rate = cpu_adam * facts.cpu_adam_contended + gpu.pcie_gbs * 1e9 / facts.stream_bytes
    optimizer = on_cpu / host_rate + (data.layout.total_elems - on_cpu) / facts.gpu_adam_params_s
    refetch = fit.cached_param_bytes / (gpu.pcie_gbs * 1e9)  # cached params are stale after a CPU step
    return tokens * accum / (accum * micro + optimizer + refetch)
