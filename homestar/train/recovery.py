"""Out-of-memory recovery: recognise the error, throw away the failed step, pick a smaller micro-batch.

The trainer calls these when a step's forward/backward runs out of GPU memory (or of pinned host
memory): the partial step's gradients are discarded, cached device memory is handed back, and the
step is redone with micro-batches split into smaller pieces and more accumulation, so the global
batch and therefore the run's maths stay the same. Knows the Engine protocol, not how an engine
places memory. Imports torch only when a check needs it, so the command line can name an error
without it.
"""

from __future__ import annotations

import gc

# Messages torch raises as a plain RuntimeError when an allocation fails: a failed pinned
# (page-locked) host allocation, and the CPU allocator running out.
_ALLOCATION_FAILURES = ("cudaHostAlloc", "pinned memory", "pin memory", "CUDA out of memory",
                        "CUDA error: out of memory", "can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch.OutOfMemoryError, for RuntimeErrors of failed pinned/host allocations, and
    for any error raised `from` one of those (the chunk runtime re-raises a device OOM as a
    BudgetError with its own figures): the `__cause__` chain is followed to its end."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if _is_allocation_failure(cause):
            return True
        seen.add(id(cause))
        cause = cause.__cause__
    return False


def _is_allocation_failure(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _ALLOCATION_FAILURES)


def smaller_micro_batch(micro_batch: int) -> int | None:
    """The largest proper divisor of `micro_batch` (half of an even one), or None at 1.

    A divisor keeps micro_batch * accum whole: each old micro-batch becomes equal pieces."""
    for pieces in range(2, micro_batch + 1):
        if micro_batch % pieces == 0:
            return micro_batch // pieces
    return None


def free_cached_memory(device: str) -> None:
    """Collect garbage (the failed step's activations) and return cached blocks to the driver.
    Cost: a full gc pass and, on CUDA, a device synchronisation inside empty_cache."""
    import torch

    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def first_line(exc: BaseException, limit: int) -> str:
    """The error's first line of text (its type's name when it has none), cut to `limit` characters."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
