"""Loading the built kernel, and how it reproduces torch's fused AdamW on this machine.

`load` opens a built library and finds, once, which of `adamw.c`'s forms make it torch's CPU fused
AdamW (`torch._fused_adamw_`) to the bit: which multiplies and adds torch's build fused, in its
vector body and in its scalar tail, and its vector width, found by running both on a small probe
(`_match_torch`). The answer is a `Kernel`. Knows nothing of compiling or caching the library, of
the process's one kernel, or of spans and threads.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from homestar.runtime.native.build import BuildError
from homestar.runtime.native.run import bias_corrections

log = logging.getLogger(__name__)

VECTOR_WIDTHS = (8, 16, 4, 32, 64, 1)
"""Candidates for torch's float vector width (its scalar tail's length), most likely first."""
_FORMS = tuple(lerp | sq | param for lerp in (1, 0) for sq in (2, 4, 0) for param in (0, 8))
"""adamw.c's FUSE_* combinations: fused lerp, v's fused product or decay or neither, fused param."""

_FN_ARGS = ([ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_float]
            + [ctypes.c_double] * 7)


@dataclass(frozen=True, slots=True)
class Kernel:
    """The loaded kernel and how it reproduces torch's fused AdamW on this machine."""

    fn: Callable[..., None]
    path: Path
    vector: int
    """torch's float vector width: the last numel % vector elements of a tensor are its tail."""
    body_form: int
    tail_form: int
    max_ulps: int
    """Largest difference from torch's kernel on the probe, in fp32 ulps (0: bit for bit)."""

    @property
    def exact(self) -> bool:
        return self.max_ulps == 0


def load(path: Path) -> Kernel:
    """Load a built library and find the forms that make it torch's kernel (`_match_torch`)."""
    try:
        library = ctypes.CDLL(str(path))
        fn = library.homestar_adamw_bf16
    except (OSError, AttributeError) as error:
        raise BuildError(f"cannot load {path}: {error}") from None
    fn.restype = None
    fn.argtypes = _FN_ARGS
    try:
        vector, body_form, tail_form, max_ulps = _match_torch(fn)
    except Exception as error:  # noqa: BLE001  (any failure of the probe: torch's path stays)
        raise BuildError(f"cannot compare it with torch's kernel: {type(error).__name__}: {error}") from None
    if max_ulps:
        log.warning("native AdamW differs from torch's fused AdamW on this machine by up to %d ulps (no form of "
                    "the kernel matched it exactly); using it anyway", max_ulps)
    return Kernel(fn=fn, path=path, vector=vector, body_form=body_form, tail_form=tail_form, max_ulps=max_ulps)


_PROBE = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=3.0)
_PROBE_SIZES = (4096 + 63,) + (63,) * 16 + (31, 15, 7, 3, 1)
"""One long tensor (its first 4096 elements are the vector body at any width up to 64) and many
short ones, whose tails, 1 to 63 elements, tell the widths and tail forms apart."""


def _match_torch(fn) -> tuple[int, int, int, int]:
    """(vector width, body form, tail form, max ulps) reproducing `torch._fused_adamw_` on a
    probe: the body form first, on elements that are body at every width, then the width and the
    tail form together. The first exact candidate wins; with none, the closest."""
    gen = torch.Generator().manual_seed(0)
    inputs = [((torch.randn(n, generator=gen) * 3).bfloat16(), torch.randn(n, generator=gen),
               torch.randn(n, generator=gen) * 0.1, torch.rand(n, generator=gen) * 0.01) for n in _PROBE_SIZES]
    p = _PROBE
    expected = [(master.clone(), m.clone(), v.clone()) for _, master, m, v in inputs]
    torch._fused_adamw_([e[0] for e in expected], [i[0].float() for i in inputs], [e[1] for e in expected],
                        [e[2] for e in expected], [], [torch.tensor(p["step"]) for _ in inputs], amsgrad=False,
                        lr=p["lr"], beta1=p["beta1"], beta2=p["beta2"], weight_decay=p["weight_decay"], eps=p["eps"],
                        maximize=False, grad_scale=None, found_inf=None)
    bc1, bc2_sqrt = bias_corrections(p["beta1"], p["beta2"], p["step"])

    def ulps(body: int, vector: int, body_form: int, tail_form: int, which: range) -> int:
        worst = 0
        for index in which:
            grad, *state = inputs[index]
            got = [t.clone() for t in state]
            n = body if body >= 0 else grad.numel()
            fn(grad.data_ptr(), got[0].data_ptr(), got[1].data_ptr(), got[2].data_ptr(), None, n,
               n - n % vector, body_form, tail_form, 1.0, p["lr"], p["beta1"], p["beta2"], p["eps"],
               p["weight_decay"], bc1, bc2_sqrt)
            for a, b in zip(got, expected[index]):
                diff = (a[:n].view(torch.int32).long() - b[:n].view(torch.int32).long()).abs().max()
                worst = max(worst, int(diff))
        return worst

    body_scores = [(ulps(4096, 1, form, 0, range(1)), form) for form in _FORMS]
    body_ulps, body_form = min(body_scores, key=lambda score: score[0])
    best = None
    for vector in VECTOR_WIDTHS:
        for tail_form in _FORMS:
            found = ulps(-1, vector, body_form, tail_form, range(len(inputs)))
            if best is None or found < best[0]:
                best = (found, vector, tail_form)
            if found == 0:
                return vector, body_form, tail_form, 0
    worst, vector, tail_form = best
    return vector, body_form, tail_form, max(worst, body_ulps)
