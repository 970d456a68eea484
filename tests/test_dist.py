"""Training on several processes (torchrun, gloo on the CPU) against one process.

Same seed, same global batch: 2 ranks at micro-batch 2 must give the per-step losses of 1 rank at
micro-batch 4; a checkpoint written by 2 ranks resumes on 1 and one written by 1 rank on 2 with
the losses the unbroken run had; two torchrun "nodes" joined through the c10d rendezvous on
localhost train like one process.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from homestar.train.checkpoint import load_weights
from train_helpers import make_corpus, step_losses

FLAGS = ["--preset", "debug", "--device", "cpu", "--seq-len", "64", "--eval-every", "2", "--sample-every", "0",
         "--headless", "--runtime", "chunked", "--gpu-mem-gib", "0.02", "--save-every", "2"]
ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _env(home: Path) -> dict:
    env = dict(os.environ, HOMESTAR_HOME=str(home), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _run(cmd: list[str], cwd: Path, home: Path) -> None:
    done = subprocess.run(cmd, cwd=cwd, env=_env(home), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def _homestar(*args: str) -> list[str]:
    return [sys.executable, "-m", "homestar", *args]


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [*TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), "-m", "homestar", *args]


def _close(a: dict[int, float], b: dict[int, float], steps) -> None:
    for step in steps:
        assert a[step] == pytest.approx(b[step], rel=1e-3), (step, a, b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process at micro-batch 4, four steps, checkpoints at 2 and 4."""
    tmp = tmp_path_factory.mktemp("dist")
    make_corpus(tmp / "corpus")
    _run(_homestar("train", *FLAGS, "--data", "corpus", "--micro-batch", "4", "--steps", "4",
                   "--run-dir", "one"), tmp, tmp / "home")
    return tmp, step_losses(tmp / "one")


def test_two_ranks_match_one_and_reshard_to_one(reference):
    tmp, one = reference
    _run(_torchrun(2, "train", *FLAGS, "--data", "corpus", "--micro-batch", "2", "--steps", "2",
                   "--run-dir", "two"), tmp, tmp / "home")
    saved = sorted(p.name for p in (tmp / "two" / "checkpoints" / "step_0000002").iterdir())
    assert "model-00001-of-00002.safetensors" in saved and "model.safetensors" not in saved
    _close(step_losses(tmp / "two"), one, [1, 2])
    _, merged = load_weights(tmp / "two", 2)  # the shards, merged by name (what sample/export read)
    _, single = load_weights(tmp / "one", 2)
    assert merged.keys() == single.keys()
    for name, tensor in single.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-4, atol=1e-5)
    _run(_homestar("resume", "two", "--steps", "4", "--headless"), tmp, tmp / "home")  # 2 ranks -> 1
    _close(step_losses(tmp / "two"), one, [1, 2, 3, 4])


def test_one_rank_checkpoint_resumes_on_two(reference):
    tmp, one = reference
    shutil.copytree(tmp / "one", tmp / "again")
    shutil.rmtree(tmp / "again" / "checkpoints" / "step_0000004")
    _run(_torchrun(2, "resume", "again", "--steps", "4", "--headless"), tmp, tmp / "home")  # 1 rank -> 2
    _close(step_losses(tmp / "again"), one, [1, 2, 3, 4])
    written = {p.name for p in (tmp / "again" / "checkpoints" / "step_0000004").iterdir()}
    assert {"model-00000-of-00002.safetensors", "model-00001-of-00002.safetensors"} <= written


def test_two_nodes_through_c10d_rendezvous(reference):
    tmp, one = reference
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [[*TORCHRUN, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "homestar-test",
              "-m", "homestar", "train", *FLAGS, "--data", "corpus", "--micro-batch", "2", "--steps", "2",
              "--run-dir", "nodes"] for rank in (0, 1)]
    procs = [subprocess.Popen(cmd, cwd=tmp, env=_env(tmp / "home"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for cmd in nodes]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    _close(step_losses(tmp / "nodes"), one, [1, 2])
