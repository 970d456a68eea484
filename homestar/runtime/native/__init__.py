"""The host's AdamW for bf16 grads in one pass: a small C kernel, built on first use, run on threads.

`adamw.c` reads each element's bf16 grad, scales it by the clip coefficient, updates the fp32
master and both moments and writes the bf16 param, all while the element is in registers: one
pass over memory instead of torch's four kernels per slice (widen, scale, fused AdamW, cast), each
its own OpenMP fork and join. Its maths is torch's CPU fused AdamW to the bit (the C file says
how). The package, by what each part holds:

  build   the C compiler's command (`$CC`, else `cc`, else `gcc`) and the library compiled with it
          into `paths.cache_dir()/native/`, under a name keyed by the source, the flags, the
          compiler's version and the CPU: made once per machine, reused by every later process
  probe   the library loaded, and which multiplies and adds torch's build fused, and its vector
          width, found once a process by running both on a small probe (`Kernel`)
  run     `adamw_spans`: the kernel over parameters' spans of a group's flat host buffers, split
          into contiguous pieces of about equal size, one per thread

and here, the process's one kernel: `kernel()` builds (or finds) and loads it once, and returns
None (one log line, and callers keep torch's path) when `HOMESTAR_NATIVE_ADAM=0`, when there is no
compiler or when the build fails. Knows nothing of chunks, placement or the optimizer; bf16 grads
and params, fp32 state only.
"""

from __future__ import annotations

import logging
import os
import threading

from homestar.runtime.native import build
from homestar.runtime.native.build import BuildError, compiler
from homestar.runtime.native.probe import Kernel, load
from homestar.runtime.native.run import adamw_spans, bias_corrections

__all__ = ["ENV", "BuildError", "Kernel", "adamw_spans", "bias_corrections", "compiler", "forget", "kernel", "load"]

log = logging.getLogger(__name__)

ENV = "HOMESTAR_NATIVE_ADAM"
"""Set to 0 to keep torch's kernels for the host's AdamW."""

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


def _load_or_none(cc: list[str] | None) -> Kernel | None:
    if cc is None:
        where = f"CC={os.environ['CC']!r} not found" if os.environ.get("CC", "").strip() else "no cc or gcc on PATH"
        log.warning("native AdamW unavailable: no C compiler (%s); the host's AdamW runs torch's kernels", where)
        return None
    try:
        return load(build.build(cc))
    except BuildError as error:
        log.warning("native AdamW unavailable (%s); the host's AdamW runs torch's kernels", error)
        return None
