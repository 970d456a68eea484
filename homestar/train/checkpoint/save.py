"""Writing a checkpoint: the hidden temporary folder, each rank's weight and moment shard (hashed
by its writer), rng, state and the manifest last, every file fsynced, the rename into place and the
pruning of all but the newest K. Reads nothing back; file names and hashing come from `layout`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from homestar.errors import CheckpointError
from homestar.train import faults
from homestar.train.checkpoint import layout
from homestar.train.checkpoint.tensor_file import write_tensors
from homestar.train.distributed import Ranks
from homestar.train.run_files import checkpoint_name, list_checkpoints


def save_checkpoint(run_dir: Path, step: int, engine_state: dict, trainer_state: dict, *, keep: int = 2,
                    ranks: Ranks | None = None) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep`; returns its folder.
    Across ranks every rank calls it with its own shard of the engine state."""
    if ranks is not None and ranks.world > 1:
        return _save_sharded(run_dir, step, engine_state, trainer_state, keep=keep, ranks=ranks)
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    _check_disk(root, engine_state)
    tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _write(tmp, step, engine_state, trainer_state)
    except (OSError, SafetensorError) as exc:  # a full disk: the previous checkpoint stays the latest
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_save_failed(step, root, exc)) from None
    final = root / checkpoint_name(step)
    _commit(root, tmp, final, keep)
    return final


def _save_sharded(run_dir: Path, step: int, engine_state: dict, trainer_state: dict, *, keep: int,
                  ranks: Ranks) -> Path:
    """Rank 0 makes the hidden folder, every rank writes its shard into it, rank 0 writes the
    rest and the manifest and renames it into place. Every rank returns or raises alike."""
    root = run_dir / "checkpoints"
    tmp, problem = None, None
    if ranks.main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _check_disk(root, engine_state, factor=ranks.world)
            tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except (OSError, CheckpointError) as exc:
            problem = str(exc) if isinstance(exc, CheckpointError) else f"could not save checkpoint {step}: {exc}"
    tmp_name, problem = ranks.broadcast((None if tmp is None else str(tmp), problem))
    if problem:
        raise CheckpointError(problem)
    tmp = Path(tmp_name)
    weights_files, moment_files = layout.shard_files(ranks.world)
    optimizer, described, mine = {}, {}, None
    try:
        optimizer, described = _write_shard(tmp, engine_state, weights_files[ranks.rank], moment_files[ranks.rank])
    except (OSError, SafetensorError) as exc:
        mine = _save_failed(step, root, exc)
    # a sync: a few hundred bytes per rank (its problem, step counts and files' sizes and hashes)
    reports = ranks.gather((mine, optimizer.get("param_steps", {}), described))
    problems = [p for p, _, _ in reports if p]
    final = root / checkpoint_name(step)
    if ranks.main and not problems:
        param_steps = {k: v for _, steps, _ in reports for k, v in steps.items()}
        optimizer.pop("param_steps", None)
        if param_steps:
            optimizer["param_steps"] = param_steps
        written = {name: meta for _, _, files in reports for name, meta in files.items()}
        try:
            _write_common(tmp, step, optimizer, trainer_state, shards=ranks.world, described=written)
            _commit(root, tmp, final, keep)
        except (OSError, SafetensorError) as exc:
            problems.append(_save_failed(step, root, exc))
    problems = ranks.broadcast(problems)
    if problems:
        if ranks.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(problems[0])
    return final


def _write_common(tmp: Path, step: int, optimizer: dict, trainer_state: dict, *, shards: int,
                  described: dict[str, dict]) -> None:
    """rng, state.json and (last) the manifest, once the weights and moments are written;
    `described`: the size and sha256 of every weight and moment file, from the ranks that wrote them."""
    rng_tensors, rng_json = _rng_state()
    save_file(rng_tensors, tmp / "rng.safetensors")
    faults.reach("checkpoint-file")
    state = {"format": layout.FORMAT, "step": step, "optimizer": optimizer, "rng": rng_json, **trainer_state}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    faults.reach("checkpoint-file")
    described = {**described, **{f: layout.describe(tmp / f) for f in ("rng.safetensors", "state.json")}}
    manifest = {"format": layout.FORMAT, "step": step, "shards": shards,
                "files": {f: described[f] for f in sorted(described)}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for f in ["rng.safetensors", "state.json", "manifest.json"]:
        layout.fsync(tmp / f)


def _commit(root: Path, tmp: Path, final: Path, keep: int) -> None:
    """Rename the finished folder into place, then prune older checkpoints."""
    old = root / f".old-{final.name}-{os.getpid()}"
    if final.exists():  # re-saving the same step (e.g. save-now right after a periodic save)
        os.replace(final, old)  # renamed, not deleted, until the new one is in place
    os.replace(tmp, final)
    layout.fsync_dir(root)
    faults.reach("checkpoint-commit")
    shutil.rmtree(old, ignore_errors=True)
    _prune(root, keep)


def _check_disk(root: Path, engine_state: dict, factor: int = 1) -> None:
    """Refuse to start a save that cannot fit (the moments and weights dominate its size)."""
    tensors = [*engine_state["weights"].values(), *engine_state["optimizer"]["exp_avg"].values(),
               *engine_state["optimizer"]["exp_avg_sq"].values()]
    need = sum(t.numel() * t.element_size() for t in tensors) * factor + (1 << 20)
    free = shutil.disk_usage(root).free
    if free < need:
        raise CheckpointError(f"not enough disk space to save a checkpoint in {root}: "
                              f"{need / 2**30:.2f} GiB needed, {free / 2**30:.2f} GiB free")


def _write(tmp: Path, step: int, engine_state: dict, trainer_state: dict) -> None:
    """Every file of a one-process checkpoint into `tmp`, each fsynced, the manifest last."""
    (weights_name,), (moments_name,) = layout.shard_files(1)
    optimizer, described = _write_shard(tmp, engine_state, weights_name, moments_name)
    _write_common(tmp, step, optimizer, trainer_state, shards=1, described=described)


def _write_shard(tmp: Path, engine_state: dict, weights_name: str, moments_name: str) -> tuple[dict, dict]:
    """This process's weights and moments, fsynced; returns the optimizer state left to record and
    the two files' manifest entries (hashed by the writer as it wrote them)."""
    optimizer = dict(engine_state["optimizer"])
    moments = {f"exp_avg/{n}": t for n, t in optimizer.pop("exp_avg").items()}
    moments.update({f"exp_avg_sq/{n}": t for n, t in optimizer.pop("exp_avg_sq").items()})
    # one tensor staged at a time, each file hashed as it is written (not read back)
    described = {weights_name: write_tensors(tmp / weights_name, engine_state["weights"])}
    faults.reach("checkpoint-file")
    described[moments_name] = write_tensors(tmp / moments_name, moments)
    faults.reach("checkpoint-file")
    for name in (weights_name, moments_name):
        layout.fsync(tmp / name)
    return optimizer, described


def _save_failed(step: int, root: Path, exc: BaseException) -> str:
    return f"could not save checkpoint {step} in {root}: {getattr(exc, 'strerror', None) or exc}"


def _rng_state() -> tuple[dict, dict]:
    import random

    version, internal, gauss = random.getstate()
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            tensors[f"torch_cuda_{i}"] = torch.cuda.get_rng_state(i)
    return tensors, {"python": [version, list(internal), gauss]}


def _prune(root: Path, keep: int) -> None:
    done = list_checkpoints(root.parent)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")]:  # left by killed saves
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
