"""Time the host's AdamW for bf16 grads: widening the whole chunk first, slice by slice, native.

    python bench/cpu_adam.py --elems 34000000 --runs 5

The first two run torch's fused CPU AdamW on one chunk's flat buffers (fp32 master and moments,
bf16 grads and params) split into GPT-shaped parameters; the third runs the single-pass native
kernel (`homestar.runtime.native`, built on first use) over the same buffers on as many threads
as torch uses. Prints the median and best seconds of each and the median's G elements per second.
"""

from __future__ import annotations

import argparse
import time

import torch

from homestar.optim import OptimConfig
from homestar.runtime import adam_math, native


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--elems", type=int, default=34_000_000)
    parser.add_argument("--d-model", type=int, default=2560)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch's threads, and the native kernel's")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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

    kernel = native.kernel()

    def run_native() -> None:
        native.adamw_spans(kernel, spans, grad, master, m, v, param, coef=None, lr=1e-3, config=config,
                           threads=torch.get_num_threads())

    works = [("whole chunk", whole), ("slice by slice", sliced)]
    if kernel is not None:
        works.append(("native", run_native))
    else:
        print("native kernel unavailable (see the log line above): not timed")
    times: dict[str, list[float]] = {name: [] for name, _ in works}
    for _ in range(args.runs):
        for name, work in works:
            begin = time.perf_counter()
            work()
            times[name].append(time.perf_counter() - begin)
    print(f"{n:,} elements, {torch.get_num_threads()} threads, slice {adam_math.SLICE_ELEMS:,}")
    for name, values in times.items():
        median = sorted(values)[len(values) // 2]
        print(f"  {name:15} median {median:.4f} s  best {min(values):.4f} s  {n / median / 1e9:.2f} G elements/s")


if __name__ == "__main__":
    main()
