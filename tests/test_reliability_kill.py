"""SIGKILL a training process at 20 random moments, resume after each: the run completes and logs
exactly the losses of an uninterrupted run, step for step (CPU, bit-exact).

Kills come from the fault hooks (homestar.train.faults: mid-step, after a step, between two files
of a checkpoint, after a checkpoint's rename, half-way through a metrics.jsonl line) and from a
random delay after start (which also lands in start-up, before the first checkpoint). Children are
forked from this process (torch already imported), so a kill-and-resume cycle costs well under a
second of start-up instead of a fresh interpreter's several seconds.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal

import pytest

from homestar.train.events import read_events
from homestar.train.faults import KILL_ENV
from homestar.train.run_files import checkpoint_step, list_checkpoints
from train_helpers import FAST, step_losses

FORK = multiprocessing.get_context("fork")
STEPS, SAVE_EVERY = 40, 5
SEED = int(os.environ.get("HOMESTAR_KILL_TEST_SEED", "20261130"))


def _child(argv: list[str], kill_at: str | None) -> None:
    """Runs in the forked process: one thread (the reference runs the same way, so the floats
    match), progress lines to /dev/null, exit with the CLI's status."""
    import torch

    torch.set_num_threads(1)
    os.environ.pop(KILL_ENV, None)
    if kill_at:
        os.environ[KILL_ENV] = kill_at
    import sys

    sys.stdout = open(os.devnull, "w")
    from homestar.cli import main

    os._exit(main(argv))


def _preload() -> None:
    """Import here, once, what every child would otherwise import after the fork (torch.optim's
    first optimizer pulls in torch._dynamo: ~3 s on this machine)."""
    import torch._dynamo  # noqa: F401

    import homestar.data  # noqa: F401
    import homestar.runtime  # noqa: F401
    import homestar.train.session  # noqa: F401


def _launch(argv: list[str], kill_at: str | None = None, delay: float | None = None) -> int:
    _preload()
    proc = FORK.Process(target=_child, args=(argv, kill_at))
    proc.start()
    if delay is not None:
        proc.join(delay)
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
    proc.join(300)
    assert proc.exitcode is not None, "a training child hung"
    return proc.exitcode


def _remaining(run_dir) -> int:
    """Steps still to train, counted from the newest checkpoint folder (an upper bound on progress)."""
    saved = list_checkpoints(run_dir)
    return STEPS - (checkpoint_step(saved[-1]) if saved else 0)


def _kill_point(mode: str, remaining: int, accum: int, rng: random.Random) -> tuple[str | None, float | None]:
    """A hook setting (or a delay) certain to fire before the process could finish its work."""
    saves = max(1, remaining // SAVE_EVERY)
    if mode == "early" and remaining >= 20:  # start-up: loading data, writing the run folder
        return None, rng.uniform(0.02, 0.5)
    if mode == "delay" and remaining >= 20:
        return None, rng.uniform(0.5, 1.5)
    if mode == "checkpoint-commit" and saves > 1:  # not the final save: that one ends the run
        return f"checkpoint-commit:{rng.randint(1, saves - 1)}", None
    if mode in ("checkpoint-file", "checkpoint-commit"):
        return f"checkpoint-file:{rng.randint(1, 4 * saves)}", None
    if mode == "micro-batch":
        return f"micro-batch:{rng.randint(1, remaining * accum)}", None
    if mode == "event":
        return f"event:{rng.randint(1, remaining)}", None
    return f"step:{rng.randint(1, remaining)}", None


def _train_with_kills(run_dir, train_argv: list[str], modes: list[str], accum: int, rng: random.Random) -> list[str]:
    """Start the run, kill it once per mode, resume (or restart when nothing was written yet)
    after each, and finally let it finish. Returns what each kill was."""
    done = []
    for mode in [*modes, None]:
        started = (run_dir / "config.json").exists()
        argv = ["resume", str(run_dir), "--headless"] if started else train_argv
        kill_at, delay = _kill_point(mode, _remaining(run_dir), accum, rng) if mode else (None, None)
        code = _launch(argv, kill_at, delay)
        if mode is None:
            assert code == 0, f"the final resume failed with status {code} after kills {done}"
        else:
            assert code == -signal.SIGKILL, f"{kill_at or f'delay {delay:.2f}s'} did not kill (status {code})"
            done.append(kill_at or f"delay {delay:.2f}s")
    return done


def _eval_losses(run_dir) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(run_dir / "metrics.jsonl") if e["event"] == "eval"}


CASES = {
    "torch": (["--runtime", "torch"], 1,
              ["early", "checkpoint-file", "micro-batch", "event", "checkpoint-commit", "step",
               "delay", "checkpoint-file", "event", "micro-batch", "checkpoint-commit", "step"]),
    "chunked": (["--runtime", "chunked", "--gpu-mem-gib", "0.02", "--accum", "2"], 2,
                ["delay", "checkpoint-file", "micro-batch", "event", "checkpoint-commit", "step",
                 "checkpoint-file", "micro-batch"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_at_random_moments_then_resume_is_bit_exact(case, tmp_path, homestar_home, corpus_dir):
    extra, accum, modes = CASES[case]
    rng = random.Random(f"{SEED}-{case}")
    base = [*FAST, "--data", str(corpus_dir), "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), *extra]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _launch(["train", *base, "--run-dir", str(whole)]) == 0
    kills = _train_with_kills(killed, ["train", *base, "--run-dir", str(killed)], modes, accum, rng)

    assert len(kills) == len(modes)
    expected, got = step_losses(whole), step_losses(killed)
    assert sorted(got) == list(range(1, STEPS + 1)), kills
    assert got == expected, f"losses differ after kills {kills} (seed {SEED})"
    assert _eval_losses(killed) == _eval_losses(whole)
    assert [p.name for p in list_checkpoints(killed)] == ["step_0000035", "step_0000040"]
    leftovers = [p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


def test_the_two_cases_kill_twenty_times():
    assert sum(len(modes) for _, _, modes in CASES.values()) == 20


def test_train_starts_again_in_a_folder_a_killed_start_left(tmp_path, homestar_home, corpus_dir, capsys):
    """Killed before config.json was written, a run cannot be resumed; `train` may reuse its folder."""
    from homestar.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("")
    (run / "tokenizer.json").write_text("{cut")
    assert main(["train", *FAST, "--data", str(corpus_dir), "--run-dir", str(run), "--steps", "2",
                 "--runtime", "torch"]) == 0
    assert sorted(step_losses(run)) == [1, 2]
    (run / "extra.txt").write_text("a user's file")
    assert main(["train", *FAST, "--data", str(corpus_dir), "--run-dir", str(run), "--steps", "2"]) != 0
