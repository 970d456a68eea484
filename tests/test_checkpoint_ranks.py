"""Checkpoints across 2 gloo ranks: who hashes and reads what.

Save: each rank hashes the two files it wrote, and rank 0 writes the manifest from the ranks'
descriptions (it hashes nothing of rank 1's). Load: every rank reads all weights but only the
moments of the parameters it keeps, every file is hashed by exactly one rank, and a damaged shard
of rank 1 makes both ranks fall back to the previous checkpoint together. The checkpoint-level
tests use small fake states (no model); the last one trains the debug preset under torchrun.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import homestar.train.checkpoint as ckpt
from homestar.train.checkpoint import layout, save, tensor_file
from homestar.train.distributed import Ranks
from train_helpers import make_corpus, step_losses

WORLD = 2
NAMES = ["a.weight", "b.weight", "c.weight", "d.weight"]  # rank r owns NAMES[r::2]; equal sizes


def _full(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    weights = {n: torch.randn(64, 64, generator=g) for n in NAMES}  # shards outweigh rng, state
    return {"weights": weights, "optimizer": {"step": step, "exp_avg": {n: w * 0.1 for n, w in weights.items()},
                                              "exp_avg_sq": {n: w * w for n, w in weights.items()}}}


def _shard(state: dict, names: list[str]) -> dict:
    opt = state["optimizer"]
    return {"weights": {n: state["weights"][n] for n in names},
            "optimizer": {"step": opt["step"], "exp_avg": {n: opt["exp_avg"][n] for n in names},
                          "exp_avg_sq": {n: opt["exp_avg_sq"][n] for n in names}}}


def _read_all(state: dict) -> dict:
    """The state with every (lazily read) mapping made a dict: each tensor read from its file."""
    opt = state["optimizer"]
    return {"weights": dict(state["weights"]),
            "optimizer": {**opt, "exp_avg": dict(opt["exp_avg"]), "exp_avg_sq": dict(opt["exp_avg_sq"])}}


def _moment_files(read: list[str]) -> list[str]:
    """The moment files among those read, each once, in first-read order."""
    return list(dict.fromkeys(f for f in read if f.startswith("optimizer")))


def _spy(module, name: str, calls: list) -> None:
    """Record the file name each call of `module`.`name` is given (this process alone)."""
    real = getattr(module, name)

    def spy(file, *args):
        calls.append(Path(file).name)
        return real(file, *args)

    setattr(module, name, spy)


def _rank(rank: int, init: str, tmp: Path, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        ranks, mine = Ranks(rank=rank, world=WORLD), set(NAMES[rank::WORLD])
        hashed, read = [], []
        _spy(layout, "describe", hashed)
        _spy(save, "write_tensors", hashed)  # the shard writer hashes what it writes
        _spy(tensor_file, "_reading", read)  # every header or tensor read of a loaded state
        for step in (1, 2):
            ckpt.save_checkpoint(tmp / "two", step, _shard(_full(step), sorted(mine)), {"data": {}, "tokens": step},
                                 ranks=ranks)
        out[rank, "save"] = list(hashed)
        hashed.clear()
        engine_state, trainer_state = ckpt.load_latest(tmp / "two", ranks=ranks, wants=mine)
        engine_state = _read_all(engine_state)  # the tensors are read from their files here
        out[rank, "load"] = (list(hashed), _moment_files(read), engine_state, trainer_state["step"])
        hashed.clear()
        read.clear()
        engine_state = _read_all(ckpt.load_latest(tmp / "one", ranks=ranks, wants=mine)[0])
        out[rank, "from one"] = (engine_state, _moment_files(read))
        ranks.barrier()
        if rank == 0:  # rank 1's moments of step 2: same size, wrong bytes
            damaged = tmp / "two" / "checkpoints" / "step_0000002" / "optimizer-00001-of-00002.safetensors"
            damaged.write_bytes(b"\0" * damaged.stat().st_size)
        ranks.barrier()
        warnings = []
        _, trainer_state = ckpt.load_latest(tmp / "two", ranks=ranks, wants=mine, warn=warnings.append)
        out[rank, "fallback"] = (trainer_state["step"], warnings)
    finally:
        dist.destroy_process_group()


def _assert_state(state: dict, expected: dict, moments: set[str]) -> None:
    assert state["weights"].keys() == expected["weights"].keys()
    for n, w in expected["weights"].items():
        assert torch.equal(state["weights"][n], w), n
    for key in ("exp_avg", "exp_avg_sq"):
        assert set(state["optimizer"][key]) == moments
        for n in moments:
            assert torch.equal(state["optimizer"][key][n], expected["optimizer"][key][n]), (key, n)


def test_each_rank_hashes_and_reads_its_own_files(tmp_path):
    ckpt.save_checkpoint(tmp_path / "one", 3, _full(3), {"data": {}, "tokens": 3})  # one process, for 1 -> 2
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(f"file://{tmp_path / 'store'}", tmp_path, out), nprocs=WORLD, join=True)
        out = dict(out)

    # save: rank r hashed its own two files of each step, rank 0 also rng and state; nothing twice
    common = ["rng.safetensors", "state.json"]
    for rank in range(WORLD):
        own = [f"model-{rank:05d}-of-00002.safetensors", f"optimizer-{rank:05d}-of-00002.safetensors"]
        assert out[rank, "save"] == (own + (common if rank == 0 else [])) * 2
    # the manifest holds every rank's descriptions, true to the bytes on disk (format unchanged)
    folder = tmp_path / "two" / "checkpoints" / "step_0000001"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest) == {"format", "step", "shards", "files"} and manifest["shards"] == WORLD
    assert set(manifest["files"]) == {p.name for p in folder.iterdir()} - {"manifest.json"}
    for name, meta in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert meta == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name

    # load: each file hashed once between the ranks; each rank reads its own moment file alone
    hashed = [out[r, "load"][0] for r in range(WORLD)]
    assert sorted(hashed[0] + hashed[1]) == sorted(manifest["files"])
    for rank in range(WORLD):
        hashes, reads, state, step = out[rank, "load"]
        assert step == 2 and reads == [f"optimizer-{rank:05d}-of-00002.safetensors"]
        assert not [f for f in hashes if f"-{1 - rank:05d}-of-" in f]  # the shares: each its own shards
        _assert_state(state, _full(2), set(NAMES[rank::WORLD]))
        # a one-process checkpoint on 2 ranks: each takes its parameters' moments from the one file
        state, reads = out[rank, "from one"]
        assert reads == ["optimizer.safetensors"]
        _assert_state(state, _full(3), set(NAMES[rank::WORLD]))

    # a damaged shard of rank 1 sends both ranks back to step 1; rank 0 alone warns, naming it
    assert out[0, "fallback"][0] == out[1, "fallback"][0] == 1
    assert out[1, "fallback"][1] == [] and len(out[0, "fallback"][1]) == 1
    assert "optimizer-00001-of-00002.safetensors is damaged" in out[0, "fallback"][1][0]
    # and one process resharding the 2-rank checkpoint reads every shard
    warnings = []
    state, trainer_state = ckpt.load_latest(tmp_path / "two", warn=warnings.append)
    assert trainer_state["step"] == 1 and len(warnings) == 1
    _assert_state(state, _full(1), set(NAMES))


def test_two_ranks_resume_past_a_damaged_shard(tmp_path):
    """Debug preset on 2 ranks, a checkpoint per step; rank 1's moments of step 2 damaged: the
    resume on 2 ranks warns once, naming the file, and trains step 2 again from step 1 to the loss
    it had (so each rank's moments, read from its own shard alone, are the ones saved)."""
    make_corpus(tmp_path / "corpus")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, HOMESTAR_HOME=str(tmp_path / "home"), PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
                "-m", "homestar"]
    flags = ["--preset", "debug", "--device", "cpu", "--seq-len", "64", "--micro-batch", "2", "--eval-every", "0",
             "--sample-every", "0", "--headless", "--runtime", "chunked", "--gpu-mem-gib", "0.02"]

    def run(*args: str) -> str:
        done = subprocess.run([*torchrun, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        return done.stderr

    run("train", *flags, "--data", "corpus", "--steps", "2", "--save-every", "1", "--run-dir", "run")
    before = step_losses(tmp_path / "run")
    shard = tmp_path / "run" / "checkpoints" / "step_0000002" / "optimizer-00001-of-00002.safetensors"
    shard.write_bytes(b"\0" * shard.stat().st_size)
    err = run("resume", "run", "--steps", "2", "--headless")
    assert err.count("warning: ") == 1 and f"step_0000002/{shard.name} is damaged" in err, err[-3000:]
    after = step_losses(tmp_path / "run")
    assert after[2] == before[2] and after[1] == before[1]
