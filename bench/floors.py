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
  42.5 GB/s: 3.5 G params/s), both at once; resident groups' AdamW on the GPU at 122 G params/s;
- host memory: every byte of AdamW's state and every copy to or from the GPU goes through the
  host's memory, 135 GB/s in all when both AdamW engines run at once (`bench/host_contention.py`:
  4.7-4.85 G params/s of AdamW whatever the split, 28 bytes each: bf16 grad read and bf16 param
  written, fp32 master and moments read and written). A streamed parameter costs 28 bytes per
  step for AdamW and 6 per micro-batch (two bf16 fetches, one bf16 grad drained), plus 2 more per
  micro-batch after the first (its grad comes back to accumulate); the split AdamW is the slower
  of the engines' rates and this bandwidth.
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
HOST_MEMORY = 135e9
ADAM_HOST_BYTES = 28
HOST_BYTES = 125 * GIB


def floors(name: str, budget_gib: float, micro_batch: int, accum: int) -> dict:
    preset = load_preset(name)
    config = preset.model
    budget = int(budget_gib * GIB)
    est = estimate(config, precision="bf16", micro_batch=micro_batch, gpu_budget=budget)
    # `--gpu-mem-gib` gives the runtime the whole budget, the CUDA context outside it
    placed = fit(est, gpu_budget=budget + est.context, host_budget=HOST_BYTES, runtime_gpu_budget=budget)
    params = config.num_params()
    tokens = micro_batch * accum * config.seq_len
    streamed = min(placed.streamed_elems, params) if placed is not None else params  # chunks hold padding
    resident = max(params - streamed, 0)
    compute = tokens * config.flops_per_token() * 4 / 3 / MATMUL_FLOPS
    # this placement's copies: param chunks of host-homed groups that stay cached cross once per
    # step (after their update), the others twice per micro-batch (forward; recompute and
    # backward); host-homed grads drain once per micro-batch and, after the first, come back to
    # accumulate. Both directions at once: the busier one bounds.
    param = placed.streamed.param if placed is not None else 2 * params
    cached = placed.cached_param_bytes if placed is not None else 0
    up = accum * 2 * (param - cached) + cached + (accum - 1) * param
    down = accum * param
    pcie = max(up, down) / PCIE_BOTH_WAYS
    cpu_adam = streamed / CPU_ADAM_ALONE
    gpu_stream_rate = PCIE_UNDER_ADAM / 12
    both_adam = max(streamed / (CPU_ADAM_BUSY + gpu_stream_rate), streamed * ADAM_HOST_BYTES / HOST_MEMORY)
    gpu_adam = resident / GPU_ADAM
    copies = (up + down) / HOST_MEMORY  # every copy reads or writes host memory
    host = streamed * ADAM_HOST_BYTES / HOST_MEMORY + copies
    overlapped = max(compute, pcie, host, both_adam + gpu_adam)
    serial = max(compute, pcie) + both_adam + gpu_adam
    serial_cpu_only = max(compute, pcie) + cpu_adam + gpu_adam
    parts = (("compute", compute), ("PCIe", pcie), ("host memory", host), ("AdamW", both_adam + gpu_adam))
    return {"preset": name, "budget": budget_gib, "params": params, "streamed": streamed / params,
            "fits": placed is not None, "compute": compute, "pcie": pcie, "host": host, "cpu_adam": cpu_adam,
            "both_adam": both_adam, "overlapped": tokens / overlapped, "serial": tokens / serial,
            "serial_cpu_only": tokens / serial_cpu_only, "bound": max(parts, key=lambda kv: kv[1])[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", type=float, nargs="+", default=[8.0, 24.0])
    parser.add_argument("--presets", nargs="+", default=["350m", "0.7b", "1.3b", "2.7b", "4b", "6.7b"])
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--accum", type=int, default=1)
    args = parser.parse_args()
    print(f"seq 1024, bf16, checkpointing, {args.micro_batch} x {args.accum} sequences per step")
    print("preset  GiB  params  streamed  compute s  PCIe s  host mem s  CPU AdamW s  CPU+GPU AdamW s  "
          "tok/s overlapped  serial  serial, CPU AdamW only  bound")
    for budget in args.budgets:
        for name in args.presets:
            f = floors(name, budget, args.micro_batch, args.accum)
            print(f"{f['preset']:6} {f['budget']:4g} {f['params'] / 1e9:6.2f}B {f['streamed']:8.0%} {f['compute']:10.3f}"
                  f" {f['pcie']:7.3f} {f['host']:11.3f} {f['cpu_adam']:12.3f} {f['both_adam']:16.3f} {f['overlapped']:17,.0f}"
                  f" {f['serial']:7,.0f} {f['serial_cpu_only']:23,.0f}  {f['bound']}")


if __name__ == "__main__":
    main()
