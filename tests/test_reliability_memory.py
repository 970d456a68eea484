"""Host memory guards: a run under `--cpu-mem-gib` keeps its resident memory (RSS; pinned pages are
resident too) under the cap while the cap forces the chunk runtime to home groups on the device;
and training pauses while the machine is short of memory, then goes on (or stops when asked)."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
from collections import namedtuple

import pytest

from homestar.cli import main
from homestar.errors import BudgetError
from homestar.train import memory_guard
from homestar.train.control import send
from homestar.train.events import read_events
from train_helpers import FAST, step_losses

GIB = 2**30
MIB = 2**20
CHUNK_TARGET = 22 * MIB
"""Host bytes left for chunks under the cap the test picks: well under what the model's chunks need
(about 36 MiB at this device budget), so the runtime must home the rest on the (simulated) device."""


def _request(corpus, run_dir, cpu_mem_gib=None):
    from homestar.train.session import TrainRequest

    return TrainRequest(preset="debug", data=str(corpus), steps=8, run_dir=str(run_dir), device="cpu",
                        gpu_mem_gib=0.04, cpu_mem_gib=cpu_mem_gib, micro_batch=4, seq_len=64, save_every=4,
                        eval_every=4, sample_every=0, runtime="chunked")


def _capped_run(corpus, tmp, out) -> None:
    """In a forked child: warm up (data, tokenizer, one engine), pick the cap that leaves
    CHUNK_TARGET for chunks at today's RSS, train under it, report the peak RSS (VmHWM)."""
    import psutil
    import torch

    from homestar.train.session import make_config, start_run

    torch.set_num_threads(1)
    warm = start_run(_request(corpus, tmp / "warm"), [])
    warm.trainer.engine.close()
    warm.lock.release()
    config = make_config(_request(corpus, tmp / "x", cpu_mem_gib=1000.0), name="x")
    config.params = warm.trainer.config.params
    rss = psutil.Process().memory_info().rss
    overhead = int(1000.0 * GIB) - memory_guard.host_chunk_budget(config, rss=rss)
    cap = (overhead + CHUNK_TARGET) / GIB
    session = start_run(_request(corpus, tmp / "capped", cpu_mem_gib=cap), [])
    engine = session.trainer.engine
    total_chunks = sum(c.nbytes for c in engine.placement.chunks)
    host_budget = engine.host.budget
    session.run()
    hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    out.write_text(json.dumps({"cap": cap * GIB, "hwm": hwm, "host_budget": host_budget, "host_peak": engine.host.peak,
                               "chunks": total_chunks, "device_groups": engine.stats()["device_groups"]}))


def test_rss_stays_under_the_cpu_cap_that_forces_economy(tmp_path, homestar_home, corpus_dir):
    import torch._dynamo  # noqa: F401  (imported before the fork, as the runs would)

    out = tmp_path / "result.json"
    child = multiprocessing.get_context("fork").Process(target=_capped_run, args=(corpus_dir, tmp_path, out))
    child.start()
    child.join(300)
    assert child.exitcode == 0
    r = json.loads(out.read_text())
    assert r["host_budget"] < r["chunks"]  # the cap leaves the host too little for every chunk...
    assert r["host_peak"] <= r["host_budget"] and r["device_groups"]  # ...so groups live on the device
    assert r["hwm"] <= r["cap"], f"peak RSS {r['hwm'] / MIB:.0f} MiB over the cap {r['cap'] / MIB:.0f} MiB"
    assert sorted(step_losses(tmp_path / "capped")) == list(range(1, 9))


def test_a_cap_below_what_the_process_holds_is_refused(tmp_path, homestar_home, corpus_dir, capsys):
    code = main(["train", *FAST, "--data", str(corpus_dir), "--run-dir", str(tmp_path / "run"), "--steps", "2",
                 "--gpu-mem-gib", "0.03", "--cpu-mem-gib", "0.05"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "--cpu-mem-gib" in err[0]
    assert not (tmp_path / "run").exists()


def _fake_memory(monkeypatch, low_calls):
    """psutil.virtual_memory as the guard sees it: 0.1 GiB available on the calls in `low_calls`."""
    Memory = namedtuple("Memory", "total available")
    calls = []

    def virtual_memory():
        calls.append(1)
        return Memory(total=16 * GIB, available=int(0.1 * GIB) if len(calls) in low_calls else 8 * GIB)

    monkeypatch.setattr(memory_guard.psutil, "virtual_memory", virtual_memory)
    monkeypatch.setattr(memory_guard, "POLL_SECONDS", 0.01)
    monkeypatch.setenv(memory_guard.MIN_AVAILABLE_ENV, "1")
    return calls


def test_training_waits_while_memory_is_short_then_goes_on(tmp_path, homestar_home, corpus_dir, monkeypatch):
    whole, squeezed = tmp_path / "whole", tmp_path / "squeezed"
    assert main(["train", *FAST, "--data", str(corpus_dir), "--run-dir", str(whole), "--steps", "6",
                 "--runtime", "torch"]) == 0
    calls = _fake_memory(monkeypatch, low_calls=range(4, 12))
    assert main(["train", *FAST, "--data", str(corpus_dir), "--run-dir", str(squeezed), "--steps", "6",
                 "--runtime", "torch"]) == 0
    assert len(calls) >= 12
    states = [(e["state"], e["step"]) for e in read_events(squeezed / "metrics.jsonl") if e["event"] == "status"]
    assert states[:2] == [("waiting-for-memory", 3), ("running", 3)]
    assert step_losses(squeezed) == step_losses(whole)


def test_a_stop_while_waiting_for_memory_stops(tmp_path, homestar_home, corpus_dir, monkeypatch):
    run = tmp_path / "run"
    _fake_memory(monkeypatch, low_calls=range(1, 10**9))
    timer = threading.Timer(1.0, lambda: send(run, "stop"))
    timer.start()
    try:
        assert main(["train", *FAST, "--data", str(corpus_dir), "--run-dir", str(run), "--steps", "6",
                     "--runtime", "torch"]) == 0
    finally:
        timer.cancel()
    events = read_events(run / "metrics.jsonl")
    assert [e["state"] for e in events if e["event"] == "status"] == ["waiting-for-memory"]
    assert events[-1]["event"] == "end" and events[-1]["status"] == "stopped" and not step_losses(run)


def test_the_threshold_setting_is_checked(monkeypatch):
    monkeypatch.setenv(memory_guard.MIN_AVAILABLE_ENV, "lots")
    with pytest.raises(BudgetError):
        memory_guard.default_threshold()
    monkeypatch.setenv(memory_guard.MIN_AVAILABLE_ENV, "0")
    assert not memory_guard.MemoryGuard(threshold=memory_guard.default_threshold()).short()
    monkeypatch.delenv(memory_guard.MIN_AVAILABLE_ENV)
    assert 0 < memory_guard.default_threshold() <= GIB
    assert os.environ.get(memory_guard.MIN_AVAILABLE_ENV) is None
