"""Speed of every preset at the plan's own settings, against the machine's floors.

For each GPU budget and preset: the plan (`homestar plan`) gives micro-batch, accumulation and
chunk size; `homestar bench` trains with them on synthetic tokens; `floors.py` prices the same
step on the reference machine's ceilings. One row each: tok/s, TFLOP/s (model FLOPs, recompute
not counted), the step's parts, peaks, the floors (every engine overlapped; forward and backward
then the optimizer, as the runtime runs) and what bounds the step.

    python bench/speed_table.py --budgets 8 24 --cpu-mem-gib 120 --warmup 4 --steps 2
    python bench/speed_table.py --device cpu --budgets 0.05 --presets debug --steps 1 --warmup 0  # smoke test

`--accum 1` keeps the plan's micro-batch without accumulation (one optimizer step per micro-batch).
"""

from __future__ import annotations

import argparse

from floors import floors
from plan_vs_measured import bench_flags, homestar, planned


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", type=float, nargs="+", default=[8.0, 24.0])
    parser.add_argument("--presets", nargs="+", default=["350m", "0.7b", "1.3b", "2.7b", "4b", "6.7b"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default: bench's own)")
    parser.add_argument("--accum", choices=["plan", "1"], default="plan")
    parser.add_argument("--cpu-mem-gib", type=float, default=None,
                        help="plan for this much host memory (GiB) instead of the detected amount")
    args = parser.parse_args()
    print("preset   GiB  mb x acc    tok/s  TFLOP/s  step s  fwd+bwd s  optim s  GPU GiB  host GiB"
          "  floor tok/s: overlapped / serial  measured/serial  bound")
    for budget, name, plan in planned(args.budgets, args.presets, args.device, args.cpu_mem_gib):
        accum = plan["accum"] if args.accum == "plan" else 1
        flags = [*bench_flags(name, plan, budget, args.device, args.steps), "--accum", str(accum)]
        if args.warmup is not None:
            flags += ["--warmup", str(args.warmup)]
        r = homestar(*flags)[0]
        if r.get("status") != "ok":
            print(f"{name:6} {budget:5g}  {r.get('status')}: {r.get('message', '')}", flush=True)
            continue
        f = floors(name, budget, plan["micro_batch"], accum)
        parts = r.get("breakdown", {})
        print(f"{name:6} {budget:5g} {plan['micro_batch']:3d} x {accum:<3d} {r['tok_s']:8,.0f} {r['tflops']:8.1f}"
              f" {r['step_s']:7.3f} {parts.get('forward_backward', 0):10.3f} {parts.get('optimizer', 0):8.3f}"
              f" {r['gpu_peak_gib']:8.2f} {r['cpu_peak_gib']:9.2f}  {f['overlapped']:14,.0f} / {f['serial']:8,.0f}"
              f"  {r['tok_s'] / f['serial']:15.2f}  {f['bound']}", flush=True)


if __name__ == "__main__":
    main()
