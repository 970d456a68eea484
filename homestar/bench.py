"""`homestar bench`: time training steps on synthetic tokens, chunk runtime vs plain PyTorch.

Each system runs in its own child process, so memory peaks are its own and one running out of
memory cannot take the other down. Needs neither textual nor datasets (the GPU machine has
neither). TFLOP/s counts 6*params + 12*layers*seq*d_model FLOPs per token (SPEC).

The breakdown, per timed step on average: forward and backward (device time on the compute
stream), forward_backward (the host's time in them; the device may still be computing), h2d and
d2h (seconds the upload and offload streams spent copying, which overlap compute; copies of the
AdamW streamed beside the next forward are not counted), the optimizer and its parts (opt_*:
the host's time in the step; on one process its AdamW then goes on beside the next forward, and
opt_cpu_adam and opt_streamed_adam are the previous step's engines, each timed over its own work
beside that forward: the CPU's on its worker, the streamed groups' on the device).
The timed steps run back to back with no device sync between them, as training runs them;
`step_s` is their mean, the last step's update and every queued copy included; step_median,
step_min and step_max are of each step's span between the loss reads that end them.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

GIB = 2**30
SNAPSHOT_ENV = "HOMESTAR_MEMORY_SNAPSHOT"
"""A file path: on CUDA the bench child records the allocator's history and dumps it there when it
ends, failed or not (load it at pytorch.org/memory_viz to see what held memory at an OOM)."""


@dataclass(kw_only=True, slots=True)
class BenchRequest:
    preset: str = "125m"
    system: str = "chunked"
    """"chunked" (the runtime) or "torch" (plain PyTorch, fused AdamW)."""
    device: str = "auto"
    gpu_mem_gib: float | None = None
    cpu_mem_gib: float | None = None
    micro_batch: int | None = None
    accum: int = 1
    seq_len: int | None = None
    steps: int = 5
    warmup: int | None = None
    """Untimed steps first; None: 2, or as many as the automatic CPU/GPU AdamW split takes to
    settle when the chunk runtime streams AdamW (so the timed steps are the steady ones)."""
    precision: str = "auto"
    chunk_elems: int | None = None
    stream_share: float | None = None
    """Fraction of host-homed AdamW streamed through the device (None: the runtime's default)."""
    activation_checkpointing: bool | None = None


@dataclass(kw_only=True, slots=True)
class BenchResult:
    system: str
    preset: str
    params: int
    status: str
    """"ok", "oom" or "error"."""
    tok_s: float = 0.0
    tflops: float = 0.0
    step_s: float = 0.0
    gpu_peak_gib: float = 0.0
    cpu_peak_gib: float = 0.0
    micro_batch: int = 0
    accum: int = 0
    seq_len: int = 0
    device: str = ""
    precision: str = ""
    gpu_mem_gib: float | None = None
    checkpointing: bool = False
    """Block activations recomputed in backward instead of kept."""
    breakdown: dict[str, float] = field(default_factory=dict)
    message: str = ""


def run_bench(request: BenchRequest, *, baseline: bool, rounds: int = 1) -> list[BenchResult]:
    """Run the chunk runtime (and plain PyTorch first, with `baseline`), each in a child process;
    `rounds` times over, the systems alternating, so that a host whose speed drifts weighs on
    both alike (`format_results` compares their medians)."""
    systems = ["torch", "chunked"] if baseline else [request.system]
    results = []
    for _ in range(rounds):
        for system in systems:
            child = BenchRequest(**{**asdict(request), "system": system})
            results.append(_run_child(child))
    return results


def _run_child(request: BenchRequest) -> BenchResult:
    cmd = [sys.executable, "-m", "homestar.bench", json.dumps(asdict(request))]
    # the child inherits this environment, PYTORCH_CUDA_ALLOC_CONF included (set by the CLI's main)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return BenchResult(**json.loads(line))
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return BenchResult(system=request.system, preset=request.preset, params=0, status="error",
                       message=f"exit {proc.returncode}: {tail}")


def _measure(request: BenchRequest) -> BenchResult:
    """In the child: build the model and engine, run warm-up then timed steps."""
    import torch

    snapshot = os.environ.get(SNAPSHOT_ENV)
    if snapshot and torch.cuda.is_available():
        torch.cuda.memory._record_memory_history(max_entries=200_000)  # cost: a stack trace per allocation
        try:
            return _measure_steps(request)
        finally:
            torch.cuda.memory._dump_snapshot(snapshot)
    return _measure_steps(request)


@dataclass(slots=True)
class Resolved:
    """What a request trains, resolved: the model's shape and how and where it trains."""

    preset: str
    config: object
    """The model's `GPTConfig` (the preset's, with the request's sequence length)."""
    device: str
    precision: str
    micro_batch: int
    checkpointing: bool
    optim: object
    """The preset's `OptimConfig`."""


def resolve(request: BenchRequest) -> Resolved:
    """The request's preset, device and precision as the run will have them."""
    from homestar.model import GPTConfig, load_preset
    from homestar.optim import OptimConfig
    from homestar.train.build import resolve_device, resolve_precision

    preset = load_preset(request.preset)
    device = resolve_device(request.device)
    shape = {**asdict(preset.model)}
    if request.seq_len:
        shape["seq_len"] = request.seq_len
    checkpointing = device == "cuda" if request.activation_checkpointing is None else request.activation_checkpointing
    return Resolved(
        preset=preset.name, config=GPTConfig(**shape), device=device,
        precision=resolve_precision(request.precision, device),
        micro_batch=request.micro_batch or preset.train.micro_batch, checkpointing=checkpointing,
        optim=OptimConfig(lr=preset.train.lr, weight_decay=preset.train.weight_decay, grad_clip=preset.train.grad_clip))


def build(request: BenchRequest, run: Resolved):
    """The engine (the GPU capped at the request's budget first) and one seeded micro-batch
    (x, y), pinned on CUDA; the same for every system and every step."""
    import torch

    from homestar.model import GPT

    if run.device == "cuda" and request.gpu_mem_gib:
        from homestar.runtime.cuda import cap_allocator

        cap_allocator(int(request.gpu_mem_gib * GIB))
    torch.manual_seed(0)
    if request.system == "torch":
        model = GPT(run.config, checkpoint_activations=run.checkpointing)
    else:  # shapes only: the runtime makes each parameter as it packs it (as `homestar train` does)
        with torch.device("meta"):
            model = GPT(run.config, checkpoint_activations=run.checkpointing)
    engine = _engine(request, model, run.optim, run.device, run.precision, run.micro_batch)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(run.config.vocab_size, (run.micro_batch, run.config.seq_len + 1), generator=gen)
    x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    if run.device == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    return engine, x, y


def _measure_steps(request: BenchRequest) -> BenchResult:
    import torch

    run = resolve(request)
    config, device, micro_batch = run.config, run.device, run.micro_batch
    result = BenchResult(system=request.system, preset=run.preset, params=config.num_params(), status="ok",
                         micro_batch=micro_batch, accum=request.accum, seq_len=config.seq_len, device=device,
                         precision=run.precision, gpu_mem_gib=request.gpu_mem_gib, checkpointing=run.checkpointing)
    try:
        engine, x, y = build(request, run)
        breakdown: dict[str, float] = {}
        if hasattr(engine, "time_phases"):
            engine.time_phases()  # forward, backward, copies each way: timing events, no syncs
        warmup = request.warmup if request.warmup is not None else _settling_steps(engine)
        for _ in range(warmup):
            _one_step(engine, x, y, request, run.optim.lr)
        _drain(engine, device)
        if hasattr(engine, "take_phases"):
            engine.take_phases()  # the warm-up's spans are not reported
        # the timed steps run back to back, as training runs them: no device sync between them
        # (a step's update may still run beside the next forward); the last step's update is
        # ended and every queued kernel and copy waited for inside the timed span
        start = time.perf_counter()
        marks = [start]
        for _ in range(request.steps):
            _add_mean(breakdown, _one_step(engine, x, y, request, run.optim.lr), request.steps)
            marks.append(time.perf_counter())  # after the step's loss sync
        _drain(engine, device)
        step_s = (time.perf_counter() - start) / request.steps
        # each step's own span, from one loss sync to the next (the update it left running
        # beside the next forward falls in the next span): their spread shows a noisy host
        spans = [b - a for a, b in zip(marks, marks[1:])]
        breakdown.update(step_median=statistics.median(spans), step_min=min(spans), step_max=max(spans))
        _add_mean(breakdown, engine.take_phases() if hasattr(engine, "take_phases") else {}, request.steps)
        tokens = micro_batch * request.accum * config.seq_len
        result.step_s = step_s
        result.tok_s = tokens / step_s
        result.tflops = result.tok_s * config.flops_per_token() / 1e12
        stats = engine.stats() if hasattr(engine, "stats") else {}
        if "updates_ended_early" in stats:  # over warm-up and timed steps
            breakdown["updates_ended_early"] = float(stats["updates_ended_early"])
        result.breakdown = breakdown
        if device == "cuda":
            # the chunk runtime resets torch's peak counters as it traces, and keeps the true peak
            result.gpu_peak_gib = max(torch.cuda.max_memory_reserved(), stats.get("allocator_peak_bytes", 0)) / GIB
        else:
            result.gpu_peak_gib = engine.memory()["gpu_peak"] / GIB
        engine.close()
    except torch.OutOfMemoryError as exc:
        from homestar.train.recovery import first_line

        result.status, result.message = "oom", first_line(exc, 200)
    result.cpu_peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    return result


def _one_step(engine, x, y, request: BenchRequest, lr: float) -> dict[str, float]:
    """One optimizer step as the trainer takes it; its timings: the step report's, and the host's
    seconds in forward and backward (`forward_backward`; the device may still be computing)."""
    import torch

    t0 = time.perf_counter()
    losses = [engine.forward_backward(x, y, request.accum) for _ in range(request.accum)]
    t1 = time.perf_counter()
    report = engine.step(lr)
    float(torch.stack(losses).sum())  # note: sync on the losses, as the trainer does once per step
    return {"forward_backward": t1 - t0, **report.timings}


def _add_mean(breakdown: dict[str, float], seconds: dict[str, float], steps: int) -> None:
    """Add each figure's share of the mean over `steps` timed steps."""
    for key, value in seconds.items():
        breakdown[key] = breakdown.get(key, 0.0) + value / steps


def _drain(engine, device: str) -> None:
    """End the last step's update and wait for every queued kernel and copy."""
    if hasattr(engine, "settle"):
        engine.settle()
    if device == "cuda":
        import torch

        torch.cuda.synchronize()  # note: a bench-only sync, at the timed span's ends


def _settling_steps(engine) -> int:
    """Warm-up steps by default: 2, or until an automatic AdamW split stops moving."""
    from homestar.runtime.adam_split import AUTO_SHARE_STEPS

    split = getattr(getattr(engine, "adamw", None), "split", None)
    return AUTO_SHARE_STEPS if split is not None and split.auto else 2


def _engine(request: BenchRequest, model, optim, device: str, precision: str, micro_batch: int):
    if request.system == "torch":
        from homestar.train.torch_engine import TorchEngine

        return TorchEngine(model, optim, device=device, precision=precision)
    from homestar.planner.memory import nonmodel_forecast
    from homestar.runtime import RuntimeConfig, attach

    # reserved until the first trace measures it, as `homestar train` does (train.build)
    forecast = nonmodel_forecast(model.config, device=device, precision=precision, micro_batch=micro_batch,
                                 checkpointing=model.checkpoint_activations)
    config = RuntimeConfig(
        device=device, precision=precision, chunk_elems=request.chunk_elems, nonmodel_estimate_bytes=forecast,
        gpu_budget_bytes=int(request.gpu_mem_gib * GIB) if request.gpu_mem_gib else None,
        cpu_budget_bytes=int(request.cpu_mem_gib * GIB) if request.cpu_mem_gib else None,
        optimizer_stream_share=request.stream_share)
    init_fn = model.initializer() if model.wte.weight.is_meta else None  # the draw right after the seed
    return attach(model, config, optim, init_fn=init_fn)


def format_results(results: list[BenchResult]) -> str:
    first = ("forward", "backward", "forward_backward", "h2d", "d2h", "optimizer")
    lines = [f"{'system':<8} {'preset':<7} {'params':>8} {'status':<6} {'tok/s':>10} {'TFLOP/s':>8} "
             f"{'step s':>8} {'GPU GiB':>8} {'host GiB':>8}  breakdown"]
    for r in results:
        keys = [k for k in first if k in r.breakdown] + [k for k in r.breakdown if k not in first]
        parts = " ".join(f"{k} {r.breakdown[k]:.3f}" for k in keys)
        lines.append(f"{r.system:<8} {r.preset:<7} {r.params / 1e9:>7.2f}B {r.status:<6} {r.tok_s:>10,.0f} "
                     f"{r.tflops:>8.1f} {r.step_s:>8.3f} {r.gpu_peak_gib:>8.2f} {r.cpu_peak_gib:>8.2f}  "
                     f"{parts or r.message}")
    ok = {system: [r.tok_s for r in results if r.system == system and r.status == "ok"] for system in ("torch", "chunked")}
    if ok["torch"] and ok["chunked"]:
        torch_s, chunked_s = statistics.median(ok["torch"]), statistics.median(ok["chunked"])
        runs = len(ok["torch"]) + len(ok["chunked"])
        of = f" (medians of {runs} alternated runs: {chunked_s:,.0f} and {torch_s:,.0f})" if runs > 2 else ""
        lines.append(f"chunked / torch tok/s: {chunked_s / torch_s:.3f}{of}")
    return "\n".join(lines)


if __name__ == "__main__":
    from homestar.errors import HomestarError

    try:
        outcome = _measure(BenchRequest(**json.loads(sys.argv[1])))
    except HomestarError as exc:
        print(f"homestar: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    print(json.dumps(asdict(outcome)), flush=True)
