"""A run stopped and resumed logs exactly the losses of an uninterrupted run (CPU, bit-exact)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from homestar.cli import main
from homestar.train.events import read_events
from train_helpers import FAST, step_losses


def _train(corpus, run_dir, steps, *extra):
    assert main(["train", *FAST, "--data", str(corpus), "--run-dir", str(run_dir), "--steps", str(steps),
                 "--runtime", "torch", *extra]) == 0


def _wait_for_step(run_dir, step, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(step_losses(run_dir), default=0) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"{run_dir} did not reach step {step} in {timeout} s")


def test_resume_continues_bit_exact(tmp_path, homestar_home, corpus_dir):
    whole, split = tmp_path / "whole", tmp_path / "split"
    _train(corpus_dir, whole, 40, "--save-every", "20")
    _train(corpus_dir, split, 20, "--save-every", "20")
    assert main(["resume", str(split), "--steps", "40", "--headless"]) == 0
    expected, got = step_losses(whole), step_losses(split)
    assert sorted(got) == list(range(1, 41))
    assert got == expected  # bit-exact: the same floats, step for step


def test_resume_is_bit_exact_in_resident_mode(tmp_path, homestar_home, corpus_dir, monkeypatch):
    """The chunk runtime with the whole model on the (simulated) device: parameters stay bound and
    grads accumulate into chunk views; a checkpoint then a resume still give the same floats."""
    import homestar.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "CHUNK_EVENT_SECONDS", 0.0)  # a chunk map every step
    whole, split = tmp_path / "whole", tmp_path / "split"
    resident = ("--runtime", "chunked", "--gpu-mem-gib", "1", "--accum", "2")
    _train(corpus_dir, whole, 16, "--save-every", "8", *resident)
    _train(corpus_dir, split, 8, "--save-every", "8", *resident)
    assert main(["resume", str(split), "--steps", "16", "--headless"]) == 0
    expected, got = step_losses(whole), step_losses(split)
    assert sorted(got) == list(range(1, 17))
    assert got == expected
    maps = [e["chunks"] for e in read_events(split / "metrics.jsonl") if e["event"] == "chunks"]
    assert {c["location"] for c in maps[-1]} == {"gpu"}  # every chunk on the device: resident


def test_resume_after_sigkill_between_checkpoints(tmp_path, homestar_home, corpus_dir):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _train(corpus_dir, whole, 30, "--save-every", "10")
    cmd = [sys.executable, "-m", "homestar", "train", *FAST, "--data", str(corpus_dir), "--run-dir", str(killed),
           "--steps", "30", "--save-every", "10", "--runtime", "torch"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "HOMESTAR_HOME": str(homestar_home)})
    _wait_for_step(killed, 13)  # kill after the step-10 save, before step 20's
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    logged = max(step_losses(killed))
    assert 13 <= logged < 30
    assert main(["resume", str(killed), "--headless"]) == 0
    assert step_losses(killed) == step_losses(whole)


def test_sigterm_saves_and_stops(tmp_path, homestar_home, corpus_dir):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "homestar", "train", *FAST, "--data", str(corpus_dir), "--run-dir", str(run),
           "--steps", "500", "--save-every", "0", "--runtime", "torch"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "HOMESTAR_HOME": str(homestar_home)})
    _wait_for_step(run, 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    saved = sorted((run / "checkpoints").iterdir())
    assert len(saved) == 1 and int(saved[0].name.split("_")[1]) == max(step_losses(run))
    last = (run / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"status":"stopped"' in last


@pytest.mark.parametrize("runtime_flag", ["torch"])
def test_loss_falls_and_sample_prints(tmp_path, homestar_home, corpus_dir, capsys, runtime_flag):
    run = tmp_path / "run"
    _train(corpus_dir, run, 30, "--save-every", "30", "--lr", "3e-3", "--sample-every", "15")
    losses = step_losses(run)
    # the loss level at the end, over the last five steps: one step's loss swings by +-10% with its
    # batch at this size (e.g. 5.94 then 6.60 then 6.76 at steps 28-30), the level does not
    assert sum(losses[s] for s in range(26, 31)) / 5 < 0.8 * losses[1]
    samples = [e for e in read_events(run / "metrics.jsonl") if e["event"] == "sample"]
    assert [s["step"] for s in samples] == [15, 30] and all(s["text"] for s in samples)
    capsys.readouterr()
    assert main(["runs"]) == 0  # a run kept outside the default folder is listed too
    listed = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert ["run", "debug", "30"] == listed[0][:3] and listed[0][4:] == ["finished", "yes"]
    metrics = run / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:-1]))  # as if killed before "end"
    assert main(["runs"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[4] == "finished"  # its last save is the final step
    assert main(["sample", str(run), "--prompt", "def ", "--tokens", "20"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def ") and len(out) > len("def ") + 5


def test_chunked_runtime_logs_the_losses_of_plain_pytorch(tmp_path, homestar_home, corpus_dir):
    """`train --runtime chunked --gpu-mem-gib 0.01` (a simulated device that forces eviction every
    step) logs the losses of `--runtime torch`, and logs chunk placement events."""
    _train(corpus_dir, tmp_path / "torch", 12, "--save-every", "0")
    assert main(["train", *FAST, "--data", str(corpus_dir), "--run-dir", str(tmp_path / "chunked"), "--steps", "12",
                 "--save-every", "0", "--runtime", "chunked", "--gpu-mem-gib", "0.01"]) == 0
    reference, chunked = step_losses(tmp_path / "torch"), step_losses(tmp_path / "chunked")
    assert sorted(chunked) == list(range(1, 13))
    for step, loss in reference.items():
        assert abs(chunked[step] - loss) <= 1e-4 * abs(loss), (step, loss, chunked[step])
    events = read_events(tmp_path / "chunked" / "metrics.jsonl")
    snapshots = [e for e in events if e["event"] == "chunks"]
    # in fp32 the param chunks are the master weights themselves, so no separate "master" kind
    assert snapshots and {c["kind"] for c in snapshots[0]["chunks"]} == {"param", "grad", "moments"}
    assert all(c["location"] in ("gpu", "cpu", "moving") and c["bytes"] > 0 for c in snapshots[-1]["chunks"])
