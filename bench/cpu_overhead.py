"""The runtime's own per-step cost where the model fits: a 24-layer GPT too small for compute to
matter, on the CPU, plain PyTorch against the chunk runtime with every chunk on the (simulated)
device, so the difference is the runtime's bookkeeping.

    python bench/cpu_overhead.py [--checkpointing] [--streaming] [--steps 30]

`--streaming` gives the runtime a device budget of a few chunks instead, with every group's
optimizer on the host, so param chunks are fetched and grads drained as modules run (what a model
larger than the card does each micro-batch). Prints milliseconds of forward+backward (median,
fastest, quarter point) and of the optimizer step (median) for both.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from homestar.model import GPT, GPTConfig
from homestar.optim import OptimConfig
from homestar.runtime import RuntimeConfig, attach
from homestar.train.torch_engine import TorchEngine


def timed(engine, steps: int) -> tuple[list[float], float]:
    x = torch.randint(256, (1, 16), generator=torch.Generator().manual_seed(0))
    fwd_bwd, step = [], []
    for _ in range(steps):
        begin = time.perf_counter()
        engine.forward_backward(x, x, 1)
        middle = time.perf_counter()
        engine.step(1e-3)
        fwd_bwd.append(middle - begin)
        step.append(time.perf_counter() - middle)
    skip = min(5, steps // 2)  # the first steps trace and re-plan
    return sorted(t * 1e3 for t in fwd_bwd[skip:]), statistics.median(step[skip:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--streaming", action="store_true")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = GPTConfig(vocab_size=256, seq_len=16, n_layer=24, n_head=2, d_model=64)
    torch.manual_seed(0)
    plain = TorchEngine(GPT(config, checkpoint_activations=args.checkpointing), OptimConfig(lr=1e-3),
                        device="cpu", precision="fp32")
    chunk = 300_000
    placement = dict(optimizer_placement="host", chunk_elems=chunk // 5, gpu_budget_bytes=6 * chunk // 5 * 4) \
        if args.streaming else dict(optimizer_placement="device", chunk_elems=chunk)
    chunked = attach(GPT(config, checkpoint_activations=args.checkpointing), RuntimeConfig(device="cpu", **placement),
                     OptimConfig(lr=1e-3))
    for name, engine in (("plain PyTorch", plain), ("chunk runtime", chunked)):
        fwd_bwd, step = timed(engine, args.steps)
        # the fastest and the quarter point as well: on a shared box the median moves with its load
        print(f"{name:14} forward+backward {statistics.median(fwd_bwd):6.2f} ms (fastest {fwd_bwd[0]:6.2f}, "
              f"quarter {fwd_bwd[len(fwd_bwd) // 4]:6.2f})   step {step:6.2f} ms")
    stats = chunked.stats()
    print(f"chunk groups {len(chunked.groups)}, resident mode {chunked.hooks.resident}, "
          f"fetches {stats['fetches']}, evictions {stats['evictions']}")


if __name__ == "__main__":
    main()
