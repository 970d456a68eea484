"""The command line: `homestar [train|resume|runs|plan|sample|bench|export]`, and the headless printer.

Parses flags, calls into train/ and planner/, and turns every HomestarError into one line on
stderr and a non-zero exit. Heavy imports (torch, the app) happen inside the commands.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable

from homestar.errors import HomestarError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (SPEC: one-line reason, non-zero exit)."""

    def error(self, message: str):
        self.exit(2, f"homestar: error: {message} (see `{self.prog} --help`)\n")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected zero or a positive whole number, got {value}")
    return value


def _bounded_float(text: str, *, within: Callable[[float], bool], number: str, bounded: str) -> float:
    """`text` as a float for which `within` holds; `number` and `bounded` name what was expected
    when it is not a number, or is out of bounds (nan fails every comparison, so it is refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {number}, got {text!r}") from None
    if not within(value):
        raise argparse.ArgumentTypeError(f"expected {bounded}, got {text}")
    return value


def _positive_float(text: str, unit: str = "number") -> float:
    return _bounded_float(text, within=lambda v: 0 < v < math.inf, number=f"a {unit}", bounded=f"a positive {unit}")


def _share(text: str) -> float:
    fraction = "a fraction between 0 and 1"
    return _bounded_float(text, within=lambda v: 0 <= v <= 1, number=fraction, bounded=fraction)


def _gib(text: str) -> float:
    return _positive_float(text, "number of GiB")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="homestar", description="Train GPT models larger than your GPU's memory.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    train = sub.add_parser("train", help="start a training run")
    train.add_argument("--preset", default="auto", help="preset name, or auto (the plan's recommendation)")
    train.add_argument("--data", default=None, help="a folder or file of .txt/.md/.jsonl/.parquet, or a dataset name (default: the embedded corpus)")
    train.add_argument("--tokenizer", default=None, help="a tokenizer.json to use instead of training one")
    train.add_argument("--steps", type=_positive_int, default=1000, help="optimizer steps to train to")
    train.add_argument("--run-dir", default=None, help="where to keep the run (default: under $HOMESTAR_HOME/runs)")
    _add_machine_flags(train)
    train.add_argument("--micro-batch", type=_positive_int, default=None)
    train.add_argument("--accum", type=_positive_int, default=None, help="micro-batches per optimizer step")
    train.add_argument("--seq-len", type=_positive_int, default=None)
    train.add_argument("--save-every", type=_non_negative_int, default=100, help="checkpoint every N steps (0: only at the end)")
    train.add_argument("--eval-every", type=_non_negative_int, default=50)
    train.add_argument("--sample-every", type=_non_negative_int, default=100)
    train.add_argument("--seed", type=_non_negative_int, default=1337)
    train.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto")
    train.add_argument("--runtime", choices=("chunked", "torch"), default="chunked")
    train.add_argument("--lr", type=_positive_float, default=None, help="peak learning rate (default: the preset's)")
    train.add_argument("--decay-steps", type=_positive_int, default=None, help="cosine horizon (default: max(5000, steps))")
    train.add_argument("--chunk-elems", type=_positive_int, default=None, help="elements per chunk (default: chosen)")
    train.add_argument("--headless", action="store_true", help="print progress lines instead of opening the app")
    train.add_argument("--init-from", default=None, metavar="DIR",
                       help="start from a local Hugging Face GPT-2 folder (its shape, weights and tokenizer; "
                            "training defaults of the nearest preset; not with --preset)")

    resume = sub.add_parser("resume", help="continue a saved run exactly")
    resume.add_argument("run_dir")
    resume.add_argument("--steps", type=_positive_int, default=None, help="new total number of steps")
    resume.add_argument("--headless", action="store_true")

    sub.add_parser("runs", help="list saved runs")

    plan = sub.add_parser("plan", help="which presets fit this machine (or the given budgets)")
    _add_machine_flags(plan)
    plan.add_argument("--json", action="store_true", help="a JSON list, one object per preset")

    bench = sub.add_parser("bench", help="time training steps on synthetic tokens")
    bench.add_argument("--preset", default="125m")
    _add_machine_flags(bench, cpu_help="host memory for the chunks (a plan's host_chunk_gib); the process adds its own")
    bench.add_argument("--micro-batch", type=_positive_int, default=None)
    bench.add_argument("--accum", type=_positive_int, default=1)
    bench.add_argument("--seq-len", type=_positive_int, default=None)
    bench.add_argument("--steps", type=_positive_int, default=5, help="timed steps (after the warm-up steps)")
    bench.add_argument("--warmup", type=_non_negative_int, default=None,
                       help="untimed steps first (default 2; 8 when AdamW is split between the CPU and the GPU, "
                            "until the split has settled)")
    bench.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto")
    bench.add_argument("--runtime", choices=("chunked", "torch"), default="chunked")
    bench.add_argument("--chunk-elems", type=_positive_int, default=None)
    bench.add_argument("--stream-share", type=_share, default=None,
                       help="fraction of host-held AdamW streamed through the GPU (default: the runtime's)")
    bench.add_argument("--no-checkpointing", action="store_true",
                       help="keep every block's activations instead of recomputing them (default on GPUs: recompute)")
    bench.add_argument("--baseline", action="store_true", help="also run plain PyTorch and print the ratio")
    bench.add_argument("--rounds", type=_positive_int, default=1,
                       help="run each system this many times, alternating with --baseline; the ratio is of medians")
    bench.add_argument("--json", action="store_true", help="one JSON object per system")

    sample = sub.add_parser("sample", help="generate text from a run's latest checkpoint")
    sample.add_argument("run_dir")
    sample.add_argument("--prompt", required=True)
    sample.add_argument("--tokens", type=_positive_int, default=100)
    sample.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    sample.add_argument("--top-k", type=_positive_int, default=40)
    sample.add_argument("--seed", type=_non_negative_int, default=0)
    sample.add_argument("--device", choices=("auto", "cuda", "cpu"), default="cpu")

    export = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face transformers GPT-2 folder")
    export.add_argument("run_dir")
    export.add_argument("out_dir", help="a new (or empty) folder")
    export.add_argument("--step", type=_positive_int, default=None, help="checkpoint step (default: the latest)")
    export.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weights' dtype in the file")
    return parser


def _add_machine_flags(parser: argparse.ArgumentParser,
                       cpu_help: str = "host memory homestar may use, pinned included") -> None:
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--gpu-mem-gib", type=_gib, default=None,
                        help="GPU memory homestar may use (on the CPU: the simulated device's size)")
    parser.add_argument("--cpu-mem-gib", type=_gib, default=None, help=cpu_help)


def main(argv: list[str] | None = None) -> int:
    import os
    import warnings

    # Growable GPU memory segments, set before torch starts CUDA (it reads this then): chunk
    # streaming allocates and frees blocks of hundreds of MiB on several streams, which
    # fragments fixed segments. A user's own PYTORCH_CUDA_ALLOC_CONF wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    warnings.showwarning = _one_line_warning
    try:
        if args.command is None:
            return _app(parser)
        handler = {"train": _train, "resume": _resume, "runs": _runs, "sample": _sample, "bench": _bench,
                   "plan": _plan, "export": _export}[args.command]
        return handler(args) or 0
    except HomestarError as exc:
        print(f"homestar: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("homestar: interrupted", file=sys.stderr)
        return 130
    except MemoryError as exc:  # host RAM (or, via the check below, GPU memory) ran out
        from homestar.train.recovery import first_line  # imports no torch

        print(f"homestar: error: out of memory: {first_line(exc, 200)}; the run keeps its last checkpoint "
              "(try a smaller --micro-batch or preset)", file=sys.stderr)
        return 3
    except RuntimeError as exc:
        from homestar.train.recovery import first_line, is_out_of_memory  # the check imports torch

        if not is_out_of_memory(exc):
            raise
        host = any(word in str(exc).lower() for word in ("pinned", "cudahost"))  # page-locked host memory
        where, hint = ("host", "--cpu-mem-gib or preset") if host else ("GPU", "--gpu-mem-gib")
        print(f"homestar: error: out of {where} memory ({first_line(exc, 200)}); the run keeps its last checkpoint "
              f"(try a smaller --micro-batch or {hint})", file=sys.stderr)
        return 3


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"homestar: warning: {message}", file=sys.stderr)


def _app(parser) -> int:
    try:
        from homestar.tui import run_app
    except ImportError:
        parser.print_help()
        return 0
    return run_app() or 0


def _console_sinks(args) -> list:
    from homestar.train.events import ConsoleSink

    return [ConsoleSink()]


def _wants_app(args) -> bool:
    """The app opens unless --headless was given or there is no terminal to draw on."""
    if args.headless or not (sys.stdin.isatty() and sys.stdout.isatty()):
        return False
    try:
        import homestar.tui  # noqa: F401
    except ImportError:
        return False
    return True


def _train(args) -> int:
    from homestar.train.session import TrainRequest, start_run

    if _wants_app(args):
        from homestar.tui import run_app

        return run_app(train_argv=args.argv[1:])  # no --headless there: _wants_app said no to it

    request = TrainRequest(
        preset=args.preset, data=args.data, tokenizer=args.tokenizer, steps=args.steps, run_dir=args.run_dir,
        device=args.device, gpu_mem_gib=args.gpu_mem_gib, cpu_mem_gib=args.cpu_mem_gib,
        micro_batch=args.micro_batch, accum=args.accum, seq_len=args.seq_len, save_every=args.save_every,
        eval_every=args.eval_every, sample_every=args.sample_every, seed=args.seed, precision=args.precision,
        runtime=args.runtime, lr=args.lr, decay_steps=args.decay_steps, chunk_elems=args.chunk_elems,
        init_from=args.init_from,
    )
    session = start_run(request, _console_sinks(args))
    session.run()
    return 0


def _resume(args) -> int:
    from homestar.train.session import resume_run

    if _wants_app(args):
        from homestar.tui import run_app

        return run_app(resume_dir=Path(args.run_dir), resume_steps=args.steps)

    session = resume_run(Path(args.run_dir), _console_sinks(args), steps=args.steps)
    session.run()
    return 0


def _runs(args) -> int:
    from homestar.paths import runs_dir
    from homestar.train.runs import list_runs

    runs = list_runs(runs_dir())
    if not runs:
        print(f"no runs yet under {runs_dir()}")
        return 0
    header = f"{'name':<32} {'preset':<8} {'step':>8} {'loss':>8} {'status':<12} resumable"
    print(header)
    for r in runs:
        loss = f"{r.loss:.4f}" if r.loss is not None else "-"
        print(f"{r.name:<32} {r.preset:<8} {r.step:>8} {loss:>8} {r.status:<12} {'yes' if r.resumable else 'no'}")
    return 0


def _plan(args) -> int:
    import json

    from homestar.planner import format_table, make_plan, plans_json, probe
    from homestar.paths import runs_dir

    machine = probe(runs_dir())
    plans = make_plan(machine, gpu_mem_gib=args.gpu_mem_gib, cpu_mem_gib=args.cpu_mem_gib, device=args.device)
    print(json.dumps(plans_json(plans), indent=1) if args.json else format_table(plans, machine))
    return 0


def _bench(args) -> int:
    import json
    from dataclasses import asdict

    from homestar.bench import BenchRequest, format_results, run_bench
    from homestar.model import load_preset

    load_preset(args.preset)  # an unknown name fails here, in one line, not in a child process
    request = BenchRequest(preset=args.preset, system=args.runtime, device=args.device, gpu_mem_gib=args.gpu_mem_gib,
                           cpu_mem_gib=args.cpu_mem_gib, micro_batch=args.micro_batch, accum=args.accum,
                           seq_len=args.seq_len, steps=args.steps, warmup=args.warmup, precision=args.precision,
                           chunk_elems=args.chunk_elems, stream_share=args.stream_share,
                           activation_checkpointing=False if args.no_checkpointing else None)
    results = run_bench(request, baseline=args.baseline, rounds=args.rounds)
    if args.json:
        for r in results:
            print(json.dumps(asdict(r)))
    else:
        print(format_results(results))
    return 0 if all(r.status != "error" for r in results) else 1


def _sample(args) -> int:
    from homestar.train.generate import generate_from_run

    text = generate_from_run(Path(args.run_dir), args.prompt, tokens=args.tokens, temperature=args.temperature,
                             top_k=args.top_k, seed=args.seed, device=args.device)
    print(args.prompt + text)
    return 0


def _export(args) -> int:
    from homestar.hf import export_run

    done = export_run(Path(args.run_dir), Path(args.out_dir), step=args.step, dtype=args.dtype)
    print(f"exported step {done.step} ({done.params / 1e6:,.1f}M params, {args.dtype}) to {done.path}; "
          "load it with transformers' GPT2LMHeadModel.from_pretrained and AutoTokenizer.from_pretrained")
    return 0


if __name__ == "__main__":
    sys.exit(main())
