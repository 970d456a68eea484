"""Safetensors files written, and read, one tensor at a time.

The header (names, dtypes, shapes, offsets) needs only the tensors' shapes, so it goes first; then
each tensor's bytes, in the header's order. A tensor on a device (a chunk homed on the GPU) is
copied to the host only when its turn comes, so writing a checkpoint stages one parameter's
state at a time instead of every device-homed chunk at once; a contiguous host tensor is written
from its own memory, without a copy. The bytes are hashed as they are written, so the file need
not be read back for its manifest entry. The result is an ordinary safetensors file
(`safetensors.safe_open` reads it). `LazyTensors` reads such files back a tensor at a time, when
each is asked for, so loading a state whole never needs host memory for all of it at once.
Knows nothing of checkpoints' layout or meaning.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ALIGN = 8
"""The header is padded with spaces to a multiple of 8 bytes, as the format asks."""


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    """Write `tensors` (any devices, any strides) to `path` as a safetensors file; returns the
    file's size and sha256 ({"bytes", "sha256"}, as `checkpoint.layout.describe` gives them)."""
    header: dict[str, dict] = {}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {tensor.dtype} has no safetensors name")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % _ALIGN)
    digest, size = hashlib.sha256(), 0
    with open(path, "wb") as out:

        def put(data) -> None:
            nonlocal size
            out.write(data)
            digest.update(data)
            size += len(data) if isinstance(data, bytes) else data.nbytes

        put(len(raw).to_bytes(8, "little"))
        put(raw)
        for tensor in tensors.values():
            host = tensor.detach()
            if host.device.type != "cpu":
                host = host.to("cpu")  # sync copy of this tensor alone (see the module docstring)
            host = host.contiguous()  # no copy when it already is
            if host.numel():
                put(memoryview(host.reshape(-1).view(torch.uint8).numpy()))
    return {"bytes": size, "sha256": digest.hexdigest()}


class LazyTensors(Mapping):
    """Tensors of safetensors files by name, each read from its file when asked for: a fresh
    host tensor the caller owns (nothing is kept here), so the caller's peak is one tensor, not
    the files. Built from headers only (a few KB per file, each read once: names and shapes).
    A file that became unreadable since raises OSError naming it."""

    def __init__(self, index: dict[str, tuple[Path, str, tuple[int, ...]]]) -> None:
        self._index = index
        """Name -> (file, the tensor's name in that file, its shape)."""

    @classmethod
    def of_files(cls, files: list[tuple[Path, set[str] | None]]) -> "LazyTensors":
        """The tensors of each (file, names) pair: all of the file's for None, else those named."""
        index: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
        for path, names in files:
            found = _reading(path, lambda f: [(k, tuple(f.get_slice(k).get_shape())) for k in f.keys()
                                              if names is None or k in names])
            index.update((key, (path, key, shape)) for key, shape in found)
        return cls(index)

    def under(self, prefix: str) -> "LazyTensors":
        """The tensors named "<prefix>/<name>", as "<name>"."""
        start = f"{prefix}/"
        return LazyTensors({k[len(start):]: v for k, v in self._index.items() if k.startswith(start)})

    def __getitem__(self, name: str) -> torch.Tensor:
        path, key, _ = self._index[name]
        return _reading(path, lambda f: f.get_tensor(key))  # cost: reads this tensor's bytes

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._index[name][2]  # from the header read at build: no I/O

    def __contains__(self, name: object) -> bool:
        return name in self._index  # no read (Mapping's own would read the tensor)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


def _reading(path: Path, read):
    """`read(f)` on the opened file; its failures as OSError whose `filename` is the file."""
    try:
        with safe_open(path, framework="pt") as f:
            return read(f)
    except (SafetensorError, ValueError) as exc:
        raise OSError(0, type(exc).__name__, str(path)) from None
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno or 0, exc.strerror or str(exc), str(path)) from None
