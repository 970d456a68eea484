"""How the CPU's AdamW and the GPU-streamed AdamW share one host (CUDA machine only).

    python bench/host_contention.py --cpu-elems 200000000 --stream-elems 400000000

Runs the runtime's two AdamW engines on flat pinned buffers shaped like chunk groups (fp32
master and moments, bf16 grads and params): `adam_math.sliced_adamw` on a worker thread, and
`stream_adam.stream_adamw` driven from the main thread through a `CudaDevice`. Each engine alone,
then both at once, for several worker thread counts and with the host's waits spinning or
sleeping (`CudaDevice.blocking_waits`). Prints seconds and G elements/s of each engine and the
host memory traffic both moved (28 bytes per element either way: grads and params 2 each, master
and moments 4 each, read and written).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from homestar.optim import OptimConfig
from homestar.runtime import adam_math
from homestar.runtime.cuda import CudaDevice, PinnedHost
from homestar.runtime.stream_adam import StagingRing, StreamJob, stream_adamw

_BYTES_PER_ELEM = 28
_PARAM_ELEMS = 50_000_000  # spans of about one large GPT matrix each


def _buffers(pinned: PinnedHost, n: int) -> dict[str, torch.Tensor]:
    out = {name: pinned.empty(n, torch.float32) for name in ("master", "exp_avg", "exp_avg_sq")}
    out.update(grad=pinned.empty(n, torch.bfloat16), param=pinned.empty(n, torch.bfloat16))
    for name, tensor in out.items():  # fault every page in before timing
        tensor.fill_(0.01 if name != "exp_avg_sq" else 1e-4)
    return out


def _spans(n: int, device: torch.device) -> list[adam_math.Span]:
    return [adam_math.Span(offset=a, numel=min(_PARAM_ELEMS, n - a), step=torch.ones((), device=device), decay=True)
            for a in range(0, n, _PARAM_ELEMS)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu-elems", type=int, default=200_000_000)
    parser.add_argument("--stream-elems", type=int, default=400_000_000)
    parser.add_argument("--threads", type=int, nargs="*", default=None,
                        help="worker thread counts to try (default: all cores, one fewer, two fewer)")
    args = parser.parse_args()
    cores = torch.get_num_threads()
    counts = args.threads or [cores, cores - 1, cores - 2]
    config = OptimConfig(lr=1e-4, weight_decay=0.1)
    device = CudaDevice(None)
    pinned = PinnedHost()
    cpu, dev = _buffers(pinned, args.cpu_elems), _buffers(pinned, args.stream_elems)
    cpu_spans, dev_spans = _spans(args.cpu_elems, torch.device("cpu")), _spans(args.stream_elems, device.device)
    scratch = torch.empty(adam_math.SLICE_ELEMS)
    worker = ThreadPoolExecutor(1)

    def cpu_run(threads: int) -> float:
        torch.set_num_threads(threads)
        begin = time.perf_counter()
        adam_math.sliced_adamw(cpu_spans, cpu["grad"], cpu["master"], cpu["exp_avg"], cpu["exp_avg_sq"],
                               cpu["param"], scratch, coef=None, lr=1e-4, config=config)
        return time.perf_counter() - begin

    issued: list[float] = []
    """Seconds the host took to queue each streamed run (its last copy not yet landed)."""

    def stream_run() -> float:
        torch.cuda.synchronize()
        begin = time.perf_counter()
        job = StreamJob(spans=dev_spans, **dev)
        ring = StagingRing(lambda n, d: torch.empty(n, dtype=d, device=device.device), lambda t: None,
                           args.stream_elems, torch.bfloat16, torch.bfloat16)
        (last,) = stream_adamw([job], ring, device, coef=None, lr=1e-4, config=config)
        issued.append(time.perf_counter() - begin)
        device.host_wait(last)
        return time.perf_counter() - begin

    def rate(elems: int, seconds: float) -> str:
        return f"{seconds:6.3f} s {elems / seconds / 1e9:5.2f} G/s"

    stream_run(), worker.submit(cpu_run, cores).result()  # warm-up: kernels, caches, pages
    print(f"cores {cores}; CPU {args.cpu_elems:,} elements, streamed {args.stream_elems:,} elements")
    for blocking in (False, True):
        device.blocking_waits = blocking
        print(f"host waits {'sleep' if blocking else 'spin'}:")
        print(f"  streamed alone        {rate(args.stream_elems, stream_run())} (queued in {issued[-1]:.3f} s)")
        for threads in counts:
            alone = worker.submit(cpu_run, threads).result()
            both = worker.submit(cpu_run, threads)
            streamed = stream_run()
            together = both.result()
            total = (args.cpu_elems + args.stream_elems) / max(together, streamed)
            print(f"  {threads:2} threads: CPU alone {rate(args.cpu_elems, alone)} | at once: CPU "
                  f"{rate(args.cpu_elems, together)}, streamed {rate(args.stream_elems, streamed)} (queued in "
                  f"{issued[-1]:.3f} s), "
                  f"both {total / 1e9:.2f} G/s = {total * _BYTES_PER_ELEM / 1e9:.0f} GB/s of host memory")
    worker.shutdown()


if __name__ == "__main__":
    main()
