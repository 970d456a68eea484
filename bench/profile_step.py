"""Where one training step's time goes: the host's Python work, its waits, and the GPU's kernels
and copies, for a preset at a GPU budget (what `homestar bench` times, taken apart).

    PYTHONPATH=. python bench/profile_step.py --preset 1.3b --gpu-mem-gib 8 [--micro-batch 2]
        [--warmup 8] [--steps 4] [--trace DIR]

After the warm-up (the automatic AdamW split settled), it times `--steps` steps as bench does,
then runs one more under cProfile (the host's functions by their own time and by cumulative time:
hooks, placement, waits) and one under torch.profiler (kernels and copies on the GPU, and the
host's time in torch's ops). `--trace DIR` also writes that step's Chrome trace there, gzipped.
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import io
import os
import pstats
import shutil
import statistics
import time

import torch

from homestar import bench


def setup(args):
    """The engine and micro-batch `homestar bench` would time for these arguments, and the lr."""
    request = bench.BenchRequest(preset=args.preset, device=args.device, gpu_mem_gib=args.gpu_mem_gib,
                                 micro_batch=args.micro_batch, seq_len=args.seq_len)
    run = bench.resolve(request)
    engine, x, y = bench.build(request, run)
    return engine, x, y, run.optim.lr


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step(engine, x, y, lr) -> tuple[float, float, float]:
    sync()
    t0 = time.perf_counter()
    loss = engine.forward_backward(x, y, 1)
    host_fb = time.perf_counter() - t0  # the host's part: until forward_backward returns
    sync()
    t1 = time.perf_counter()
    engine.step(lr)
    float(loss)
    sync()
    return (t1 - t0, time.perf_counter() - t1, host_fb)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="1.3b")
    parser.add_argument("--gpu-mem-gib", type=float, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--trace", default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (--seq-len small)")
    parser.add_argument("--seq-len", type=int, default=None)
    args = parser.parse_args()
    engine, x, y, lr = setup(args)
    for _ in range(args.warmup):
        step(engine, x, y, lr)
    timed = [step(engine, x, y, lr) for _ in range(args.steps)]
    # on one process the step's AdamW runs beside the next forward: "forward+backward" holds the
    # part of the last update the forward waited for, "optimizer" the step's host time and its
    # device work queued by the time the sync after it was called
    for name, pos in (("forward+backward", 0), ("optimizer", 1), ("host returns from forward+backward", 2)):
        values = [t[pos] for t in timed]
        print(f"{name:36} median {statistics.median(values):.4f} s  ({' '.join(f'{v:.4f}' for v in values)})")

    prof = cProfile.Profile()
    sync()
    prof.enable()
    begin = time.perf_counter()
    engine.forward_backward(x, y, 1)
    sync()
    prof.disable()
    print(f"\n== cProfile of one forward+backward ({time.perf_counter() - begin:.4f} s with the profiler) ==")
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(28)
        lines = out.getvalue().splitlines()
        start = next(i for i, line in enumerate(lines) if "ncalls" in line)
        print(f"-- by {key} --")
        print("\n".join(line[:150] for line in lines[start:start + 29]))
    engine.step(lr)
    sync()

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as tprof:
        step(engine, x, y, lr)
    print("\n== torch.profiler, one step: by device time ==")
    print(tprof.key_averages().table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60))
    print("== by host (self CPU) time ==")
    print(tprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    if args.trace:
        os.makedirs(args.trace, exist_ok=True)
        path = os.path.join(args.trace, f"{args.preset}_step.json")
        tprof.export_chrome_trace(path)
        with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(path)
    print(engine.stats())
    engine.close()


if __name__ == "__main__":
    main()
