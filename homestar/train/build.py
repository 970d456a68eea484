"""Turning a RunConfig into live objects: the model, the engine that trains it, the token streams.

The one place where the trainer meets the model, the data pipeline and the chunk runtime, so the
loop itself (trainer.py) stays ignorant of all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from homestar.errors import ConfigError
from homestar.optim import OptimConfig
from homestar.runtime.cuda import cap_allocator
from homestar.train.config import RunConfig

GIB = 2**30


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a GPU is usable, else "cpu"; "cuda" without a GPU is a user error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is usable here")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """"auto" -> bf16 on GPUs that have it, fp16 on older GPUs, fp32 on the CPU."""
    if precision != "auto":
        return precision
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def optim_config(config: RunConfig) -> OptimConfig:
    return OptimConfig(lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay,
                       grad_clip=config.grad_clip)


def build_model(config: RunConfig):
    """The GPT of this run. For plain PyTorch: initialised from the run's seed, on the CPU. For the
    chunk runtime: on the meta device (shapes only); `build_engine` makes each parameter, with the
    same values, as the runtime packs it, so the whole fp32 model never sits in host memory."""
    from homestar.model import GPT, GPTConfig

    shape = GPTConfig(**config.model)
    if config.runtime == "torch":
        torch.manual_seed(config.seed)
        return GPT(shape, checkpoint_activations=config.activation_checkpointing)
    with torch.device("meta"):
        return GPT(shape, checkpoint_activations=config.activation_checkpointing)


def cap_gpu_memory(config: RunConfig) -> None:
    """Make the CUDA allocator refuse memory beyond --gpu-mem-gib (simulates a smaller card)."""
    if config.device != "cuda" or config.gpu_mem_gib is None:
        return
    total = torch.cuda.get_device_properties(0).total_memory
    wanted = config.gpu_mem_gib * GIB
    if wanted > total:
        raise ConfigError(f"--gpu-mem-gib {config.gpu_mem_gib} is more than this GPU has ({total / GIB:.1f} GiB)")
    cap_allocator(int(wanted))


def build_engine(config: RunConfig, model, collective=None):
    """The engine that trains `model`: the chunk runtime, or plain PyTorch for --runtime torch.
    `collective` (a runtime `Collective`): this rank among several; each keeps optimizer state
    only for the chunk groups it owns."""
    optim = optim_config(config)
    cap_gpu_memory(config)
    if config.runtime == "torch":
        from homestar.train.torch_engine import TorchEngine

        return TorchEngine(model, optim, device=config.device, precision=config.precision)
    import psutil

    from homestar.planner.memory import nonmodel_forecast
    from homestar.runtime import RuntimeConfig, attach
    from homestar.train.memory_guard import host_chunk_budget

    runtime = RuntimeConfig(
        device=config.device,
        gpu_budget_bytes=None if config.gpu_mem_gib is None else int(config.gpu_mem_gib * GIB),
        # --cpu-mem-gib caps the process; the chunks get what the rest of it leaves
        cpu_budget_bytes=_host_budget(config, host_chunk_budget(config, rss=psutil.Process().memory_info().rss)),
        chunk_elems=config.chunk_elems,
        precision=config.precision,
        # the planner's forecast of the GPU's activation peak, reserved while the first trace
        # measures the real one (without it the first backward's logits and their grad can find
        # the device filled with prefetched chunks: seen, 2.7b at micro-batch 8 under 8 GiB)
        nonmodel_estimate_bytes=nonmodel_forecast(model.config, device=config.device, precision=config.precision,
                                                  micro_batch=config.micro_batch,
                                                  checkpointing=model.checkpoint_activations),
    )
    init_fn = None
    if model.wte.weight.is_meta:  # built by `build_model`: the same draw as an eager build's
        torch.manual_seed(config.seed)
        init_fn = model.initializer()
    return attach(model, runtime, optim, collective=collective, init_fn=init_fn)


def _host_budget(config: RunConfig, from_cap: int | None) -> int | None:
    """The tighter of the process cap's share and the plan's chunk budget (either may be None)."""
    planned = None if config.host_chunk_gib is None else int(config.host_chunk_gib * GIB)
    budgets = [b for b in (from_cap, planned) if b is not None]
    return min(budgets) if budgets else None


@dataclass(kw_only=True, slots=True)
class RunData:
    """The run's tokenizer and token arrays, loaded from the run folder and the token cache."""

    tokenizer: object
    train: object
    val: object


def load_run_data(config: RunConfig, run_dir: Path) -> RunData:
    """Tokenizer from RUN_DIR/tokenizer.json, tokens from the cache (rebuilt if missing)."""
    from homestar.data import load_tokenizer, load_tokens, resolve_source, tokenizer_hash
    from homestar.errors import DataError
    from homestar.paths import cache_dir

    source = resolve_source(config.data["source"])
    if source.fingerprint != config.data["fingerprint"]:
        raise DataError(f"the data at {config.data['source']} changed since this run started; "
                        "resume needs the same data")
    tokenizer = load_tokenizer(source, config.model["vocab_size"], cache_dir=cache_dir(),
                               tokenizer_path=run_dir / "tokenizer.json")
    if tokenizer_hash(tokenizer) != config.tokenizer_hash:
        raise ConfigError(f"{run_dir / 'tokenizer.json'} does not match the run's tokenizer hash")
    tokens = load_tokens(source, tokenizer, cache_dir=cache_dir())
    return RunData(tokenizer=tokenizer, train=tokens.train, val=tokens.val)
