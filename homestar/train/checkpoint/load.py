"""Reading a checkpoint: the newest good one (falling back past damaged ones), each rank's read
plan and its share of the hashing, verification against the manifest before anything is loaded,
the weights alone for sampling and export, and the RNG restore. Writes nothing; file names and
hashing come from `layout`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from homestar.errors import CheckpointError
from homestar.train.checkpoint import layout
from homestar.train.checkpoint.tensor_file import LazyTensors
from homestar.train.distributed import Ranks
from homestar.train.run_files import checkpoint_name, checkpoint_step, list_checkpoints


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
    files = layout.read_manifest(path)
    names = layout.shard_files(layout.shard_count(files))[0]
    _verify(path, {name: files[name] for name in names})
    weights = {}
    for name in names:
        try:
            weights.update(load_file(path / name))
        except (OSError, ValueError, SafetensorError) as exc:
            raise CheckpointError(f"checkpoint file {path / name} is unreadable ({type(exc).__name__})") from None
    return weights


def _verify(path: Path, files: dict[str, dict]) -> None:
    """Each named file's size and sha256 against the manifest's, or CheckpointError naming it."""
    for name, meta in files.items():
        try:
            found = layout.describe(path / name)
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
    files = layout.read_manifest(path)
    weights, moments = layout.shard_files(layout.shard_count(files))
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
        # headers only: each tensor is read when the engine copies it into place (`LazyTensors`)
        weights = LazyTensors.of_files([(path / n, None) for n in plan if n.startswith("model")])
        moments = LazyTensors.of_files([(path / n, keys) for n, keys in plan.items() if n.startswith("optimizer")])
        current = path / "rng.safetensors"
        rng = load_file(current)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        current = getattr(exc, "filename", None) or current  # LazyTensors names the file it read
        raise CheckpointError(f"checkpoint file {current} is unreadable ({type(exc).__name__})") from None
    optimizer = dict(state.pop("optimizer"))
    optimizer["exp_avg"], optimizer["exp_avg_sq"] = moments.under("exp_avg"), moments.under("exp_avg_sq")
    state["rng_tensors"] = rng
    return {"weights": weights, "optimizer": optimizer}, state


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


def _warn(message: str) -> None:
    print(message, file=sys.stderr)
