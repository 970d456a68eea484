"""Building the host's AdamW kernel: the C compiler's command, and `adamw.c` compiled with it.

`build` compiles the C file next to this one with the system C compiler (`$CC`, else `cc`, else
`gcc`, as `compiler` finds it) into `paths.cache_dir()/native/`, under a name keyed by the source,
the flags, the compiler's version and the CPU (`build_key`), so a build is made once per machine
and reused by every later process; a build that cannot be made raises `BuildError`, in one line.
Knows nothing of loading the library, of torch, or of running the kernel.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from homestar import paths

SOURCE = Path(__file__).with_name("adamw.c")
FLAGS = ("-std=c99", "-O3", "-march=native", "-shared", "-fPIC",
         # the kernel fuses exactly the operations torch's build fuses (explicit fmaf, chosen by the
         # probe) and nothing else: with GCC's default (-ffp-contract=fast) it also fuses some of its
         # own, and no form matched torch on the dev box (4 ulps off at best; with off: 0)
         "-ffp-contract=off",
         # sqrtf as the vector instruction, no errno check per element (torch builds with these too);
         # neither changes a result
         "-fno-math-errno", "-fno-trapping-math")


class BuildError(RuntimeError):
    """The kernel could not be built or loaded (the message says why, in one line)."""


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
