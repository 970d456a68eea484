"""Checkpoints: written atomically, validated on load, last K kept.

Layout of `RUN_DIR/checkpoints/step_NNNNNNN/`:
  model.safetensors       fp32 weights by parameter name (canonical engine state)
  optimizer.safetensors   "exp_avg/<name>" and "exp_avg_sq/<name>" fp32 moments
  rng.safetensors         torch CPU (and CUDA) generator states
  state.json              trainer step, optimizer step and extras, data cursor, Python RNG
  manifest.json           size and sha256 of every file above; written last
A run of N > 1 ranks writes shards instead of the two large files: rank r writes
`model-RRRRR-of-NNNNN.safetensors` and `optimizer-RRRRR-of-NNNNN.safetensors` holding the
parameters it owns, rank 0 the rest, and the manifest says `"shards": N`. Loading merges the
shards by parameter name into the full canonical state, so any number of ranks can resume it.
A checkpoint is built in a hidden temporary folder, every file fsynced, then renamed into place, so
a crash mid-save leaves the previous checkpoint as the latest good one. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from homestar.errors import CheckpointError
from homestar.train import faults
from homestar.train.distributed import Ranks
from homestar.train.run_files import checkpoint_name, checkpoint_step, list_checkpoints

FORMAT = 1


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


def shard_files(shards: int) -> tuple[list[str], list[str]]:
    """(weight files, moment files) of a checkpoint written by `shards` ranks."""
    if shards == 1:
        return ["model.safetensors"], ["optimizer.safetensors"]
    return ([f"model-{r:05d}-of-{shards:05d}.safetensors" for r in range(shards)],
            [f"optimizer-{r:05d}-of-{shards:05d}.safetensors" for r in range(shards)])


def _expected_files(shards: int) -> set[str]:
    weights, moments = shard_files(shards)
    return {*weights, *moments, "rng.safetensors", "state.json"}


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
    weights_files, moment_files = shard_files(ranks.world)
    optimizer, mine = {}, None
    try:
        optimizer = _write_shard(tmp, engine_state, weights_files[ranks.rank], moment_files[ranks.rank])
    except (OSError, SafetensorError) as exc:
        mine = _save_failed(step, root, exc)
    reports = ranks.gather((mine, optimizer.get("param_steps", {})))
    problems = [p for p, _ in reports if p]
    final = root / checkpoint_name(step)
    if ranks.main and not problems:
        param_steps = {k: v for _, steps in reports for k, v in steps.items()}
        optimizer.pop("param_steps", None)
        if param_steps:
            optimizer["param_steps"] = param_steps
        try:
            _write_common(tmp, step, optimizer, trainer_state, shards=ranks.world)
            _commit(root, tmp, final, keep)
        except (OSError, SafetensorError) as exc:
            problems.append(_save_failed(step, root, exc))
    problems = ranks.broadcast(problems)
    if problems:
        if ranks.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(problems[0])
    return final


def _write_common(tmp: Path, step: int, optimizer: dict, trainer_state: dict, *, shards: int) -> None:
    """rng, state.json and (last) the manifest, once the weights and moments are written."""
    rng_tensors, rng_json = _rng_state()
    save_file(rng_tensors, tmp / "rng.safetensors")
    faults.reach("checkpoint-file")
    state = {"format": FORMAT, "step": step, "optimizer": optimizer, "rng": rng_json, **trainer_state}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    faults.reach("checkpoint-file")
    files = sorted(_expected_files(shards))
    manifest = {"format": FORMAT, "step": step, "shards": shards, "files": {f: _describe(tmp / f) for f in files}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for f in ["rng.safetensors", "state.json", "manifest.json"]:
        _fsync(tmp / f)


def _commit(root: Path, tmp: Path, final: Path, keep: int) -> None:
    """Rename the finished folder into place, then prune older checkpoints."""
    old = root / f".old-{final.name}-{os.getpid()}"
    if final.exists():  # re-saving the same step (e.g. save-now right after a periodic save)
        os.replace(final, old)  # renamed, not deleted, until the new one is in place
    os.replace(tmp, final)
    _fsync_dir(root)
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
    (weights_name,), (moments_name,) = shard_files(1)
    optimizer = _write_shard(tmp, engine_state, weights_name, moments_name)
    _write_common(tmp, step, optimizer, trainer_state, shards=1)


def _write_shard(tmp: Path, engine_state: dict, weights_name: str, moments_name: str) -> dict:
    """This process's weights and moments, fsynced; returns the optimizer state left to record."""
    optimizer = dict(engine_state["optimizer"])
    moments = {f"exp_avg/{n}": t for n, t in optimizer.pop("exp_avg").items()}
    moments.update({f"exp_avg_sq/{n}": t for n, t in optimizer.pop("exp_avg_sq").items()})
    save_file(_contiguous(engine_state["weights"]), tmp / weights_name)
    faults.reach("checkpoint-file")
    save_file(_contiguous(moments), tmp / moments_name)
    faults.reach("checkpoint-file")
    for name in (weights_name, moments_name):
        _fsync(tmp / name)
    return optimizer


def _save_failed(step: int, root: Path, exc: BaseException) -> str:
    return f"could not save checkpoint {step} in {root}: {getattr(exc, 'strerror', None) or exc}"


def load_latest(run_dir: Path, *, warn=None) -> tuple[dict, dict]:
    """(engine_state, trainer_state) of the newest valid checkpoint; falls back past damaged ones."""
    candidates = list_checkpoints(run_dir)
    if not candidates:
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from")
    problems = []
    for path in reversed(candidates):
        try:
            loaded = load_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            (warn or _warn)(f"warning: {exc}; trying an older checkpoint")
            continue
        return loaded
    raise CheckpointError(f"no usable checkpoint in {run_dir}: {problems[0]}")


def load_weights(run_dir: Path, step: int | None = None) -> tuple[int, dict]:
    """(step, {name: fp32 tensor}) of checkpoint `step`, or of the newest whose weights are intact.

    Verifies and reads model.safetensors alone: the optimizer moments (twice the weights) stay on
    disk, which is what sampling and export need."""
    saved = list_checkpoints(run_dir)
    if not saved:
        raise CheckpointError(f"{run_dir} has no checkpoint yet")
    if step is not None:
        path = run_dir / "checkpoints" / checkpoint_name(step)
        if path not in saved:
            steps = ", ".join(str(checkpoint_step(p)) for p in saved)
            raise CheckpointError(f"{run_dir} has no checkpoint at step {step} (saved steps: {steps})")
        return step, _verified_weights(path)
    problems = []
    for path in reversed(saved):
        try:
            return checkpoint_step(path), _verified_weights(path)
        except CheckpointError as exc:
            problems.append(str(exc))
    raise CheckpointError(problems[0])


def _verified_weights(path: Path) -> dict:
    files = _read_manifest(path)
    names = shard_files(_shards(files))[0]
    _verify(path, {name: files[name] for name in names})
    weights = {}
    for name in names:
        try:
            weights.update(load_file(path / name))
        except (OSError, ValueError, SafetensorError) as exc:
            raise CheckpointError(f"checkpoint file {path / name} is unreadable ({type(exc).__name__})") from None
    return weights


def _shards(files: dict) -> int:
    """How many ranks wrote a checkpoint whose manifest lists `files` (already validated)."""
    return sum(1 for name in files if name.startswith("model")) if "model.safetensors" not in files else 1


def _verify(path: Path, files: dict[str, dict]) -> None:
    """Each named file's size and sha256 against the manifest's, or CheckpointError naming it."""
    for name, meta in files.items():
        try:
            found = _describe(path / name)
        except OSError as exc:
            raise CheckpointError(f"checkpoint file {path / name} is unreadable ({exc.strerror or exc})") from None
        if found != meta:
            raise CheckpointError(f"checkpoint file {path / name} is damaged (size or hash mismatch)")


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """Validate a checkpoint folder against its manifest and load it (no pickle anywhere)."""
    files = _read_manifest(path)
    _verify(path, files)
    weight_files, moment_files = shard_files(_shards(files))
    current = path / "state.json"
    try:
        state = json.loads(current.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("optimizer"), dict):
            raise ValueError("not a checkpoint state")
        int(state["step"])
        weights, moments = {}, {}
        for name in weight_files:
            current = path / name
            weights.update(load_file(current))
        for name in moment_files:
            current = path / name
            moments.update(load_file(current))
        current = path / "rng.safetensors"
        rng = load_file(current)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint file {current} is unreadable ({type(exc).__name__})") from None
    optimizer = dict(state.pop("optimizer"))
    optimizer["exp_avg"] = {k.split("/", 1)[1]: v for k, v in moments.items() if k.startswith("exp_avg/")}
    optimizer["exp_avg_sq"] = {k.split("/", 1)[1]: v for k, v in moments.items() if k.startswith("exp_avg_sq/")}
    state["rng_tensors"] = rng
    return {"weights": weights, "optimizer": optimizer}, state


def _read_manifest(path: Path) -> dict[str, dict]:
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
    if not isinstance(files, dict) or set(files) != _expected_files(shards) or not all(
            isinstance(m, dict) and set(m) == {"bytes", "sha256"} for m in files.values()):
        raise CheckpointError(f"checkpoint file {manifest_path} is damaged (not a homestar manifest)")
    return files


def restore_rng(trainer_state: dict) -> None:
    """Put Python's and torch's generators back where the checkpoint left them."""
    import random

    version, internal, gauss = trainer_state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    tensors = trainer_state.get("rng_tensors", {})
    if "torch_cpu" in tensors:
        torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"torch_cuda_{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"torch_cuda_{i}"], i)


def _rng_state() -> tuple[dict, dict]:
    import random

    version, internal, gauss = random.getstate()
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            tensors[f"torch_cuda_{i}"] = torch.cuda.get_rng_state(i)
    return tensors, {"python": [version, list(internal), gauss]}


def _contiguous(tensors: dict) -> dict:
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def _describe(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep: int) -> None:
    done = list_checkpoints(root.parent)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")]:  # left by killed saves
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def _warn(message: str) -> None:
    print(message, file=sys.stderr)
