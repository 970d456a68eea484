"""Checkpoints: written atomically, validated on load, last K kept.

Layout of `RUN_DIR/checkpoints/step_NNNNNNN/`:
  model.safetensors       fp32 weights by parameter name (canonical engine state)
  optimizer.safetensors   "exp_avg/<name>" and "exp_avg_sq/<name>" fp32 moments
  rng.safetensors         torch CPU (and CUDA) generator states
  state.json              trainer step, optimizer step and extras, data cursor, Python RNG
  manifest.json           size and sha256 of every file above; written last
A run of N > 1 ranks writes shards instead of the two large files: rank r writes
`model-RRRRR-of-NNNNN.safetensors` and `optimizer-RRRRR-of-NNNNN.safetensors` holding the
parameters it owns, rank 0 the rest, and the manifest says `"shards": N`. Each rank hashes the
files it wrote, right after writing them; rank 0 gathers the descriptions into the manifest.
Loading merges the shards by parameter name into the canonical state, so any number of ranks can
resume it: every rank reads all weights but only the moments of the parameters it keeps, the
ranks share the hashing out (each file hashed once) and agree on which checkpoint they load.
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
from safetensors import SafetensorError, safe_open
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
    state = {"format": FORMAT, "step": step, "optimizer": optimizer, "rng": rng_json, **trainer_state}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    faults.reach("checkpoint-file")
    described = {**described, **{f: _describe(tmp / f) for f in ("rng.safetensors", "state.json")}}
    manifest = {"format": FORMAT, "step": step, "shards": shards, "files": {f: described[f] for f in sorted(described)}}
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
    optimizer, described = _write_shard(tmp, engine_state, weights_name, moments_name)
    _write_common(tmp, step, optimizer, trainer_state, shards=1, described=described)


def _write_shard(tmp: Path, engine_state: dict, weights_name: str, moments_name: str) -> tuple[dict, dict]:
    """This process's weights and moments, fsynced; returns the optimizer state left to record and
    the two files' manifest entries (hashed here, by the writer, while they are in the page cache)."""
    optimizer = dict(engine_state["optimizer"])
    moments = {f"exp_avg/{n}": t for n, t in optimizer.pop("exp_avg").items()}
    moments.update({f"exp_avg_sq/{n}": t for n, t in optimizer.pop("exp_avg_sq").items()})
    save_file(_contiguous(engine_state["weights"]), tmp / weights_name)
    faults.reach("checkpoint-file")
    save_file(_contiguous(moments), tmp / moments_name)
    faults.reach("checkpoint-file")
    for name in (weights_name, moments_name):
        _fsync(tmp / name)
    return optimizer, {name: _describe(tmp / name) for name in (weights_name, moments_name)}


def _save_failed(step: int, root: Path, exc: BaseException) -> str:
    return f"could not save checkpoint {step} in {root}: {getattr(exc, 'strerror', None) or exc}"


def load_latest(run_dir: Path, *, warn=None, ranks: Ranks | None = None,
                wants: set[str] | None = None) -> tuple[dict, dict]:
    """(engine_state, trainer_state) of the newest valid checkpoint; falls back past damaged ones.
    Across ranks every rank calls it, and all load the same checkpoint (see `load_checkpoint`
    for `wants` and what each rank reads); rank 0 alone warns."""
    ranks = ranks or Ranks()
    candidates = ranks.broadcast(list_checkpoints(run_dir) if ranks.main else None)  # one list: same tries
    if not candidates:
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from")
    problems = []
    for path in reversed(candidates):
        try:
            loaded = load_checkpoint(path, ranks=ranks, wants=wants)
        except CheckpointError as exc:
            problems.append(str(exc))
            if ranks.main:
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


def load_checkpoint(path: Path, *, ranks: Ranks | None = None,
                    wants: set[str] | None = None) -> tuple[dict, dict]:
    """Validate a checkpoint folder against its manifest and load it (no pickle anywhere).

    `wants`: the parameters whose Adam moments this process keeps (None: all); other moments stay
    out of the state, and a moment file that holds none of them is not read at all. Across ranks
    every rank calls it: every file is hashed once, by one of the ranks that read it (the bytes
    shared out evenly), nothing is loaded before every file checked out, and a problem any rank
    meets is raised on all of them, so that they fall back together. Costs three small syncs."""
    ranks = ranks or Ranks()
    found, problem = _attempt(lambda: _plan_reads(path, wants))
    files, plan = found or ({}, {})
    reads = _agree(ranks, problem, sorted(plan))
    mine = _hash_share(files, reads)[ranks.rank]
    _agree(ranks, _attempt(lambda: _verify(path, {n: m for n, m in files.items() if n in mine}))[1])
    loaded, problem = _attempt(lambda: _read(path, plan))
    _agree(ranks, problem)
    return loaded


def _plan_reads(path: Path, wants: set[str] | None) -> tuple[dict[str, dict], dict[str, set[str] | None]]:
    """The manifest's files, and what this process reads of them: {file name: None (all of it)
    or the names of the tensors it needs}, in reading order. Weights, rng and state are read
    whole; with `wants`, a moment file's header (a few KB) says which of its moments are wanted."""
    files = _read_manifest(path)
    weights, moments = shard_files(_shards(files))
    plan: dict[str, set[str] | None] = dict.fromkeys(["state.json", *weights])
    for name in moments:
        keys = None if wants is None else _wanted_keys(path / name, wants)
        if keys is None or keys:
            plan[name] = keys
    plan["rng.safetensors"] = None
    return files, plan


def _wanted_keys(file: Path, wants: set[str]) -> set[str] | None:
    """The tensors of a moment file ("exp_avg/<name>", "exp_avg_sq/<name>") of wanted parameters;
    None (read it all) when its header is unreadable: its hash, checked first, then names the damage."""
    try:
        with safe_open(file, framework="pt") as f:  # the header alone
            keys = list(f.keys())
    except (OSError, ValueError, SafetensorError):
        return None
    return {k for k in keys if k.split("/", 1)[-1] in wants}


def _hash_share(files: dict[str, dict], reads: list[list[str]]) -> list[set[str]]:
    """The files each rank hashes: every file once, the largest first, by the least loaded of the
    ranks that read it (of all, if none does). The same answer on every rank."""
    load = [0] * len(reads)
    share: list[set[str]] = [set() for _ in reads]
    for name in sorted(files, key=lambda n: (-files[n]["bytes"], n)):
        readers = [r for r, names in enumerate(reads) if name in names] or range(len(reads))
        rank = min(readers, key=lambda r: (load[r], r))
        share[rank].add(name)
        load[rank] += files[name]["bytes"]
    return share


def _read(path: Path, plan: dict[str, set[str] | None]) -> tuple[dict, dict]:
    """(engine_state, trainer_state) from the files `plan` names, already verified."""
    current = path / "state.json"
    try:
        state = json.loads(current.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("optimizer"), dict):
            raise ValueError("not a checkpoint state")
        int(state["step"])
        weights, moments = {}, {}
        for name, keys in plan.items():
            current = path / name
            if name.startswith("model"):
                weights.update(load_file(current))
            elif name.startswith("optimizer"):
                moments.update(_tensors(current, keys))
        current = path / "rng.safetensors"
        rng = load_file(current)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint file {current} is unreadable ({type(exc).__name__})") from None
    optimizer = dict(state.pop("optimizer"))
    optimizer["exp_avg"] = {k.split("/", 1)[1]: v for k, v in moments.items() if k.startswith("exp_avg/")}
    optimizer["exp_avg_sq"] = {k.split("/", 1)[1]: v for k, v in moments.items() if k.startswith("exp_avg_sq/")}
    state["rng_tensors"] = rng
    return {"weights": weights, "optimizer": optimizer}, state


def _tensors(file: Path, keys: set[str] | None) -> dict:
    """All of a safetensors file, or the named tensors alone (the rest of it is not read)."""
    if keys is None:
        return load_file(file)
    with safe_open(file, framework="pt") as f:
        return {k: f.get_tensor(k) for k in sorted(keys)}


def _attempt(work) -> tuple:
    """(work(), None), or (None, the message of the CheckpointError it raised)."""
    try:
        return work(), None
    except CheckpointError as exc:
        return None, str(exc)


def _agree(ranks: Ranks, problem: str | None, share=None) -> list:
    """Every rank's `share`, in rank order, once all have got here; the first rank's problem raised
    on every rank if any met one. A sync across ranks (small objects); none on one process."""
    outcomes = ranks.gather((problem, share))
    problems = [p for p, _ in outcomes if p]
    if problems:
        raise CheckpointError(problems[0])
    return [s for _, s in outcomes]


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
            isinstance(m, dict) and set(m) == {"bytes", "sha256"} and isinstance(m["bytes"], int)
            and isinstance(m["sha256"], str) for m in files.values()):
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
