"""Time the host's AdamW for bf16 grads: widening the whole chunk first vs slice by slice.

    python bench/cpu_adam.py --elems 34000000 --runs 5

Both run torch's fused CPU AdamW on one chunk's flat buffers (fp32 master and moments, bf16 grads
and params) split into GPT-shaped parameters; prints the median and best seconds of each.
"""

from __future__ import annotations

import argparse
import time

import torch

from homestar.optim import OptimConfig
from homestar.runtime import adam_math


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--elems", type=int, default=34_000_000)
    parser.add_argument("--d-model", type=int, default=2560)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    n, d = args.elems, args.d_model
    spans, offset = [], 0
    while offset < n:  # one block's matrices in turn: qkv, attention proj, mlp up, mlp down
        for size in (3 * d * d, d * d, 4 * d * d, 4 * d * d):
            size = min(size, n - offset)
            if size > 0:
                spans.append(adam_math.Span(offset=offset, numel=size, step=torch.tensor(1.0), decay=True))
                offset += size
    config = OptimConfig(lr=1e-3, weight_decay=0.1)
    master, m, v = torch.randn(n), torch.zeros(n), torch.zeros(n)
    grad, param = torch.randn(n).bfloat16(), torch.empty(n, dtype=torch.bfloat16)
    whole_scratch, slice_scratch = torch.empty(n), torch.empty(adam_math.SLICE_ELEMS)

    def whole() -> None:
        whole_scratch.copy_(grad)
        cut = lambda t: [t[s.offset : s.offset + s.numel] for s in spans]  # noqa: E731
        adam_math.fused_adamw(cut(master), cut(whole_scratch), cut(m), cut(v), [s.step for s in spans],
                              lr=1e-3, config=config, decay=True)
        param.copy_(master)

    def sliced() -> None:
        adam_math.sliced_adamw(spans, grad, master, m, v, param, slice_scratch, coef=None, lr=1e-3, config=config)

    times: dict[str, list[float]] = {"whole chunk": [], "slice by slice": []}
    for _ in range(args.runs):
        for name, work in (("whole chunk", whole), ("slice by slice", sliced)):
            begin = time.perf_counter()
            work()
            times[name].append(time.perf_counter() - begin)
    print(f"{n:,} elements, {torch.get_num_threads()} threads, slice {adam_math.SLICE_ELEMS:,}")
    for name, values in times.items():
        print(f"  {name:15} median {sorted(values)[len(values) // 2]:.4f} s  best {min(values):.4f} s")


if __name__ == "__main__":
    main()
