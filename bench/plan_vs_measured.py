"""Compare the planner's predicted GPU and host peaks with what `homestar bench` measures.

For each preset and GPU budget, take the plan's own settings (micro-batch, chunk size, host chunk
budget), run the chunk runtime on synthetic tokens, and print predicted vs measured peaks, their
ratio (measured / predicted) and a verdict against the bars: GPU within 10% and under the cap
(`--gpu-mem-gib` caps torch's allocator, the CUDA context outside it), host within 15%. The
plan's chunk size is the one the runtime would pick itself for the same GPU budget.

    python bench/plan_vs_measured.py --budgets 8 24 --presets 350m 0.7b 1.3b 2.7b 4b 6.7b
    python bench/plan_vs_measured.py --device cpu --budgets 0.05 --presets debug --steps 2   # smoke test

`--cpu-mem-gib X` makes the plan for a machine of X GiB of RAM rather than the detected one (for a
machine whose detected memory is not what it can give, or to reproduce another machine's plan).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def homestar(*args: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "homestar", *args], capture_output=True, text=True)
    text = out.stdout.strip()
    if out.returncode != 0 and not text.startswith(("[", "{")):  # bench prints failed results too
        return [{"status": "error", "message": (out.stderr.strip().splitlines() or ["?"])[-1]}]
    return json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines()]


def planned(budgets: list[float], presets: list[str], device: str, cpu_mem_gib: float | None):
    """(budget, preset, plan) of each preset `homestar plan` says fits each GPU budget, planned
    for `cpu_mem_gib` of host memory (None: the detected amount); the others are said and left."""
    host = [] if cpu_mem_gib is None else ["--cpu-mem-gib", str(cpu_mem_gib)]
    for budget in budgets:
        listed = homestar("plan", "--device", device, "--gpu-mem-gib", str(budget), *host, "--json")
        if listed and listed[0].get("status") == "error":
            print(f"plan at {budget:g} GiB failed: {listed[0]['message']}", flush=True)
            continue
        plans = {p["preset"]: p for p in listed}
        for name in presets:
            plan = plans.get(name)
            if plan is None or plan.get("fits") == "no":
                print(f"{name:6} {budget:6g} {plan and plan.get('fits')}: skipped (the plan says it does not fit)")
                continue
            yield budget, name, plan


def bench_flags(name: str, plan: dict, budget: float, device: str, steps: int) -> list[str]:
    """`homestar bench` with the plan's micro-batch and chunk size (and host chunk budget)."""
    flags = ["bench", "--json", "--preset", name, "--device", device, "--gpu-mem-gib", str(budget),
             "--micro-batch", str(plan["micro_batch"]), "--chunk-elems", str(plan["chunk_elems"]), "--steps", str(steps)]
    if plan.get("host_chunk_gib"):  # bench's --cpu-mem-gib is the chunks' budget
        flags += ["--cpu-mem-gib", str(plan["host_chunk_gib"])]
    return flags


GPU_BAR = 0.10
HOST_BAR = 0.15


def ratio(measured: float, predicted: float) -> float | None:
    return measured / predicted if predicted > 0 else None


def verdict(result: dict, budget: float, gpu_x: float | None, host_x: float | None, device: str) -> str:
    """"ok" when every bar holds, else what missed it."""
    if result.get("status") != "ok":
        return f"{result.get('status')} {result.get('message', '')}".strip()
    misses = []
    if device == "cuda":
        if gpu_x is None or abs(gpu_x - 1) > GPU_BAR:
            misses.append(f"gpu off by more than {GPU_BAR:.0%}")
        if result.get("gpu_peak_gib", 0) > budget:
            misses.append("gpu over the cap")
    if host_x is None or abs(host_x - 1) > HOST_BAR:
        misses.append(f"host off by more than {HOST_BAR:.0%}")
    return "ok" if not misses else "MISS: " + ", ".join(misses)


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", type=float, nargs="+", default=[8.0, 24.0])
    parser.add_argument("--presets", nargs="+", default=["350m", "0.7b", "1.3b", "2.7b", "4b", "6.7b"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cpu-mem-gib", type=float, default=None,
                        help="plan for this much host memory (GiB) instead of the detected amount")
    args = parser.parse_args()
    print("preset budget fits  mb       chunk  gpu_pred gpu_meas  gpu_x  host_pred host_meas host_x   tok_s  verdict")
    for budget, name, plan in planned(args.budgets, args.presets, args.device, args.cpu_mem_gib):
        result = homestar(*bench_flags(name, plan, budget, args.device, args.steps), "--warmup", "1")[0]
        gpu_meas, host_meas = result.get("gpu_peak_gib", 0), result.get("cpu_peak_gib", 0)
        gpu_x = ratio(gpu_meas, plan["gpu_peak_gib"]) if args.device == "cuda" else None
        host_x = ratio(host_meas, plan["cpu_peak_gib"])
        print(f"{name:6} {budget:6g} {plan['fits']:5} {plan['micro_batch']:3d} {plan['chunk_elems']:11d} {plan['gpu_peak_gib']:8.2f} "
              f"{gpu_meas:8.2f} {fmt_ratio(gpu_x):>6}  {plan['cpu_peak_gib']:9.2f} {host_meas:9.2f} "
              f"{fmt_ratio(host_x):>6}  {result.get('tok_s', 0):6.0f}  "
              f"{verdict(result, budget, gpu_x, host_x, args.device)}", flush=True)


if __name__ == "__main__":
    main()
