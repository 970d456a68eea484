"""Unit tests of the trainer's parts: schedule, control file, events log, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from homestar.errors import CheckpointError
from homestar.train import events as ev
from homestar.train.checkpoint import list_checkpoints, load_checkpoint, load_latest, save_checkpoint
from homestar.train.control import Control, send
from homestar.train.schedule import Schedule


def test_schedule_warmup_cosine_floor():
    s = Schedule(lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.55)
    assert s(110) == pytest.approx(0.1) and s(10_000) == pytest.approx(0.1)
    assert all(s(i) >= s(i + 1) for i in range(10, 200))


def test_schedule_rejects_nonsense():
    with pytest.raises(ValueError):
        Schedule(lr=1.0, min_lr=2.0, warmup_steps=0, decay_steps=10)


def test_control_file_commands(tmp_path):
    control = Control(tmp_path)
    assert control.poll() is None
    send(tmp_path, "save")
    send(tmp_path, "steps 90")
    assert control.poll() == "save"
    assert control.extend_to == 90
    assert not (tmp_path / "control").exists()
    send(tmp_path, "stop")
    assert control.poll() == "stop"
    with pytest.raises(ValueError):
        send(tmp_path, "explode")


def test_events_log_survives_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = ev.JsonlSink(path)
    for step in (1, 2, 3):
        sink(ev.Eval(time=0.0, step=step, loss=1.0 / step))
    sink.close()
    with open(path, "a") as f:
        f.write('{"event": "step", "ste')  # a kill mid-write
    records = ev.read_events(path)
    assert [r["step"] for r in records] == [1, 2, 3]
    ev.truncate_events(path, 2)
    assert [r["step"] for r in ev.read_events(path)] == [1, 2]


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = {"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.randn(3, generator=g)}
    return {"weights": w, "optimizer": {"step": seed, "exp_avg": {k: v * 0.1 for k, v in w.items()},
                                        "exp_avg_sq": {k: v * v for k, v in w.items()}}}


def test_checkpoint_round_trip_and_pruning(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, _state(step), {"data": {"batches": step}, "tokens": step * 7}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000020", "step_0000030"]
    engine_state, trainer_state = load_latest(tmp_path)
    expected = _state(30)
    assert trainer_state["step"] == 30 and trainer_state["data"] == {"batches": 30}
    for k, v in expected["weights"].items():
        assert torch.equal(engine_state["weights"][k], v)
        assert torch.equal(engine_state["optimizer"]["exp_avg_sq"][k], expected["optimizer"]["exp_avg_sq"][k])
    assert engine_state["optimizer"]["step"] == 30


def test_damaged_latest_falls_back_to_previous(tmp_path):
    for step in (10, 20):
        save_checkpoint(tmp_path, step, _state(step), {"data": {}, "tokens": 0})
    damaged = list_checkpoints(tmp_path)[-1] / "optimizer.safetensors"
    damaged.write_bytes(b"\0" * damaged.stat().st_size)  # same size, wrong hash
    warnings = []
    _, trainer_state = load_latest(tmp_path, warn=warnings.append)
    assert trainer_state["step"] == 10
    assert len(warnings) == 1 and "damaged" in warnings[0]
    with pytest.raises(CheckpointError):
        load_checkpoint(list_checkpoints(tmp_path)[-1])


def test_interrupted_save_is_invisible(tmp_path):
    save_checkpoint(tmp_path, 10, _state(10), {"data": {}, "tokens": 0})
    (tmp_path / "checkpoints" / ".tmp-step_0000020-999").mkdir()  # a save killed half-way
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000010"]
    assert json.loads((list_checkpoints(tmp_path)[0] / "manifest.json").read_text())["step"] == 10
    assert math.isfinite(load_latest(tmp_path)[1]["step"])


def test_full_disk_fails_the_save_cleanly(tmp_path, monkeypatch):
    import errno

    import homestar.train.checkpoint.save as ckpt

    save_checkpoint(tmp_path, 10, _state(10), {"data": {}, "tokens": 0})
    real_write = ckpt.write_tensors
    calls = []

    def fill_disk(path, tensors):  # the disk fills while the second file (the moments) is written
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, tensors)

    monkeypatch.setattr(ckpt, "write_tensors", fill_disk)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(tmp_path, 20, _state(20), {"data": {}, "tokens": 0})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000010"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000010"]
    assert load_latest(tmp_path)[1]["step"] == 10


def test_save_refused_when_disk_is_too_small(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10, 10, 0))
    with pytest.raises(CheckpointError, match="not enough disk space"):
        save_checkpoint(tmp_path, 10, _state(10), {"data": {}, "tokens": 0})
    assert list_checkpoints(tmp_path) == []
