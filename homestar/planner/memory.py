"""The memory model: what one training run of a GPT shape needs, on the GPU and on the host.

For a model shape, precision, micro-batch and sequence length it counts, in bytes:
- model data by kind, packed into chunks by the runtime's own rule (`runtime.attach.plan_chunks`
  with the `RuntimeConfig` the trainer would build): the chunk size `attach` picks for the same
  device budget, padding and oversized chunks included, and each group's bytes with the
  runtime's dtypes (bf16: param 2, grad 2, fp32 master 4, Adam m 4, v 4 = 16 bytes per element;
  fp16: 18, its grads are fp32; fp32: 16, the param doubles as master);
- what must be on the GPU at once: the param chunks in use (a module may straddle two) and
  prefetched, the grad chunk being filled and one draining;
- activations (`activations.py`);
- the CUDA context, allocator slack and the process's own host memory. The trainer builds the
  model on the meta device; `attach` allocates a group's chunks when it packs the group's first
  parameter and makes each parameter in fp32 as it packs it, so beside the chunks the host holds
  one fp32 parameter at a time (a checkpoint likewise stages one tensor at a time). Under bf16
  the CPU optimizer widens grads slice by slice into one small fp32 buffer.

Host figures checked on the H200 box (2026-11-30; exact-size pinned buffers, grads still fp32,
so 18 bytes per parameter): `homestar bench --preset 1.3b --gpu-mem-gib 8 --micro-batch 2`
peaked (ru_maxrss) at 24.06 GiB for 22.93 GiB of chunks and attach's transient, 1.13 GiB
besides; `homestar train --preset 2.7b --gpu-mem-gib 8` held 46.94 GiB (RSS) for 45.74 GiB of
chunks, 1.20 GiB besides. `Overheads.host_base_cuda_bytes` is that, with room for larger corpora.

Every figure is a pure function of the shape: nothing is allocated. Where the chunks live under
given budgets, and the peaks that follow, is `placement.py`; speed lives in `speed.py`, verdicts
and the recommendation in `plan.py`. Knows nothing of presets, of the
machine's hardware or of the runtime's live state.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from homestar.errors import ConfigError
from homestar.model import GPTConfig
from homestar.planner.activations import ActivationMemory, activation_memory
from homestar.runtime.attach import plan_chunks
from homestar.runtime.config import RuntimeConfig
from homestar.runtime.homes import GroupBytes
from homestar.runtime.layout import Layout
from homestar.runtime.adam_math import SLICE_ELEMS
from homestar.runtime.stream_adam import slice_for, staging_bytes

MIB = 2**20
GIB = 2**30

PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
"""Bytes per element of compute-precision params and activations."""
_FP32_MODEL_BYTES = 4
"""Bytes per parameter of the model as the trainer builds it on the host."""
WORKING_RESERVE = 64 * MIB
"""Allocator slack, token batches, event records: host bytes a training step needs besides chunks."""


def checkpoint_staging(config: GPTConfig) -> int:
    """Host bytes a checkpoint adds beside the chunks: host-homed chunks are written from their
    buffers in place and device-homed tensors copied to the host one at a time
    (`train.checkpoint.tensor_file`): at most the largest parameter, in fp32."""
    return _FP32_MODEL_BYTES * max(numel for _, numel in named_sizes(config))


@dataclass(kw_only=True, slots=True, frozen=True)
class Overheads:
    """Costs outside model data and activations."""

    cuda_context_bytes: int = 768 * MIB
    """CUDA context, kernels and library handles of one process, outside torch's allocator
    (0.75 GiB measured on an H200 with torch 2.x)."""
    allocator_slack: float = 0.10
    """Fraction added to the activations' peak for fragmentation and block rounding."""
    host_base_cuda_bytes: int = 3 * GIB // 2
    """Resident host memory of the process on a GPU run besides model data: torch and the CUDA
    libraries, tokenizer, token arrays (1.13-1.20 GiB measured on an H200, see above)."""
    host_base_cpu_bytes: int = GIB
    """The same on a CPU-only run, without the CUDA libraries (0.53 GiB for the debug preset's
    `homestar bench`, 0.58 GiB for 3 steps of `homestar train` on the default corpus; a larger
    corpus holds more tokens)."""

    def __post_init__(self) -> None:
        if min(self.cuda_context_bytes, self.host_base_cuda_bytes, self.host_base_cpu_bytes) < 0:
            raise ValueError("overheads must be >= 0 bytes")
        if not 0 <= self.allocator_slack < 1:
            raise ValueError("allocator_slack must lie in [0, 1)")


def runtime_config(*, precision: str, device: str, gpu_budget: int | None = None,
                   chunk_elems: int | None = None) -> RuntimeConfig:
    """The runtime settings the trainer builds for this plan: its defaults (prefetch depth, grad
    dtype, alignment) are the ones the memory model counts with."""
    return RuntimeConfig(device=device, precision=precision, gpu_budget_bytes=gpu_budget, chunk_elems=chunk_elems)


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelData:
    """Chunked model data exactly as `runtime.attach` allocates it: group i is chunk i of every
    kind (param, grad, master, Adam m and v); a parameter larger than the chunk size (a large
    vocabulary's embedding) has a group of its own, sized to it."""

    layout: Layout
    groups: tuple[GroupBytes, ...]
    precision: str
    grad_bytes: int
    """Bytes per element of the grad chunks (2 under bf16, else 4)."""
    param_elems: tuple[int, ...]
    """Parameter elements packed in each group (the rest is padding)."""

    @property
    def chunk_elems(self) -> int:
        return self.layout.chunk_elems

    @property
    def n_chunks(self) -> int:
        return self.layout.n_chunks

    @property
    def bytes_per_elem(self) -> int:
        """All kinds together: 16 bytes per element in bf16 and fp32, 18 in fp16."""
        return self.total_bytes() // self.layout.total_elems

    def total_bytes(self) -> int:
        """Every chunk of every kind, padding included."""
        return sum(g.total for g in self.groups)


@lru_cache(maxsize=256)
def model_data(config: GPTConfig, *, precision: str, device: str, gpu_budget: int | None = None,
               chunk_elems: int | None = None) -> ModelData:
    """The runtime's chunks for `config`: `plan_chunks` under the device budget `attach` would be
    given (it caps the chunk size; None: uncapped) or at a fixed `chunk_elems`. Cached: a plan
    asks for the same layout once per micro-batch it weighs."""
    runtime = runtime_config(precision=precision, device=device, gpu_budget=gpu_budget, chunk_elems=chunk_elems)
    layout, groups = plan_chunks(named_sizes(config), runtime, gpu_budget)
    used = [0] * layout.n_chunks
    for slot in layout.slots:
        used[slot.chunk] += slot.numel
    return ModelData(layout=layout, groups=tuple(groups), precision=precision,
                     grad_bytes=runtime.grad_dtype.itemsize, param_elems=tuple(used))


@dataclass(kw_only=True, slots=True, frozen=True)
class Estimate:
    """Budget-free memory of one run: model data, activations and fixed overheads."""

    data: ModelData
    device: str
    micro_batch: int
    seq_len: int
    checkpointing: bool
    act: ActivationMemory
    nonmodel: int
    """Activations' peak plus allocator slack: compute memory that is not chunks."""
    params_in_use: int
    """Param chunks a streamed model needs on the compute device at once (two in use, the
    runtime's `prefetch_depth` prefetched)."""
    grads_in_use: int
    """Grad chunks it needs there at once (being filled, draining)."""
    context: int
    host_base: int
    model_bytes: int
    """fp32 model bytes on the host beside the chunks while `attach` packs: the trainer builds
    the model on the meta device and each parameter is made (fp32) as it is packed, so one
    parameter at a time, the largest (`checkpoint_staging`)."""

    @property
    def staging(self) -> int:
        """Host bytes a checkpoint adds beside the chunks: it stages one fp32 tensor at a time,
        so the same largest parameter as attach (`checkpoint_staging`)."""
        return self.model_bytes

    def chunks_in_use(self, streamed: list[bool] | None = None) -> int:
        """Device bytes of the streamed groups' chunks in use at once (default: every group
        streamed): the largest param and grad chunks, as many as `params_in_use` and
        `grads_in_use` say. With uniform chunks that is the runtime's
        `working_set_bytes_per_elem` times the chunk size."""
        groups = [g for i, g in enumerate(self.data.groups) if streamed is None or streamed[i]]
        params = sorted((g.param for g in groups), reverse=True)[:self.params_in_use]
        grads = sorted((g.grad for g in groups), reverse=True)[:self.grads_in_use]
        return sum(params) + sum(grads)

    def widen_scratch(self, chosen: list[bool]) -> int:
        """The optimizer's fp32 buffer for narrower grads on one side (the chosen groups'): as
        large as its largest chunk. On the device it is charged like a chunk, one group at a time."""
        if self.data.grad_bytes >= 4:
            return 0
        elems = [self.data.layout.chunk_numel(i) for i, picked in enumerate(chosen) if picked]
        return 4 * max(elems, default=0)

    def stream_staging(self) -> int:
        """Device bytes of the staging sets through which the GPU streams its share of the
        host-homed groups' AdamW during the step (on by default on CUDA; `runtime.stream_adam`)."""
        if self.device != "cuda":
            return 0
        runtime = runtime_config(precision=self.data.precision, device="cuda")
        return staging_bytes(slice_for(max(self.data.layout.chunk_numel(i) for i in range(self.data.n_chunks))),
                             runtime.grad_dtype, runtime.compute_dtype)

    def host_scratch(self, on_host: list[bool]) -> int:
        """The CPU optimizer's fp32 buffer for narrower grads: one slice (`adam_math.SLICE_ELEMS`),
        reused by every host-side group, when any group's AdamW runs on the host."""
        if self.data.grad_bytes >= 4 or not any(on_host):
            return 0
        return 4 * SLICE_ELEMS

    def attach_peak(self, on_device: list[bool]) -> int:
        """Host bytes of model data while `attach` packs: group by group its chunks are
        allocated (host-homed ones on the host), each parameter made in fp32 as it is packed."""
        return sum(g.total for g, device in zip(self.data.groups, on_device) if not device) + self.model_bytes


def estimate(
    config: GPTConfig,
    *,
    precision: str,
    micro_batch: int,
    seq_len: int | None = None,
    chunk_elems: int | None = None,
    gpu_budget: int | None = None,
    device: str = "cuda",
    checkpointing: bool | None = None,
    overheads: Overheads = Overheads(),
) -> Estimate:
    """Memory of training `config` with the chunk runtime, before placement. Defaults follow the
    trainer: seq_len from the config, checkpointing on the GPU only, and the chunk size `attach`
    picks under the device budget `gpu_budget` (bytes; None: uncapped) unless `chunk_elems`."""
    if precision not in PRECISION_BYTES:
        raise ConfigError(f"precision must be one of {', '.join(PRECISION_BYTES)}, not {precision!r}")
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device must be 'cuda' or 'cpu', not {device!r}")
    if micro_batch < 1:
        raise ConfigError(f"micro-batch must be >= 1, got {micro_batch}")
    seq_len = config.seq_len if seq_len is None else seq_len
    if not 1 <= seq_len <= config.seq_len:
        raise ConfigError(f"sequence length must lie in 1..{config.seq_len}, got {seq_len}")
    checkpointing = (device == "cuda") if checkpointing is None else checkpointing
    data = model_data(config, precision=precision, device=device, gpu_budget=gpu_budget, chunk_elems=chunk_elems)
    act = activation_memory(config, micro_batch=micro_batch, seq_len=seq_len, act_bytes=PRECISION_BYTES[precision],
                            checkpointing=checkpointing)
    on_gpu = device == "cuda"
    prefetch = RuntimeConfig().prefetch_depth
    return Estimate(
        data=data, device=device, micro_batch=micro_batch, seq_len=seq_len, checkpointing=checkpointing, act=act,
        nonmodel=_with_slack(act, overheads),
        params_in_use=min(data.n_chunks, 2 + prefetch), grads_in_use=min(data.n_chunks, 2),
        context=overheads.cuda_context_bytes if on_gpu else 0,
        host_base=overheads.host_base_cuda_bytes if on_gpu else overheads.host_base_cpu_bytes,
        model_bytes=checkpoint_staging(config),
    )


def nonmodel_forecast(config: GPTConfig, *, device: str, precision: str, micro_batch: int, checkpointing: bool,
                      overheads: Overheads = Overheads()) -> int | None:
    """Device bytes of activations and workspace one micro-batch is expected to peak at (slack
    included): what the runtime reserves beside the chunks until its first trace has measured
    the real figure. None off CUDA: the simulated device holds chunks only."""
    if device != "cuda":
        return None
    act = activation_memory(config, micro_batch=micro_batch, seq_len=config.seq_len,
                            act_bytes=PRECISION_BYTES[precision], checkpointing=checkpointing)
    return _with_slack(act, overheads)


def _with_slack(act: ActivationMemory, overheads: Overheads) -> int:
    return int(act.peak * (1 + overheads.allocator_slack))


def named_sizes(config: GPTConfig) -> list[tuple[str, int]]:
    """(name, numel) of every distinct parameter in `GPT.named_parameters()` order, from the
    shape alone (a tied head is the embedding and appears once)."""
    return list(_named_sizes(config))


@lru_cache(maxsize=64)
def _named_sizes(config: GPTConfig) -> tuple[tuple[str, int], ...]:
    d, v = config.d_model, config.vocab_size
    sizes = [("wte.weight", v * d), ("wpe.weight", config.seq_len * d)]
    block = [("ln_1.weight", d), ("ln_1.bias", d), ("attn.c_attn.weight", 3 * d * d), ("attn.c_attn.bias", 3 * d),
             ("attn.c_proj.weight", d * d), ("attn.c_proj.bias", d), ("ln_2.weight", d), ("ln_2.bias", d),
             ("mlp.c_fc.weight", 4 * d * d), ("mlp.c_fc.bias", 4 * d), ("mlp.c_proj.weight", 4 * d * d),
             ("mlp.c_proj.bias", d)]
    for i in range(config.n_layer):
        sizes.extend((f"h.{i}.{name}", n) for name, n in block)
    sizes += [("ln_f.weight", d), ("ln_f.bias", d)]
    if not config.tie_embeddings:
        sizes.append(("lm_head.weight", v * d))
    return tuple(sizes)
