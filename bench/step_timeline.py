"""When each part of a training step runs, on every thread and on the device: the critical path of
steps taken back to back, as `homestar bench` times them (the update beside the next forward).

    PYTHONPATH=. python bench/step_timeline.py --preset 1.3b --gpu-mem-gib 8 [--micro-batch 2]
        [--steps 3]

Wraps the engine's and the optimizer's methods with host clocks (and, on the compute stream, CUDA
events at forward's start, backward's start and end) and prints, per timed step, every mark in
seconds from that step's start: the main thread's forward, its waits for groups still updating,
backward, the step's norm and launch; the CPU worker's groups; the streamer's queuing and when the
device finished its last streamed copy. Measuring changes little: no syncs are added on the main
thread (the streamer thread waits for its own last event once it has queued everything).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections import defaultdict

import torch

from homestar import bench
from homestar.runtime import engine as engine_mod
from homestar.runtime import optimizer as optimizer_mod
from homestar.runtime import rank_exchange

MARKS: list[tuple[str, str, float, float, dict]] = []
"""(thread, what, host start, host end, details)."""
DEVICE: list[tuple[str, torch.cuda.Event]] = []


def _now() -> float:
    return time.perf_counter()


def _wrap(cls, name: str, what: str, details=None) -> None:
    original = getattr(cls, name)

    def timed(self, *args, **kwargs):
        start = _now()
        try:
            return original(self, *args, **kwargs)
        finally:
            MARKS.append((threading.current_thread().name, what, start, _now(),
                          details(args) if details else {}))

    setattr(cls, name, timed)


def _device_mark(what: str) -> None:
    if torch.cuda.is_available():
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        DEVICE.append((what, event))


def instrument() -> None:
    adamw = optimizer_mod.ChunkAdamW
    _wrap(adamw, "_update", "cpu group", lambda a: {"group": a[0].index})
    _wrap(adamw, "let_go_group", "let go", lambda a: {"group": a[0].group})
    _wrap(adamw, "_total_norm", "norm")
    _wrap(adamw, "_adam_all", "launch")
    _wrap(adamw, "_hold_state", "hold CPU group state")
    _wrap(adamw, "_update_on_device", "device groups' AdamW")
    _wrap(adamw, "_stream_job", "streamed job")
    _wrap(rank_exchange.RankExchange, "stage_grads", "stage grads")
    _wrap(engine_mod.ChunkedEngine, "step", "step")

    forward_backward = engine_mod.ChunkedEngine.forward_backward

    def fb(self, *args, **kwargs):
        start = _now()
        _device_mark("forward starts")
        settle = self.adamw.settle

        def settle_then_mark():
            begun = _now()
            settle()
            MARKS.append((threading.current_thread().name, "forward ends: settle", begun, _now(), {}))
            _device_mark("backward starts")

        self.adamw.settle = settle_then_mark
        try:
            return forward_backward(self, *args, **kwargs)
        finally:
            del self.adamw.settle
            _device_mark("backward ends")
            MARKS.append((threading.current_thread().name, "forward_backward", start, _now(), {}))

    engine_mod.ChunkedEngine.forward_backward = fb

    stream_adamw = optimizer_mod.stream_adamw

    def streamed(jobs, ring, device, **kwargs):
        queued = kwargs.pop("queued", None)
        last = []

        def note(i, event):
            last[:] = [event]
            if queued is not None:
                queued(i, event)

        start = _now()
        done = stream_adamw(jobs, ring, device, queued=note, **kwargs)
        queued_at = _now()
        if last and last[0] is not None and hasattr(last[0], "synchronize"):
            last[0].synchronize()  # the streamer's own wait, after it queued everything
        MARKS.append((threading.current_thread().name, "streamed", start, queued_at,
                      {"device done": _now(), "groups": len(jobs)}))
        return done

    optimizer_mod.stream_adamw = streamed


def report(step_starts: list[float], ref_host: float, ref_event) -> None:
    device_at = []
    if DEVICE:
        torch.cuda.synchronize()
        device_at = [(what, ref_host + ref_event.elapsed_time(event) / 1e3) for what, event in DEVICE]
    summary: dict[str, list[float]] = defaultdict(list)
    for k, (begin, end) in enumerate(zip(step_starts, step_starts[1:]), 1):
        print(f"\n== step {k}: {end - begin:.4f} s ==")
        summary["step length (s)"].append(end - begin)
        rows = []
        launches = sorted(s for _, w, s, _, _ in MARKS if w == "launch")
        before = max((t for t in launches if t < begin), default=begin)
        launched = min((t for t in launches if t >= begin), default=end)
        # the CPU's groups updating beside this forward: the last step's, launched before it began
        cpu = [(s, e, d) for t, w, s, e, d in MARKS if w == "cpu group" and before <= s < launched]
        summed = defaultdict(float)
        for thread, what, s, e, d in MARKS:
            if not begin <= s < end or what == "cpu group":
                continue
            if what in ("hold CPU group state", "streamed job"):
                summed[what] += e - s
                continue
            if what == "let go" and e - s < 5e-4:
                continue
            extra = ""
            if what == "streamed":
                extra = f" device done {d['device done'] - begin:.4f} ({d['groups']} groups)"
                summary["streamed: device done"].append(d["device done"] - begin)
                summary["streamed: queued"].append(e - begin)
            if what == "let go":
                extra = f" group {d['group']}, waited {1e3 * (e - s):.1f} ms"
            rows.append((s - begin, f"{thread[:18]:18} {what:22} {s - begin:7.4f} .. {e - begin:7.4f}{extra}"))
            summary[f"{what} starts"].append(s - begin)
            summary[f"{what} ends"].append(e - begin)
        for what, seconds in summed.items():
            rows.append((end, f"{'MainThread':18} {what:22} {seconds:.4f} s in all"))
            summary[f"{what} (s in all)"].append(seconds)
        if cpu:
            busy = sum(e - s for s, e, _ in cpu)
            first, last = min(s for s, _, _ in cpu), max(e for _, e, _ in cpu)
            rows.append((first, f"{'cpu worker':18} {'cpu groups':22} {first - begin:7.4f} .. {last - begin:7.4f}"
                                f" busy {busy:.4f} s, {len(cpu)} groups"))
            summary["cpu groups start"].append(first - begin)
            summary["cpu groups end"].append(last - begin)
            summary["cpu groups busy (s)"].append(busy)
        for what, at in device_at:
            if begin <= at < end + 0.5 and not (what == "forward starts" and at > end):
                rows.append((at - begin, f"{'device':18} {what:22} {at - begin:7.4f}"))
                summary[f"device {what}"].append(at - begin)
        for _, line in sorted(rows):
            print(line)
    print("\n== medians over the steps (s from the step's start) ==")
    for what, values in sorted(summary.items(), key=lambda kv: statistics.median(kv[1])):
        print(f"{what:32} {statistics.median(values):7.4f}  ({len(values)})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="1.3b")
    parser.add_argument("--gpu-mem-gib", type=float, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (with --seq-len small)")
    parser.add_argument("--seq-len", type=int, default=None)
    args = parser.parse_args()
    request = bench.BenchRequest(preset=args.preset, device=args.device, gpu_mem_gib=args.gpu_mem_gib,
                                 micro_batch=args.micro_batch, seq_len=args.seq_len, steps=args.steps)
    run = bench.resolve(request)
    engine, x, y = bench.build(request, run)
    for _ in range(bench._settling_steps(engine)):
        bench._one_step(engine, x, y, request, run.optim.lr)
    bench._drain(engine, run.device)
    instrument()
    ref_event = None
    if torch.cuda.is_available():
        ref_event = torch.cuda.Event(enable_timing=True)
        ref_event.record()
        ref_event.synchronize()
    ref_host = _now()
    starts = []
    for _ in range(args.steps + 2):  # the last step's start ends the one before it
        starts.append(_now())
        bench._one_step(engine, x, y, request, run.optim.lr)
    bench._drain(engine, run.device)
    report(starts[1:], ref_host, ref_event)  # the first step has no update beside its forward
    adamw = engine.adamw
    print(f"\nstreamed groups {adamw.streamed_groups()}; device groups "
          f"{[g.index for g in adamw.groups if g.optimizer_on_device]}; {len(adamw.groups)} groups")
    print({k: v for k, v in engine.stats().items() if not isinstance(v, (list, dict))})
    engine.close()


if __name__ == "__main__":
    main()
