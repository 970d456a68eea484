"""The host's AdamW for bf16 grads in one pass: a small C kernel, built on first use, run on threads.

`native/adamw.c` reads each element's bf16 grad, scales it by the clip coefficient, updates the
fp32 master and both moments and writes the bf16 param, all while the element is in registers:
one pass over memory instead of torch's four kernels per slice (widen, scale, fused AdamW, cast),
each its own OpenMP fork and join. Its maths is torch's CPU fused AdamW to the bit (the C file
says how); which multiplies and adds torch's build fused, and its vector width, are found once a
process by running both on a small probe (`_match_torch`).

`kernel()` compiles the C file with the system C compiler (`$CC`, else `cc`, else `gcc`) into
`paths.cache_dir()/native/`, under a name keyed by the source, the flags, the compiler's version
and the CPU, so a build is made once per machine and reused by every later process; it returns
None (one log line, and callers keep torch's path) when `HOMESTAR_NATIVE_ADAM=0`, when there is no
compiler or when the build fails. `adamw_spans` runs it over parameters' spans of a group's flat
host buffers, split into contiguous pieces of about equal size, one per thread. Knows nothing of
chunks, placement or the optimizer; bf16 grads and params, fp32 state only.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from homestar import paths
from homestar.optim import OptimConfig

if TYPE_CHECKING:
    from homestar.runtime.adam_math import Span

log = logging.getLogger(__name__)

ENV = "HOMESTAR_NATIVE_ADAM"
"""Set to 0 to keep torch's kernels for the host's AdamW."""
SOURCE = Path(__file__).with_name("native") / "adamw.c"
FLAGS = ("-std=c99", "-O3", "-march=native", "-shared", "-fPIC",
         # the kernel fuses exactly the operations torch's build fuses (explicit fmaf, chosen by the
         # probe) and nothing else: with GCC's default (-ffp-contract=fast) it also fuses some of its
         # own, and no form matched torch on the dev box (4 ulps off at best; with off: 0)
         "-ffp-contract=off",
         # sqrtf as the vector instruction, no errno check per element (torch builds with these too);
         # neither changes a result
         "-fno-math-errno", "-fno-trapping-math")
PIECE_ALIGN = 64
"""Pieces are cut at multiples of this many elements from a span's start: whole cache lines of
every buffer (64 bf16 = 2 lines, 64 fp32 = 4), so two threads never write one line."""
MIN_PIECE = 1 << 16
"""Fewer elements than this per thread are not worth a thread's hand-off (tens of microseconds
against the kernel's ~1 G elements/s per core)."""
VECTOR_WIDTHS = (8, 16, 4, 32, 64, 1)
"""Candidates for torch's float vector width (its scalar tail's length), most likely first."""
_FORMS = tuple(lerp | sq | param for lerp in (1, 0) for sq in (2, 4, 0) for param in (0, 8))
"""adamw.c's FUSE_* combinations: fused lerp, v's fused product or decay or neither, fused param."""

_FN_ARGS = ([ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_float]
            + [ctypes.c_double] * 7)


class BuildError(RuntimeError):
    """The kernel could not be built or loaded (the message says why, in one line)."""


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


_lock = threading.Lock()
_loaded: dict[tuple[str, str], Kernel | None] = {}
"""This process's kernel (None: disabled or failed) by ($HOMESTAR_NATIVE_ADAM, $CC)."""
_MISSING = object()


def kernel() -> Kernel | None:
    """The kernel, built or loaded once per process; None (logged once) when it is disabled or
    cannot be built. Thread-safe: concurrent first callers wait for one build. Cheap after the
    first call (a dict lookup: this runs once per group and step)."""
    setting = (os.environ.get(ENV, "").strip(), os.environ.get("CC", ""))
    found = _loaded.get(setting, _MISSING)
    if found is not _MISSING:
        return found
    with _lock:
        if setting not in _loaded:
            if setting[0] == "0":
                log.info("native AdamW off (%s=0): the host's AdamW runs torch's kernels", ENV)
                _loaded[setting] = None
            else:
                _loaded[setting] = _load_or_none(compiler())
        return _loaded[setting]


def forget() -> None:
    """Drop this process's loaded kernel, so the next `kernel()` loads it again (tests)."""
    with _lock:
        _loaded.clear()


def compiler() -> list[str] | None:
    """The C compiler's command: `$CC` (which may carry arguments), else cc, else gcc."""
    explicit = os.environ.get("CC", "").strip()
    if explicit:
        command = shlex.split(explicit)
        return command if shutil.which(command[0]) else None
    for name in ("cc", "gcc"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def build_key(cc: list[str]) -> str:
    """What the built library depends on, hashed: the source, the flags, the compiler (command
    and version) and the CPU (its feature flags, as -march=native reads them)."""
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    digest.update(" ".join(cc).encode())
    digest.update(_compiler_version(cc).encode())
    digest.update(_cpu_id().encode())
    return digest.hexdigest()[:20]


def build(cc: list[str], cache: Path | None = None) -> Path:
    """The library built for this source, compiler and CPU: the cached one when it is there, else
    compiled into a temporary name and renamed into place (atomic: processes starting at once may
    each compile, and every one of them loads a complete file)."""
    folder = (cache if cache is not None else paths.cache_dir()) / "native"
    target = folder / f"adamw-{build_key(cc)}.so"
    if target.exists():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        os.close(handle)
    except OSError as error:
        raise BuildError(f"cannot write to {folder}: {error}") from None
    try:
        try:
            done = subprocess.run([*cc, *FLAGS, "-o", temporary, str(SOURCE)], capture_output=True, text=True,
                                  timeout=300)
        except (OSError, subprocess.SubprocessError) as error:
            raise BuildError(f"{' '.join(cc)} did not run: {error}") from None
        if done.returncode != 0:
            first = next((line for line in done.stderr.splitlines() if line.strip()), "no message")
            raise BuildError(f"{' '.join(cc)} failed ({done.returncode}): {first.strip()}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


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


def _load_or_none(cc: list[str] | None) -> Kernel | None:
    if cc is None:
        where = f"CC={os.environ['CC']!r} not found" if os.environ.get("CC", "").strip() else "no cc or gcc on PATH"
        log.warning("native AdamW unavailable: no C compiler (%s); the host's AdamW runs torch's kernels", where)
        return None
    try:
        return load(build(cc))
    except BuildError as error:
        log.warning("native AdamW unavailable (%s); the host's AdamW runs torch's kernels", error)
        return None


def _compiler_version(cc: list[str]) -> str:
    try:
        done = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout


def _cpu_id() -> str:
    """The CPU as -march=native sees it: the first vendor, model and feature-flag lines of
    /proc/cpuinfo (x86 and ARM names), else what the platform module says of the machine."""
    wanted = ("vendor_id", "model name", "flags", "CPU implementer", "CPU part", "Features")
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                name = line.split(":", 1)[0].strip()
                if name in wanted:
                    found.setdefault(name, line.strip())
    except OSError:
        pass
    if "flags" in found or "Features" in found:
        return "\n".join(found[name] for name in wanted if name in found)
    return " ".join((sys.platform, platform.machine(), platform.processor(), platform.platform()))


# -- matching torch's kernel ----------------------------------------------------------------

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


# -- running it -----------------------------------------------------------------------------

def bias_corrections(beta1: float, beta2: float, step: float) -> tuple[float, float]:
    """1 - beta1^step and sqrt(1 - beta2^step) in double, as torch's kernel takes them (Python's
    float power is the C library's pow, as std::pow)."""
    return 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)


@dataclass(frozen=True, slots=True)
class _Piece:
    """Elements [start, start + numel) of the buffers, `tail` of them in torch's vector body."""

    start: int
    numel: int
    tail: int
    decay: bool
    bc1: float
    bc2_sqrt: float


def adamw_spans(kern: Kernel, spans: list[Span], grad: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor,
                exp_avg_sq: torch.Tensor, param: torch.Tensor | None, *, coef: torch.Tensor | float | None,
                lr: float, config: OptimConfig, threads: int) -> None:
    """AdamW of the parameters in `spans` (steps already advanced) over a group's flat host
    buffers: bf16 `grad` and `param` (None when the master is the param), fp32 `master` and
    moments. `coef`: the grad clip's scale (a CPU scalar), None for none. The spans' elements are
    cut into `threads` contiguous pieces of about equal size; this thread runs the first, a pool
    made once runs the others (the kernel's calls release the GIL)."""
    _check(spans, grad, master, exp_avg, exp_avg_sq, param, coef, threads)
    scale = 1.0 if coef is None else float(coef)
    beta1, beta2 = config.betas
    pieces = _cut(kern, spans, threads, beta1, beta2)
    if not pieces:
        return
    base = (grad.data_ptr(), master.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
            None if param is None else param.data_ptr())

    def run(part: list[_Piece]) -> None:
        g, mst, m, v, prm = base
        for piece in part:
            s = piece.start
            kern.fn(g + 2 * s, mst + 4 * s, m + 4 * s, v + 4 * s, None if prm is None else prm + 2 * s, piece.numel,
                    piece.tail, kern.body_form, kern.tail_form, scale, lr, beta1, beta2, config.eps,
                    config.weight_decay if piece.decay else 0.0, piece.bc1, piece.bc2_sqrt)

    if len(pieces) == 1:
        run(pieces[0])
        return
    futures = [_pool(len(pieces) - 1).submit(run, part) for part in pieces[1:]]
    try:
        run(pieces[0])
    finally:
        for future in futures:
            future.result()  # waits for all (the buffers must outlive every piece)


def _cut(kern: Kernel, spans: list[Span], threads: int, beta1: float, beta2: float) -> list[list[_Piece]]:
    """The spans' elements as `threads` lists of pieces of about equal total size (fewer when
    there is little work), cut at PIECE_ALIGN from a span's start; each piece knows where torch's
    tail of its span starts within it."""
    total = sum(span.numel for span in spans)
    if total == 0:
        return []
    parts = max(1, min(threads, -(-total // MIN_PIECE)))
    share = -(-total // parts)
    out: list[list[_Piece]] = [[]]
    room = share
    for span in spans:
        if span.numel == 0:
            continue
        bc1, bc2_sqrt = bias_corrections(beta1, beta2, float(span.step.item()))
        body = span.numel - span.numel % kern.vector  # torch's tail: the span's last numel % vector
        start = 0
        while start < span.numel:
            if room <= 0 and len(out) < parts:
                out.append([])
                room = share
            take = span.numel - start
            if take > room and len(out) < parts:
                take = max(PIECE_ALIGN, -(-room // PIECE_ALIGN) * PIECE_ALIGN)  # up to an aligned cut
                take = min(take, span.numel - start)
            tail = min(max(body - start, 0), take)
            out[-1].append(_Piece(span.offset + start, take, tail, span.decay, bc1, bc2_sqrt))
            start += take
            room -= take
    return [part for part in out if part]


def _check(spans: list[Span], grad: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor,
           exp_avg_sq: torch.Tensor, param: torch.Tensor | None, coef, threads: int) -> None:
    named = {"grad": (grad, torch.bfloat16), "master": (master, torch.float32), "exp_avg": (exp_avg, torch.float32),
             "exp_avg_sq": (exp_avg_sq, torch.float32)}
    if param is not None:
        named["param"] = (param, torch.bfloat16)
    end = max((span.offset + span.numel for span in spans), default=0)
    for name, (tensor, dtype) in named.items():
        if tensor.dtype != dtype:
            raise ValueError(f"native AdamW: {name} must be {dtype}, got {tensor.dtype}")
        if tensor.device.type != "cpu":
            raise ValueError(f"native AdamW: {name} must be on the CPU, got {tensor.device}")
        if not tensor.is_contiguous():
            raise ValueError(f"native AdamW: {name} must be contiguous")
        if tensor.numel() < end:
            raise ValueError(f"native AdamW: {name} holds {tensor.numel()} elements, the spans reach {end}")
    for span in spans:
        if span.offset < 0 or span.numel < 0:
            raise ValueError(f"native AdamW: a span's offset and numel must be >= 0, got {span}")
        if span.step.numel() != 1:
            raise ValueError("native AdamW: a span's step must be one number")
    if coef is not None and isinstance(coef, torch.Tensor) and (coef.numel() != 1 or coef.device.type != "cpu"):
        raise ValueError(f"native AdamW: coef must be a CPU scalar, got shape {tuple(coef.shape)} on {coef.device}")
    if threads < 1:
        raise ValueError(f"native AdamW: threads must be >= 1, got {threads}")


_pool_lock = threading.Lock()
_pool_now: tuple[ThreadPoolExecutor, int, int] | None = None
"""The helper threads' pool, its size and the process that made it."""


def _pool(workers: int) -> ThreadPoolExecutor:
    """The pool of helper threads, made once and reused (a new one only when more workers are
    wanted than it has, or in a forked child, where the parent's threads do not exist)."""
    global _pool_now
    with _pool_lock:
        if _pool_now is not None:
            pool, size, pid = _pool_now
            if size >= workers and pid == os.getpid():
                return pool
            if pid == os.getpid():
                pool.shutdown(wait=False)  # work already given to it still runs
        pool = ThreadPoolExecutor(workers, thread_name_prefix="homestar-native-adam")
        _pool_now = (pool, workers, os.getpid())
        return pool
