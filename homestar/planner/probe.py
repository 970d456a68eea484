"""What this machine has: GPUs, host memory, CPU cores and free disk, as plain frozen data.

`probe()` reads CUDA through torch (imported when called), NVML through nvidia-ml-py when that
optional package is installed, and host memory through psutil, clipped to the process's cgroup
limits (cgroup v2 `memory.max` / `cpu.max`, v1 `memory.limit_in_bytes` / `cpu.cfs_quota_us`) so a
container is sized by what it may use, not by the host it runs on. A machine without a GPU, without
NVML or without cgroups is a normal case: the matching fields are empty, nothing raises.

Knows nothing of models, presets or plans.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_SELF_CGROUP = Path("/proc/self/cgroup")
_UNLIMITED = 1 << 62
"""cgroup v1 writes 'no limit' as a page-rounded 2**63 - 1; anything this large is no limit."""


@dataclass(kw_only=True, slots=True, frozen=True)
class GPUInfo:
    """One CUDA device as torch numbers it (CUDA_VISIBLE_DEVICES applied)."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    """Free device memory when probed (other processes' use, the desktop's included, subtracted)."""
    capability: tuple[int, int]
    bf16: bool
    """Native bf16 matmuls (compute capability 8.0 and later)."""
    temperature_c: float | None = None
    """From NVML; None without nvidia-ml-py or when the driver does not report it."""
    utilization: float | None = None
    """Percent of time a kernel ran over NVML's last sample period; None without NVML."""


@dataclass(kw_only=True, slots=True, frozen=True)
class MachineInfo:
    """Everything the planner needs to know about the machine."""

    gpus: tuple[GPUInfo, ...]
    ram_total: int
    """Host memory this process may use: physical RAM, or the cgroup limit when that is lower."""
    ram_available: int
    """Host memory free for a new run now (reclaimable page cache counts as free)."""
    cpu_cores: int
    """Usable logical cores: the affinity mask, clipped by a cgroup CPU quota."""
    disk_free: int | None
    """Free bytes on the file system that holds the runs folder; None when it cannot be read."""

    def __post_init__(self) -> None:
        if self.ram_total <= 0 or self.ram_available < 0 or self.cpu_cores < 1:
            raise ValueError("a machine needs positive RAM and at least one CPU core")


def probe(runs_root: Path | None = None) -> MachineInfo:
    """This machine's GPUs, host memory, cores and free disk; never raises for missing hardware."""
    ram_total, ram_available = host_memory()
    if runs_root is None:
        from homestar.paths import runs_dir

        runs_root = runs_dir()
    return MachineInfo(gpus=probe_gpus(), ram_total=ram_total, ram_available=ram_available,
                       cpu_cores=cpu_cores(), disk_free=disk_free(runs_root))


# ---------------------------------------------------------------- GPUs


def probe_gpus() -> tuple[GPUInfo, ...]:
    """Every visible CUDA device; empty on a CPU-only build or a machine without a usable GPU."""
    import torch

    if not torch.cuda.is_available():
        return ()
    try:
        count = torch.cuda.device_count()
        props = [torch.cuda.get_device_properties(i) for i in range(count)]
    except (RuntimeError, AssertionError) as exc:  # a broken driver reads as "no GPU", logged
        log.warning("CUDA reports a device but cannot describe it: %s", exc)
        return ()
    nvml = _Nvml.open()
    try:
        return tuple(_gpu_info(i, p, nvml) for i, p in enumerate(props))
    finally:
        if nvml is not None:
            nvml.close()


def _gpu_info(index: int, props, nvml: _Nvml | None) -> GPUInfo:  # noqa: ANN001 - torch's property struct
    handle = nvml.handle(props) if nvml is not None else None
    free = nvml.free_bytes(handle) if handle is not None else None
    if free is None:
        free = _torch_free_bytes(index, props.total_memory)
    capability = (int(props.major), int(props.minor))
    return GPUInfo(
        index=index, name=str(props.name), total_bytes=int(props.total_memory), free_bytes=int(free),
        capability=capability, bf16=capability >= (8, 0),
        temperature_c=nvml.temperature(handle) if handle is not None else None,
        utilization=nvml.utilization(handle) if handle is not None else None,
    )


def _torch_free_bytes(index: int, total: int) -> int:
    """Free memory through the CUDA runtime. Cost: creates this process's context on the device
    (a few hundred MiB, about a second), so the figure already excludes that context."""
    import torch

    try:
        free, _ = torch.cuda.mem_get_info(index)
    except RuntimeError as exc:
        log.warning("cannot read free memory of GPU %d (%s); assuming all of it is free", index, exc)
        return total
    return int(free)


class _Nvml:
    """A short NVML session (nvidia-ml-py, optional). Reads free memory without creating a CUDA
    context, plus temperature and utilisation. Every query failure reads as 'unknown'."""

    def __init__(self, module) -> None:  # noqa: ANN001 - the pynvml module
        self.m = module

    @classmethod
    def open(cls) -> _Nvml | None:
        try:
            import pynvml
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            log.info("NVML unavailable: %s", exc)
            return None
        return cls(pynvml)

    def close(self) -> None:
        try:
            self.m.nvmlShutdown()
        except self.m.NVMLError as exc:
            log.info("NVML shutdown failed: %s", exc)

    def handle(self, props):  # noqa: ANN001, ANN201
        """The NVML device of a torch device, matched by PCI address (NVML and CUDA may number
        devices differently); None when torch does not report the address."""
        domain, bus, device = (getattr(props, f"pci_{k}_id", None) for k in ("domain", "bus", "device"))
        if bus is None or device is None:
            return None
        address = f"{domain or 0:08X}:{bus:02X}:{device:02X}.0"
        return self._query(self.m.nvmlDeviceGetHandleByPciBusId, address)

    def free_bytes(self, handle) -> int | None:  # noqa: ANN001
        info = self._query(self.m.nvmlDeviceGetMemoryInfo, handle)
        return None if info is None else int(info.free)

    def temperature(self, handle) -> float | None:  # noqa: ANN001
        value = self._query(self.m.nvmlDeviceGetTemperature, handle, self.m.NVML_TEMPERATURE_GPU)
        return None if value is None else float(value)

    def utilization(self, handle) -> float | None:  # noqa: ANN001
        rates = self._query(self.m.nvmlDeviceGetUtilizationRates, handle)
        return None if rates is None else float(rates.gpu)

    def _query(self, fn, *args):  # noqa: ANN001, ANN202
        try:
            return fn(*args)
        except self.m.NVMLError as exc:
            log.info("NVML query %s failed: %s", getattr(fn, "__name__", fn), exc)
            return None


# ---------------------------------------------------------------- host memory and cores


def host_memory(cgroup_root: Path = _CGROUP_ROOT, self_cgroup: Path = _SELF_CGROUP) -> tuple[int, int]:
    """(total, available) host bytes for this process: psutil's figures clipped by the cgroup."""
    import psutil

    vm = psutil.virtual_memory()
    total, available = int(vm.total), int(vm.available)
    limit, used = cgroup_memory(cgroup_root, self_cgroup)
    if limit is not None:
        total = min(total, limit)
        available = min(available, max(0, limit - (used or 0)))
    return total, available


def cgroup_memory(cgroup_root: Path = _CGROUP_ROOT, self_cgroup: Path = _SELF_CGROUP) -> tuple[int | None, int | None]:
    """(limit, non-reclaimable use) in bytes from this process's memory cgroup, v2 or v1.

    The limit is the smallest one on the way from the process's group up to the root (a parent's
    limit binds its children); use is the group's charge minus its inactive page cache. (None,
    None) when no cgroup memory controller is visible or none sets a limit.
    """
    groups = _self_cgroups(self_cgroup)
    if "" in groups and (cgroup_root / "cgroup.controllers").exists():  # pure v2
        dirs = _group_dirs(cgroup_root, groups[""])
        limit_file, use_file, cache_key = "memory.max", "memory.current", "inactive_file"
    elif "memory" in groups:  # v1 (or hybrid with memory on v1)
        dirs = _group_dirs(cgroup_root / "memory", groups["memory"])
        limit_file, use_file, cache_key = "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"
    else:
        return None, None
    limits = [v for v in (_read_int(d / limit_file) for d in dirs) if v is not None and v < _UNLIMITED]
    if not limits:
        return None, None
    used = _read_int(dirs[0] / use_file) if dirs else None
    if used is not None:
        used = max(0, used - (_stat_value(dirs[0] / "memory.stat", cache_key) or 0))
    return min(limits), used


def cpu_cores(cgroup_root: Path = _CGROUP_ROOT, self_cgroup: Path = _SELF_CGROUP) -> int:
    """Logical cores this process may run on: the affinity mask, clipped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, self_cgroup)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def cgroup_cpu_quota(cgroup_root: Path = _CGROUP_ROOT, self_cgroup: Path = _SELF_CGROUP) -> float | None:
    """CPUs' worth of time the cgroup allows (quota / period), the smallest on the way to the root;
    None without a quota."""
    groups = _self_cgroups(self_cgroup)
    quotas: list[float] = []
    if "" in groups and (cgroup_root / "cgroup.controllers").exists():
        for d in _group_dirs(cgroup_root, groups[""]):
            parts = _read_text(d / "cpu.max").split()
            if len(parts) == 2 and parts[0] != "max" and parts[0].isdigit() and parts[1].isdigit():
                quotas.append(int(parts[0]) / max(1, int(parts[1])))
    else:
        key = next((k for k in groups if "cpu" in k.split(",")), None)
        if key is None:
            return None
        base = next((cgroup_root / n for n in (key, "cpu", "cpu,cpuacct") if (cgroup_root / n).is_dir()), None)
        for d in _group_dirs(base, groups[key]) if base is not None else []:
            quota, period = _read_int(d / "cpu.cfs_quota_us"), _read_int(d / "cpu.cfs_period_us")
            if quota is not None and quota > 0 and period:
                quotas.append(quota / period)
    return min(quotas) if quotas else None


def _self_cgroups(self_cgroup: Path) -> dict[str, str]:
    """{controllers: path} from /proc/self/cgroup; the v2 group is under the key ""."""
    groups = {}
    for line in _read_text(self_cgroup).splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            groups[parts[1]] = parts[2]
    return groups


def _group_dirs(base: Path, group: str) -> list[Path]:
    """The group's folder and its ancestors up to `base`, deepest first. When the group's folder
    is not visible (a cgroup namespace shows the container's own group as the root) only `base`."""
    here = base / group.strip("/")
    if not here.is_dir():
        return [base] if base.is_dir() else []
    dirs = [here]
    while dirs[-1] != base and base in dirs[-1].parents:
        dirs.append(dirs[-1].parent)
    return dirs


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    return int(text) if text.isdigit() else None


def _stat_value(path: Path, key: str) -> int | None:
    for line in _read_text(path).splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


# ---------------------------------------------------------------- disk


def disk_free(folder: Path) -> int | None:
    """Free bytes where `folder` is (or would be created); None when the file system says nothing."""
    path = Path(folder).expanduser()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return int(shutil.disk_usage(path).free)
    except OSError:
        return None
