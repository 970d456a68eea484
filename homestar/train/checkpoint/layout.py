"""The files of a checkpoint folder, shared by the writing and the reading side: the format number,
the weight and moment file names for N ranks, the set of files a manifest must list, a file's size
and sha256, the manifest's validation, and fsync. Knows nothing of ranks, of what the tensors mean
or of when a checkpoint is written or read."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from homestar.errors import CheckpointError

FORMAT = 1


def shard_files(shards: int) -> tuple[list[str], list[str]]:
    """(weight files, moment files) of a checkpoint written by `shards` ranks."""
    if shards == 1:
        return ["model.safetensors"], ["optimizer.safetensors"]
    return ([f"model-{r:05d}-of-{shards:05d}.safetensors" for r in range(shards)],
            [f"optimizer-{r:05d}-of-{shards:05d}.safetensors" for r in range(shards)])


def expected_files(shards: int) -> set[str]:
    """Every file a manifest of `shards` ranks lists (all but the manifest itself)."""
    weights, moments = shard_files(shards)
    return {*weights, *moments, "rng.safetensors", "state.json"}


def shard_count(files: dict) -> int:
    """How many ranks wrote a checkpoint whose manifest lists `files` (already validated)."""
    return sum(1 for name in files if name.startswith("model")) if "model.safetensors" not in files else 1


def read_manifest(path: Path) -> dict[str, dict]:
    """{file name: {"bytes", "sha256"}} for every file a checkpoint must have, or CheckpointError."""
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {manifest_path} is unreadable ({type(exc).__name__})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    shards = manifest.get("shards", 1) if isinstance(manifest, dict) else None
    if not isinstance(shards, int) or isinstance(shards, bool) or not 1 <= shards <= 1 << 16:
        files = None
    if not isinstance(files, dict) or set(files) != expected_files(shards) or not all(
            isinstance(m, dict) and set(m) == {"bytes", "sha256"} and isinstance(m["bytes"], int)
            and isinstance(m["sha256"], str) for m in files.values()):
        raise CheckpointError(f"checkpoint file {manifest_path} is damaged (not a homestar manifest)")
    return files


def describe(path: Path) -> dict:
    """A file's manifest entry: its size and sha256 (reads all of it, 8 MiB at a time)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def fsync(path: Path) -> None:
    """Flush a written file to disk (waits on the device)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries to disk, so that a rename in it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
