"""Speed floors of the reference GPU machine for each preset at a GPU budget, from its ceilings.

    python bench/floors.py --budgets 8 24 [--micro-batch 2] [--accum 1]

For seq 1024, bf16, activation checkpointing and micro-batch x accumulation sequences per step, it
takes the planner's steady placement (which chunk groups' whole state lives on the GPU; the rest
stream) and prices one optimizer step against the measured ceilings of one H200 with 16 cores:
- compute: FLOPs per token (6 per parameter plus attention) x 4/3 (checkpointing recomputes the
  forward) at 790 TFLOP/s of dense bf16 matmul;
- PCIe: each streamed parameter crosses to the GPU twice per micro-batch in bf16 (forward, and
  recompute + backward) and its bf16 grad comes back once per micro-batch; the two directions run
  at once at 48 GB/s each;
- AdamW of the streamed parameters: on the CPU alone (torch's fused AdamW: 4.7 G params/s with
  PCIe idle, as when it runs after backward), or split between the CPU (2.7 G params/s while PCIe
  copies run) and the GPU streaming the state through PCIe (12 bytes each way per parameter at
  42.5 GB/s: 3.5 G params/s), both at once; resident groups' AdamW on the GPU at 122 G params/s.
It prints the floors in seconds and the tok/s each allows: "overlapped" (every engine busy at once:
the step takes the longest of them) and "serial" (forward+backward, then the optimizer: what the
runtime does today). No measurement here: these bound what any system can do on that machine.
"""

from __future__ import annotations

import argparse

from homestar.model import load_preset
from homestar.planner import estimate, fit

GIB = 2**30
MATMUL_FLOPS = 790e12
PCIE_BOTH_WAYS = 48e9
PCIE_UNDER_ADAM = 42.5e9
CPU_ADAM_BUSY = 2.7e9
CPU_ADAM_ALONE = 4.7e9
GPU_ADAM = 122e9
HOST_BYTES = 125 * GIB


def floors(name: str, budget_gib: float, micro_batch: int, accum: int) -> dict:
    preset = load_preset(name)
    config = preset.model
    est = estimate(config, precision="bf16", micro_batch=micro_batch, gpu_budget=int(budget_gib * GIB))
    placed = fit(est, gpu_budget=int(budget_gib * GIB), host_budget=HOST_BYTES)
    params = config.num_params()
    tokens = micro_batch * accum * config.seq_len
    streamed = min(placed.streamed_elems, params) if placed is not None else params  # chunks hold padding
    resident = max(params - streamed, 0)
    compute = tokens * config.flops_per_token() * 4 / 3 / MATMUL_FLOPS
    # bytes per streamed parameter and micro-batch on the busier direction: host to device (two bf16
    # fetches, 4 bytes) bounds it against the one bf16 grad coming back (2 bytes)
    pcie = accum * 4 * streamed / PCIE_BOTH_WAYS
    cpu_adam = streamed / CPU_ADAM_ALONE
    gpu_stream_rate = PCIE_UNDER_ADAM / 12
    both_adam = streamed / (CPU_ADAM_BUSY + gpu_stream_rate)
    gpu_adam = resident / GPU_ADAM
    overlapped = max(compute, pcie, both_adam + gpu_adam)
    serial = max(compute, pcie) + both_adam + gpu_adam
    serial_cpu_only = max(compute, pcie) + cpu_adam + gpu_adam
    return {"preset": name, "budget": budget_gib, "params": params, "streamed": streamed / params,
            "fits": placed is not None, "compute": compute, "pcie": pcie, "cpu_adam": cpu_adam,
            "both_adam": both_adam, "overlapped": tokens / overlapped, "serial": tokens / serial,
            "serial_cpu_only": tokens / serial_cpu_only,
            "bound": max((("compute", compute), ("PCIe", pcie), ("AdamW", both_adam + gpu_adam)), key=lambda kv: kv[1])[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", type=float, nargs="+", default=[8.0, 24.0])
    parser.add_argument("--presets", nargs="+", default=["350m", "0.7b", "1.3b", "2.7b", "4b", "6.7b"])
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--accum", type=int, default=1)
    args = parser.parse_args()
    print(f"seq 1024, bf16, checkpointing, {args.micro_batch} x {args.accum} sequences per step")
    print("preset  GiB  params  streamed  compute s  PCIe s  CPU AdamW s  CPU+GPU AdamW s  "
          "tok/s overlapped  serial  serial, CPU AdamW only  bound")
    for budget in args.budgets:
        for name in args.presets:
            f = floors(name, budget, args.micro_batch, args.accum)
            print(f"{f['preset']:6} {f['budget']:4g} {f['params'] / 1e9:6.2f}B {f['streamed']:8.0%} {f['compute']:10.3f}"
                  f" {f['pcie']:7.3f} {f['cpu_adam']:12.3f} {f['both_adam']:16.3f} {f['overlapped']:17,.0f}"
                  f" {f['serial']:7,.0f} {f['serial_cpu_only']:23,.0f}  {f['bound']}")


if __name__ == "__main__":
    main()
