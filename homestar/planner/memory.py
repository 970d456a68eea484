"""The memory model: what one training run of a GPT shape needs, on the GPU and on the host.

For a model shape, precision, micro-batch and sequence length it counts, in bytes:
- model data by kind (compute-precision params, fp32 grads, fp32 master, Adam m and v), packed
  into chunks exactly as the runtime packs them (`homestar.runtime.layout`), padding included;
- where those chunks live under given budgets, decided by the runtime's own rule
  (`homestar.runtime.homes.plan_homes`): chunk groups are homed on the host (pinned on CUDA)
  unless the host budget cannot hold them, then on the GPU; after the warm-up trace, groups
  whose whole state fits in the GPU's margin move there too;
- what must be on the GPU at once: the param chunks in use (a module may straddle two) and
  prefetched, the grad chunk being filled and one draining;
- activations with per-block checkpointing or without it, and the logits with their grad and the
  loss's fp32 slices, which dominate small models with a large vocabulary (`ActivationMemory`);
- the CUDA context, allocator slack and the process's own host memory: pinned chunk buffers as
  torch's host allocator rounds them (to powers of two), and the fp32 model the trainer builds
  on the host, alive while the runtime copies it into chunks.

Every figure is a pure function of the shape and budgets: nothing is allocated. Speed lives in
`speed.py`, verdicts and the recommendation in `plan.py`. Knows nothing of presets, of the
machine's hardware or of the runtime's live state.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from homestar.errors import BudgetError, ConfigError
from homestar.model import GPTConfig
from homestar.runtime.homes import GroupBytes, plan_homes
from homestar.runtime.layout import Layout, choose_chunk_elems, plan_layout

MIB = 2**20
GIB = 2**30

PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
"""Bytes per element of compute-precision params and activations."""
_ALIGN = 64
"""Parameter alignment inside a chunk (the runtime's default `align_elems`)."""
_CE_SLICE_ELEMS = 1 << 25
"""Logit elements the loss upcasts to fp32 at once (the model's chunked cross-entropy)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class Overheads:
    """Costs outside model data and activations, and the runtime's working-set shape."""

    cuda_context_bytes: int = 768 * MIB
    """CUDA context, kernels and library handles of one process, outside torch's allocator
    (0.75 GiB measured on an H200 with torch 2.x)."""
    allocator_slack: float = 0.10
    """Fraction added to the activations' peak for fragmentation and block rounding."""
    host_base_cuda_bytes: int = 5 * GIB // 2
    """Resident host memory of the process on a GPU run besides chunks: torch and the CUDA
    libraries (1.4 GiB measured on an H200), tokenizer, token arrays, checkpoint writing."""
    host_base_cpu_bytes: int = 3 * GIB // 2
    """The same on a CPU-only run (no CUDA libraries)."""
    prefetch_chunks: int = 2
    """Param chunks fetched ahead of use (the runtime's `prefetch_depth`)."""
    pinned_pow2: bool = True
    """torch's caching host allocator rounds every pinned allocation up to a power of two: on
    CUDA each host chunk buffer costs its next power of two (measured on an H200: a 355M model's
    five chunk groups, 6.3 GiB of data, took 11.25 GiB of pinned memory)."""
    model_on_host: bool = True
    """The trainer builds the model in fp32 on the host and the runtime copies it into chunks
    that are all allocated first: 4 bytes per parameter on top of the chunks at that moment."""

    def __post_init__(self) -> None:
        if min(self.cuda_context_bytes, self.host_base_cuda_bytes, self.host_base_cpu_bytes) < 0:
            raise ValueError("overheads must be >= 0 bytes")
        if not 0 <= self.allocator_slack < 1 or self.prefetch_chunks < 0:
            raise ValueError("allocator_slack must lie in [0, 1) and prefetch_chunks be >= 0")


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelData:
    """Chunked model data: every kind has the same layout; chunk i of every kind is group i."""

    layout: Layout
    precision: str

    @property
    def chunk_elems(self) -> int:
        return self.layout.chunk_elems

    @property
    def n_chunks(self) -> int:
        return self.layout.n_chunks

    @property
    def group(self) -> GroupBytes:
        """Bytes of one chunk group: param in compute precision, fp32 grad, fp32 master (unless
        the params are fp32 themselves) and the two fp32 Adam moments."""
        elems = self.chunk_elems
        rest = (8 if self.precision == "fp32" else 12) * elems
        return GroupBytes(param=elems * PRECISION_BYTES[self.precision], grad=4 * elems, rest=rest)

    def host_group_bytes(self, *, pow2: bool) -> int:
        """Host memory of one group's buffers, each rounded up to a power of two when `pow2`."""
        group = self.group
        kinds = [group.param, group.grad] + [4 * self.chunk_elems] * (group.rest // (4 * self.chunk_elems))
        return sum(_next_pow2(b) for b in kinds) if pow2 else group.total

    @property
    def bytes_per_elem(self) -> int:
        """All kinds together: 18 bytes per element in bf16/fp16, 16 in fp32."""
        return self.group.total // self.chunk_elems

    def total_bytes(self) -> int:
        """Every chunk of every kind, padding included."""
        return self.n_chunks * self.group.total


@dataclass(kw_only=True, slots=True, frozen=True)
class ActivationMemory:
    """Non-chunk bytes of one micro-batch's forward and backward, by phase.

    Measured against plain PyTorch on an H200 (bf16 autocast, chunked loss, tied head): the peak
    is the saved activations plus the larger of two phases, the loss/head backward and one
    block's recompute and backward, never both at once. The model reads above what was measured
    for d_model 128-4096 and micro-batches 2-8 (by 4-13%), and 40% above at micro-batch 1,
    where the loss's fixed-size fp32 slices dominate.
    """

    saved: int
    """Kept from forward to backward: each block's input with checkpointing, else every block's
    saved tensors; plus the final LayerNorm's fp32 output."""
    head_phase: int
    """Loss backward: the logits, their grad and the loss's fp32 slices (and an untied head's
    weight grad)."""
    block_phase: int
    """One block's recomputed saved tensors (checkpointing) and its backward's live grads."""
    grad_held: int
    """A tied embedding's grad, which autograd holds from the head's backward to the embedding's
    before the runtime adds it into its grad chunk."""

    @property
    def peak(self) -> int:
        return self.saved + self.grad_held + max(self.head_phase, self.block_phase)


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
    """Param chunks a streamed model needs on the compute device at once (in use, prefetched)."""
    grads_in_use: int
    """Grad chunks it needs there at once (being filled, draining)."""
    context: int
    host_base: int
    model_bytes: int
    """The fp32 model the trainer builds on the host, alive while the runtime takes it over."""
    host_group: int
    """Host memory of one host-homed chunk group (pinned and power-of-two rounded on CUDA)."""

    @property
    def chunks_in_use(self) -> int:
        group = self.data.group
        return self.params_in_use * group.param + self.grads_in_use * group.grad


@dataclass(kw_only=True, slots=True, frozen=True)
class Fit:
    """Where the chunks live under given budgets, and the resulting peaks. On the CPU every
    figure is host memory and `gpu_*` are zero."""

    est: Estimate
    device_groups: int
    """Groups homed on the GPU from the start (the host budget could not hold them)."""
    steady_groups: int
    """Groups on the GPU after the warm-up trace (their optimizer runs there)."""
    cached_param_bytes: int
    """Param chunks of host-homed groups that stay cached on the GPU between uses."""
    gpu_min: int
    """The least GPU memory the run trains in (context included)."""
    gpu_peak: int
    """GPU memory in steady state: the runtime caches chunks up to its budget."""
    host_peak: int
    """Host memory of the process; on CUDA its chunk buffers are pinned (cannot be swapped)."""
    runtime_host_budget: int | None
    """The host budget to give the runtime (its own unrounded chunk bytes) for this placement;
    None when every group fits on the host anyway."""


def fit(est: Estimate, *, gpu_budget: int | None, host_budget: int) -> Fit | None:
    """The placement the runtime would choose under these budgets (bytes; on the CPU
    `gpu_budget` caps the simulated device space, None: unbounded); None when it would refuse."""
    if est.device == "cpu":
        return _fit_cpu(est, gpu_budget, host_budget)
    if gpu_budget is None:
        raise ValueError("a CUDA plan needs a GPU budget")
    return _fit_cuda(est, gpu_budget, host_budget)


def _fit_cpu(est: Estimate, simulated: int | None, host_budget: int) -> Fit | None:
    # The simulated device keeps a copy of every param and grad chunk it can through the warm-up
    # step, before groups move there for good: at that peak the host holds both.
    data, group = est.data, est.data.group
    copies = data.n_chunks * (group.param + group.grad)
    copies = copies if simulated is None else min(copies, simulated)
    chunks = data.total_bytes()
    host = est.host_base + chunks + max(est.nonmodel + copies, est.model_bytes)
    if host > host_budget or (simulated is not None and est.chunks_in_use > simulated):
        return None
    return Fit(est=est, device_groups=0, steady_groups=0, cached_param_bytes=0, gpu_min=0, gpu_peak=0, host_peak=host,
               runtime_host_budget=None)


def _fit_cuda(est: Estimate, gpu_budget: int, host_budget: int) -> Fit | None:
    group, n = est.data.group, est.data.n_chunks
    gpu_cap = gpu_budget - est.context
    # The runtime counts its chunks unrounded; scale the host room into its units.
    cpu_cap = (host_budget - est.host_base - est.model_bytes) * group.total / est.host_group
    # The runtime's own check counts two param chunks and one grad chunk; reserve the prefetched
    # and draining ones too, so a plan that fits also overlaps its transfers.
    reserve = est.nonmodel + max(0, est.chunks_in_use - (2 * group.param + group.grad))
    try:
        start = sum(plan_homes([group] * n, gpu_cap=gpu_cap, cpu_cap=cpu_cap, nonmodel=reserve, policy="auto",
                               fill=False))
        settled = sum(plan_homes([group] * n, gpu_cap=gpu_cap, cpu_cap=cpu_cap, nonmodel=reserve, policy="auto",
                                 fill=True))
    except BudgetError:
        return None
    working = est.chunks_in_use if start < n else 0
    gpu_min = est.context + est.nonmodel + start * group.total + working
    # Steady state: groups homed on the GPU, then param chunks cached in the room left beside
    # the grad chunk in use. The runtime fills its budget with whatever chunks it has (measured
    # on an H200 it went past it by 0.6-1.9 GiB: its trace saw less non-model memory).
    room = gpu_cap - est.nonmodel - settled * group.total - (group.grad if settled < n else 0)
    cached = max(0, min((n - settled) * group.param, room))
    gpu_peak = min(max(est.context + est.nonmodel + n * group.total, gpu_min), gpu_budget)
    return Fit(est=est, device_groups=start, steady_groups=settled, cached_param_bytes=cached, gpu_min=gpu_min,
               gpu_peak=gpu_peak, host_peak=est.host_base + est.model_bytes + (n - start) * est.host_group,
               runtime_host_budget=int(cpu_cap) if start else None)


def estimate(
    config: GPTConfig,
    *,
    precision: str,
    micro_batch: int,
    seq_len: int | None = None,
    chunk_elems: int | None = None,
    device: str = "cuda",
    checkpointing: bool | None = None,
    overheads: Overheads = Overheads(),
) -> Estimate:
    """Memory of training `config` with the chunk runtime, before any budget. Defaults follow the
    trainer: seq_len from the config, checkpointing on the GPU only, the least-waste chunk."""
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
    data = ModelData(layout=layout_of(config, chunk_elems), precision=precision)
    act = activation_memory(config, micro_batch=micro_batch, seq_len=seq_len, act_bytes=PRECISION_BYTES[precision],
                            checkpointing=checkpointing)
    on_gpu = device == "cuda"
    return Estimate(
        data=data, device=device, micro_batch=micro_batch, seq_len=seq_len, checkpointing=checkpointing, act=act,
        nonmodel=int(act.peak * (1 + overheads.allocator_slack)),
        params_in_use=min(data.n_chunks, 2 + overheads.prefetch_chunks), grads_in_use=min(data.n_chunks, 2),
        context=overheads.cuda_context_bytes if on_gpu else 0,
        host_base=overheads.host_base_cuda_bytes if on_gpu else overheads.host_base_cpu_bytes,
        model_bytes=4 * config.num_params() if overheads.model_on_host else 0,
        host_group=data.host_group_bytes(pow2=on_gpu and overheads.pinned_pow2),
    )


def activation_memory(config: GPTConfig, *, micro_batch: int, seq_len: int, act_bytes: int,
                      checkpointing: bool) -> ActivationMemory:
    """Activation memory of one micro-batch; `act_bytes` 2 for bf16/fp16 autocast, 4 for fp32.

    Per token and block, in [B, T, d_model] tensors of `act_bytes`: forward saves 17 in fp32
    (ln inputs and outputs, qkv 3, attention output, projection input, MLP 4 + 4); under
    autocast the two LayerNorm outputs are fp32 with half-precision casts beside them, 21 in all.
    Backward adds ~19 live (MLP grads 4 + 4, qkv grads, flash-attention accumulators). Attention
    is the fused SDPA kernel: no [T, T] scores are kept.
    """
    tensor = micro_batch * seq_len * config.d_model * act_bytes
    per_block = (21 if act_bytes < 4 else 17) * tensor
    backward_live = 19 * tensor
    final_norm = 2 * tensor * (4 // act_bytes)  # fp32 output, kept for the head's backward
    if checkpointing:
        saved, block_phase = config.n_layer * tensor, per_block + backward_live
    else:
        saved, block_phase = config.n_layer * per_block, backward_live
    logit_elems = micro_batch * seq_len * config.vocab_size
    fp32_slices = (3 if act_bytes < 4 else 2) * min(logit_elems, _CE_SLICE_ELEMS) * 4
    head_weight = config.vocab_size * config.d_model * act_bytes
    return ActivationMemory(
        saved=saved + final_norm,
        head_phase=2 * logit_elems * act_bytes + fp32_slices + (0 if config.tie_embeddings else head_weight),
        block_phase=block_phase,
        grad_held=head_weight if config.tie_embeddings else 0,
    )


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


@lru_cache(maxsize=256)
def layout_of(config: GPTConfig, chunk_elems: int | None = None) -> Layout:
    """The runtime's packing of `config` into chunks of `chunk_elems` (default: its least-waste
    size). Cached: a plan asks for the same layout once per micro-batch it weighs."""
    sizes = named_sizes(config)
    return plan_layout(sizes, chunk_elems if chunk_elems is not None else choose_chunk_elems(sizes))


def choose_chunk(config: GPTConfig, *, precision: str, gpu_room_bytes: int | None, pinned_pow2: bool = False) -> int:
    """The chunk size that wastes least for this model on this machine.

    Waste is counted in bytes: host memory beyond the parameters' own (layout padding in every
    kind, and with `pinned_pow2` each pinned buffer's rounding up to a power of two) plus, on a
    GPU whose room (`gpu_room_bytes`) cannot cache every param chunk, the tail of that room too
    small for one more chunk. Without a room, the runtime's own choice (padding only).
    Candidates: the runtime's 65 sizes from the largest parameter to twice it, and the power of
    two in that range (no rounding waste at all); those whose working set (four param and two
    grad chunks) does not fit the room are dropped, and when none fits, the smallest wins.
    """
    if gpu_room_bytes is None:
        return layout_of(config).chunk_elems
    sizes = [n for _, n in _named_sizes(config)]
    base = _round_up(max(sizes), _ALIGN)
    step = max(_ALIGN, _round_up(base // 64, _ALIGN))
    candidates = [base + k * step for k in range(65)] + [_next_pow2(base)]
    used = sum(sizes)

    def waste(chunk_elems: int) -> int:
        data = ModelData(layout=Layout(chunk_elems=chunk_elems, slots=(), n_chunks=_count_chunks(sizes, chunk_elems)),
                         precision=precision)
        host = data.n_chunks * data.host_group_bytes(pow2=pinned_pow2) - used * data.bytes_per_elem
        chunk_bytes = data.group.param
        stranded = 0 if data.n_chunks * chunk_bytes <= gpu_room_bytes else max(0, gpu_room_bytes) % chunk_bytes
        return host + stranded

    group_bytes = PRECISION_BYTES[precision] * 4 + 4 * 2  # four param chunks and two grad chunks, per element
    workable = [c for c in candidates if c * group_bytes <= gpu_room_bytes]
    return min(workable, key=lambda c: (waste(c), c)) if workable else min(candidates)


def gpu_room_for_chunks(config: GPTConfig, *, precision: str, gpu_budget: int, overheads: Overheads = Overheads()) -> int:
    """GPU bytes left for chunks at micro-batch 1: the budget less the context and the
    activations (with slack). Negative when even those do not fit."""
    act = activation_memory(config, micro_batch=1, seq_len=config.seq_len, act_bytes=PRECISION_BYTES[precision],
                            checkpointing=True)
    return gpu_budget - overheads.cuda_context_bytes - int(act.peak * (1 + overheads.allocator_slack))


def _count_chunks(sizes: list[int], chunk_elems: int) -> int:
    """Chunks `plan_layout` would use (same greedy, aligned, never-split packing), without
    building its slots: choose_chunk weighs 65 sizes per preset."""
    chunks, cursor = 1, 0
    for numel in sizes:
        start = _round_up(cursor, _ALIGN)
        if start + numel > chunk_elems:
            chunks, start = chunks + 1, 0
        cursor = start + numel
    return chunks


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
