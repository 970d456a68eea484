"""A safetensors file written one tensor at a time.

The header (names, dtypes, shapes, offsets) needs only the tensors' shapes, so it goes first; then
each tensor's bytes, in the header's order. A tensor on a device (a chunk homed on the GPU) is
copied to the host only when its turn comes, so writing a checkpoint stages one parameter's
state at a time instead of every device-homed chunk at once; a contiguous host tensor is written
from its own memory, without a copy. The bytes are hashed as they are written, so the file need
not be read back for its manifest entry. The result is an ordinary safetensors file
(`safetensors.safe_open` reads it). Knows nothing of checkpoints' layout or meaning.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

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
