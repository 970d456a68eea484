"""Out of memory in the middle of a run: the step is redone with smaller micro-batches and more
accumulation (same sequences, same global batch), nothing is lost, the losses stay those of an
uninterrupted run within floating-point tolerance, and a resume afterwards continues the same way."""

from __future__ import annotations

import json
import random

import pytest

from homestar.cli import main
from homestar.train.events import read_events
from homestar.train.faults import OOM_ENV
from homestar.train.recovery import is_out_of_memory, smaller_micro_batch
from train_helpers import FAST, step_losses

STEPS = 10
RUNTIMES = {"torch": ["--runtime", "torch"], "chunked": ["--runtime", "chunked", "--gpu-mem-gib", "0.02"]}


def _train(corpus, run_dir, steps, *extra) -> int:
    return main(["train", *FAST, "--data", str(corpus), "--run-dir", str(run_dir), "--steps", str(steps),
                 "--accum", "2", "--save-every", "5", *extra])


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_injected_oom_is_recovered_without_a_lost_step(runtime, tmp_path, homestar_home, corpus_dir, monkeypatch):
    oom_step = random.Random(f"oom-{runtime}").randint(2, STEPS)
    whole, hit = tmp_path / "whole", tmp_path / "hit"
    assert _train(corpus_dir, whole, STEPS + 4, *RUNTIMES[runtime]) == 0
    monkeypatch.setenv(OOM_ENV, str(oom_step))
    assert _train(corpus_dir, hit, STEPS, *RUNTIMES[runtime]) == 0
    monkeypatch.delenv(OOM_ENV)

    events = read_events(hit / "metrics.jsonl")
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps == list(range(1, STEPS + 1))  # every step once: none lost, none repeated
    recovered = [e for e in events if e["event"] == "status" and e["state"] == "oom-recovered"]
    assert len(recovered) == 1 and recovered[0]["step"] == oom_step - 1
    assert "micro-batch 4 -> 2" in recovered[0]["message"] and "accumulation 2 -> 4" in recovered[0]["message"]
    config = json.loads((hit / "config.json").read_text())
    assert (config["micro_batch"], config["accum"], config["data_micro_batch"]) == (2, 4, 4)

    expected, got = step_losses(whole), step_losses(hit)
    for step in range(1, oom_step):
        assert got[step] == expected[step]  # before the error: the very same floats
    for step in range(oom_step, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), step

    # A resume reads the new shape from config.json and draws the same sequences.
    assert main(["resume", str(hit), "--steps", str(STEPS + 4), "--headless"]) == 0
    got = step_losses(hit)
    assert sorted(got) == list(range(1, STEPS + 5))
    assert got[STEPS + 4] == pytest.approx(expected[STEPS + 4], rel=1e-4)


def test_oom_at_micro_batch_one_fails_in_one_line(tmp_path, homestar_home, corpus_dir, monkeypatch, capsys):
    monkeypatch.setenv(OOM_ENV, "2")
    run = tmp_path / "run"
    code = main(["train", *FAST, "--data", str(corpus_dir), "--run-dir", str(run), "--steps", "4",
                 "--micro-batch", "1", "--runtime", "torch", "--save-every", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "out of GPU memory" in err[0]
    assert max(step_losses(run)) == 1
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["status"] == "failed"


def test_what_counts_as_out_of_memory():
    import torch

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory (cudaHostAlloc failed for pinned memory)"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("CUDA out of memory"))


def test_smaller_micro_batch_keeps_the_global_batch_whole():
    assert [smaller_micro_batch(m) for m in (1, 2, 3, 4, 6, 7, 12)] == [None, 1, 1, 2, 3, 1, 6]
