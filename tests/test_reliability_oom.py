"""Out of memory in the middle of a run: the step is redone with smaller micro-batches and more
accumulation (same sequences, same global batch), nothing is lost, the losses stay those of an
uninterrupted run within floating-point tolerance, and a resume afterwards continues the same way.
Also: the chunk runtime's BudgetError raised from a real allocation failure inside its work is
recovered the same way, and the GPU squeeze variable parses, refuses the CPU and sizes its squeeze
from the counters a CUDA device would report (faked here: this suite runs without a GPU)."""

from __future__ import annotations

import json
import random

import pytest

from homestar.cli import main
from homestar.errors import BudgetError, ConfigError
from homestar.train import faults
from homestar.train.events import read_events
from homestar.train.faults import OOM_ENV, SQUEEZE_ENV
from homestar.train.recovery import is_out_of_memory, smaller_micro_batch
import homestar.train.trainer as trainer_module
from train_helpers import FAST, step_losses

STEPS = 10
RUNTIMES = {"torch": ["--runtime", "torch"], "chunked": ["--runtime", "chunked", "--gpu-mem-gib", "0.02"],
            # the whole model fits the device: resident mode (grads accumulate into chunk views)
            "chunked-resident": ["--runtime", "chunked", "--gpu-mem-gib", "1"]}


def _train(corpus, run_dir, steps, *extra) -> int:
    return main(["train", *FAST, "--data", str(corpus), "--run-dir", str(run_dir), "--steps", str(steps),
                 "--accum", "2", "--save-every", "5", *extra])


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_injected_oom_is_recovered_without_a_lost_step(runtime, tmp_path, homestar_home, corpus_dir, monkeypatch):
    oom_step = random.Random(f"oom-{runtime}").randint(2, STEPS)
    monkeypatch.setattr(trainer_module, "CHUNK_EVENT_SECONDS", 0.0)  # a chunk map every step
    whole, hit = tmp_path / "whole", tmp_path / "hit"
    assert _train(corpus_dir, whole, STEPS + 4, *RUNTIMES[runtime]) == 0
    monkeypatch.setenv(OOM_ENV, str(oom_step))
    assert _train(corpus_dir, hit, STEPS, *RUNTIMES[runtime]) == 0
    monkeypatch.delenv(OOM_ENV)

    events = read_events(hit / "metrics.jsonl")
    if runtime == "chunked-resident":
        last = [e for e in events if e["event"] == "chunks"][-1]["chunks"]
        assert {c["location"] for c in last} == {"gpu"}
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


def test_a_budget_error_raised_from_an_out_of_memory_counts_as_one():
    import torch

    def raised_from(cause: BaseException) -> BudgetError:
        try:
            try:
                raise cause
            except BaseException as inner:
                raise BudgetError("the device ran out of memory: 1.0 GiB of chunks") from inner
        except BudgetError as outer:
            return outer

    assert is_out_of_memory(raised_from(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")))
    assert is_out_of_memory(raised_from(RuntimeError("cudaHostAlloc failed: pinned memory")))
    assert is_out_of_memory(raised_from(raised_from(torch.OutOfMemoryError("CUDA out of memory"))))
    assert not is_out_of_memory(BudgetError("the model does not fit: 3 GiB of chunks, budget 2 GiB"))
    assert not is_out_of_memory(raised_from(ValueError("bad shape")))
    looped = BudgetError("looped")
    looped.__cause__ = BudgetError("back")
    looped.__cause__.__cause__ = looped
    assert not is_out_of_memory(looped)


def test_chunk_runtime_out_of_memory_inside_its_work_is_recovered(tmp_path, homestar_home, corpus_dir, monkeypatch):
    """A block's forward fails to allocate in the second micro-batch of step 3, after the first
    micro-batch's backward: the engine turns it into a BudgetError, the trainer recovers it."""
    import torch

    from homestar.model.gpt import Block

    args = ["--runtime", "chunked", "--gpu-mem-gib", "0.02"]
    whole, hit = tmp_path / "whole", tmp_path / "hit"
    assert _train(corpus_dir, whole, 5, *args) == 0

    forward, calls = Block.forward, [0]

    def failing_forward(self, x):
        if self.training and torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == 11:  # 2 blocks x 2 micro-batches per step: step 3, micro-batch 2, block 1
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return forward(self, x)

    monkeypatch.setattr(Block, "forward", failing_forward)
    assert _train(corpus_dir, hit, 5, *args) == 0

    events = read_events(hit / "metrics.jsonl")
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4, 5]
    recovered = [e for e in events if e["event"] == "status" and e["state"] == "oom-recovered"]
    assert len(recovered) == 1 and recovered[0]["step"] == 2
    assert "the device ran out of memory" in recovered[0]["message"]  # the engine's BudgetError
    assert "micro-batch 4 -> 2" in recovered[0]["message"]
    expected, got = step_losses(whole), step_losses(hit)
    assert [got[s] for s in (1, 2)] == [expected[s] for s in (1, 2)]
    for step in (3, 4, 5):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), step


@pytest.mark.parametrize("text, step, fraction", [("6", 6, 0.5), (" 6:0.25 ", 6, 0.25), ("12:0", 12, 0.0)])
def test_squeeze_variable_parses(text, step, fraction):
    spec = faults.parse_squeeze(text)
    assert (spec.step, spec.fraction) == (step, fraction)


@pytest.mark.parametrize("text", ["x", "6:", "6:half", "6:1", "6:1.5", "6:-0.1", "6:nan", "-6", "1", "0",
                                  "6:0.5:1", "6.5", "²", "²:0.5"])
def test_malformed_squeeze_variable_is_a_config_error(text, monkeypatch):
    monkeypatch.setenv(SQUEEZE_ENV, text)
    with pytest.raises(ConfigError, match=SQUEEZE_ENV):
        faults.arm_from_env()


@pytest.mark.parametrize("name, text", [(OOM_ENV, "²"), (OOM_ENV, "0"), (OOM_ENV, "x"),
                                        (faults.KILL_ENV, "step:²"), (faults.KILL_ENV, "step:0"),
                                        (faults.KILL_ENV, "nowhere:1")])
def test_malformed_fault_variables_are_config_errors(name, text, monkeypatch):
    """A digit that is not a decimal one ('²') is refused like any other bad value, not a traceback."""
    monkeypatch.setenv(name, text)
    with pytest.raises(ConfigError, match=name):
        faults.arm_from_env()


def test_squeeze_on_a_cpu_run_fails_in_one_line(tmp_path, homestar_home, corpus_dir, monkeypatch, capsys):
    monkeypatch.setenv(SQUEEZE_ENV, "3")
    code = main(["train", *FAST, "--data", str(corpus_dir), "--run-dir", str(tmp_path / "run"), "--steps", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and SQUEEZE_ENV in err[0] and "CUDA" in err[0]
    assert not step_losses(tmp_path / "run")  # refused before the first step trained


def test_squeeze_arithmetic():
    gib, mib = 2**30, 2**20
    # 12 GiB cap, 5 GiB reserved of which 4.5 GiB allocated, plenty free on the card
    fresh, allocatable = faults.allocatable_bytes(cap=12 * gib, reserved=5 * gib, allocated=4 * gib + 512 * mib,
                                                  device_free=100 * gib)
    assert (fresh, allocatable) == (7 * gib, 7 * gib + 512 * mib)
    # steps needed 3 GiB above resting memory: leave 1.5 GiB, take the rest
    take = faults.squeeze_bytes(fresh=fresh, allocatable=allocatable, headroom=3 * gib, fraction=0.5)
    assert take == 6 * gib
    assert allocatable - take == 1.5 * gib
    # the driver, not the cap, is the limit when another process holds the card
    assert faults.allocatable_bytes(cap=12 * gib, reserved=5 * gib, allocated=5 * gib, device_free=2 * gib) == (
        2 * gib, 2 * gib)
    # odd sizes round down to the allocator's 2 MiB; nothing to take when already tight
    assert faults.squeeze_bytes(fresh=gib, allocatable=gib, headroom=3 * mib, fraction=0.5) == gib - 2 * mib
    assert faults.squeeze_bytes(fresh=gib, allocatable=gib, headroom=4 * gib, fraction=0.5) == 0
    # free pieces of live segments count as allocatable, but the squeeze is one new segment
    assert faults.squeeze_bytes(fresh=gib, allocatable=3 * gib, headroom=0, fraction=0.5) == gib


class FakeCuda:
    """The allocator counters a CUDA device reports, set by hand; records what was taken."""

    GIB = 2**30

    def __init__(self, monkeypatch):
        import torch

        self.allocated = self.peak = self.reserved = 2 * self.GIB
        self.held, self.emptied = [], 0
        props = type("Props", (), {"total_memory": 100 * self.GIB})()
        for name, fn in {
            "max_memory_allocated": lambda device=None: self.peak,
            "memory_allocated": lambda device=None: self.allocated,
            "memory_reserved": lambda device=None: self.reserved,
            "empty_cache": self._empty_cache,
            "current_device": lambda: 0,
            "get_device_properties": lambda device=None: props,
            "get_per_process_memory_fraction": lambda device=None: 0.12,  # a 12 GiB cap
            "mem_get_info": lambda device=None: (90 * self.GIB, 100 * self.GIB),
        }.items():
            monkeypatch.setattr(torch.cuda, name, fn)
        monkeypatch.setattr(faults, "_hold", lambda nbytes, index: self.held.append(nbytes) or nbytes)
        monkeypatch.setattr(faults, "_squeezed", [])

    def _empty_cache(self):
        self.emptied += 1


def test_squeeze_takes_memory_once_sized_from_the_highest_earlier_peak(monkeypatch, capsys):
    gib = FakeCuda.GIB
    cuda = FakeCuda(monkeypatch)
    monkeypatch.setenv(SQUEEZE_ENV, "4:0.25")
    faults.arm_from_env()
    # what each earlier step needed above its resting memory, as the engine reported it
    for step, needed in ((1, None), (2, 0), (3, 4 * gib)):
        faults.maybe_squeeze(step, "cuda", needed)
        assert cuda.held == [] and cuda.emptied == 0
    faults.maybe_squeeze(4, "cuda", gib)
    cap = int(0.12 * 100 * gib)
    # headroom 4 GiB (step 2's need, the largest): a quarter of it, 1 GiB, stays allocatable
    expected = (cap - 2 * gib - gib) // (2 * 2**20) * (2 * 2**20)
    assert cuda.emptied == 1 and cuda.held == [expected] and faults._squeezed == [expected]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and SQUEEZE_ENV in err[0] and f"took {expected / gib:.2f} GiB" in err[0]
    faults.maybe_squeeze(5, "cuda", gib)
    assert cuda.held == [expected]  # once


def test_squeeze_on_the_first_step_a_process_trains_is_refused(monkeypatch):
    FakeCuda(monkeypatch)
    monkeypatch.setenv(SQUEEZE_ENV, "4")
    faults.arm_from_env()
    with pytest.raises(ConfigError, match="first"):
        faults.maybe_squeeze(4, "cuda", None)  # a resume at step 3: nothing measured in this process


def test_unset_squeeze_does_nothing(monkeypatch):
    monkeypatch.delenv(SQUEEZE_ENV, raising=False)
    faults.arm_from_env()
    faults.maybe_squeeze(1, "cpu", None)  # no CUDA touched, no error


def test_a_pinned_host_allocation_failure_is_called_host_memory(monkeypatch, capsys):
    """Page-locked host memory running out is reported as host memory, with the host's flag."""
    import torch

    import homestar.cli as cli

    def fail(args):
        raise torch.OutOfMemoryError("could not lock 512 MiB of pinned memory (cudaHostRegister error 2)")

    monkeypatch.setattr(cli, "_plan", fail)  # the command fails as an engine's pinned allocation would
    code = main(["plan"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "out of host memory" in err[0] and "--cpu-mem-gib" in err[0]
