"""The app's parts that need no terminal: following the log, folding events, the chunk map's
layout, the trainer's command lines, number formats."""

from __future__ import annotations

import json
import os
import sys

import pytest

from homestar.errors import ConfigError
from homestar.tui import format as fmt
from homestar.tui.follow import MetricsFollower, coalesce
from homestar.tui.launch import TrainOptions, cli_train_args, new_run_dir, resume_args, train_args
from homestar.tui.process import TrainerProcess
from homestar.tui.run_state import RunState
from homestar.tui.widgets.chunk_map import layout
from homestar.tui.widgets.loss_plot import downsample
from test_tui_fixtures import NOW, recorded_events


def _line(event: dict) -> bytes:
    return (json.dumps(event) + "\n").encode()


def test_follower_reads_only_new_complete_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    follower = MetricsFollower(path)
    assert follower.read_new().events == []  # no file yet
    path.write_bytes(_line({"event": "step", "step": 1}) + b'{"event": "st')  # a line cut mid-write
    assert [e["step"] for e in follower.read_new().events] == [1]
    with open(path, "ab") as f:
        f.write(b'ep", "step": 2}\n' + b"garbage\n" + _line({"event": "step", "step": 3}))
    batch = follower.read_new()
    assert [e["step"] for e in batch.events] == [2, 3] and not batch.reset
    assert follower.read_new().events == []


def test_follower_starts_again_when_the_log_is_replaced(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"".join(_line({"event": "step", "step": s}) for s in (1, 2, 3)))
    follower = MetricsFollower(path)
    assert len(follower.read_new().events) == 3
    tmp = tmp_path / "new"
    tmp.write_bytes(_line({"event": "step", "step": 1}))  # what a resume's truncation does
    os.replace(tmp, path)
    batch = follower.read_new()
    assert batch.reset and [e["step"] for e in batch.events] == [1]


def test_follower_streams_a_long_history_in_slices(tmp_path, monkeypatch):
    import homestar.tui.follow as follow

    monkeypatch.setattr(follow, "READ_LIMIT", 100)
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"".join(_line({"event": "step", "step": s}) for s in range(20)))
    follower = MetricsFollower(path)
    steps, more = [], True
    while more:
        batch = follower.read_new()
        steps += [e["step"] for e in batch.events]
        more = batch.more
    assert steps == list(range(20))


def test_coalesce_keeps_only_the_last_chunk_snapshot():
    events = [{"event": "chunks", "n": 1}, {"event": "step"}, {"event": "chunks", "n": 2}, {"event": "eval"}]
    assert coalesce(events) == [{"event": "step"}, {"event": "chunks", "n": 2}, {"event": "eval"}]


def test_run_state_folds_the_recorded_run():
    state = RunState()
    state.apply(recorded_events())
    assert (state.run, state.preset, state.total_steps, state.step) == ("debug-20251130-120000", "debug", 200, 120)
    assert len(state.train_steps) == 120 and state.eval_steps == [25, 50, 75, 100]
    assert state.saved_step == 100 and state.phase == "running"
    assert [s["step"] for s in state.samples] == [100, 50]  # newest first
    assert state.chunks_step == 120 and len(state.chunks) == 25
    assert 0.7 < state.step_s < 0.85 and state.eta_s == pytest.approx(80 * state.step_s)
    assert len(state.gpu_history) == 120 and state.cpu_mem == 610e6 + 120 * 2e5


def test_run_state_phases():
    state = RunState()
    start = {"event": "start", "time": 0, "step": 0, "run": "r", "preset": "p", "params": 1, "total_steps": 10,
             "tokens_per_step": 1, "runtime": "chunked", "device": "cpu", "precision": "fp32"}
    state.apply([start, {"event": "status", "time": 1, "step": 3, "state": "paused", "message": "training paused"}])
    assert state.phase == "paused"
    state.apply([{"event": "status", "time": 2, "step": 3, "state": "running"},
                 {"event": "status", "time": 2, "step": 3, "state": "extended",
                  "message": "training extended to 40 steps"}])
    assert state.phase == "running" and state.total_steps == 40
    state.apply([{"event": "error", "time": 3, "step": 3, "message": "OutOfMemoryError: no room"},
                 {"event": "end", "time": 3, "step": 3, "status": "failed"}])
    assert state.phase == "failed" and state.error == "OutOfMemoryError: no room"
    state.apply([{"event": "step", "step": "bad"}])  # malformed events are skipped, not fatal
    assert state.step == 3


def test_run_state_explains_a_process_that_died():
    state = RunState()
    state.process_exited(2, "the data is too small")
    assert state.phase == "failed" and state.error == "the data is too small"
    stopped = RunState()
    stopped.process_exited(-15, "", stop_requested=True)  # stopped before it began: not a failure
    assert stopped.phase == "stopped" and not stopped.errors


def test_chunk_map_layout_groups_by_kind_and_wraps():
    chunks = [{"id": i, "kind": k, "location": loc, "bytes": 1024} for i, (k, loc) in enumerate(
        [("param", "gpu")] * 3 + [("grad", "moving")] * 2 + [("moments", "cpu")] * 30)]
    lines = layout(chunks, width=30)
    labels = [line[0].text.strip() for line in lines[1:] if line[0].role == "label"]
    assert labels[:4] == ["params", "grads", "moments", ""]  # moments wraps onto a second row
    cells = [p for line in lines for p in line if p.text.startswith("■") and p.role != "plain"][3:]
    assert sum(1 for p in cells if p.role == "cpu") == 30
    text = " ".join(p.text for line in lines for p in line)
    assert "35 chunks" in text and "moving 2" in text
    assert all(sum(len(p.text) for p in line) <= 30 for line in lines)


def test_loss_curve_downsampling_keeps_the_shape():
    x, y = downsample(range(10_000), [float(v) for v in range(10_000)], limit=100)
    assert len(x) == 100 and x[0] == pytest.approx(49.5) and y[-1] == pytest.approx(9949.5)


def test_trainer_command_lines(tmp_path):
    options = TrainOptions(preset="debug", steps=50, data="/data", micro_batch=2, precision="fp32",
                           gpu_mem_gib=0.5)
    args = train_args(options, tmp_path / "r")
    assert args[:4] == ["train", "--headless", "--run-dir", str(tmp_path / "r")]
    assert args[args.index("--steps") + 1] == "50" and args[args.index("--gpu-mem-gib") + 1] == "0.5"
    assert "--accum" not in args and "--cpu-mem-gib" not in args
    assert resume_args(tmp_path, 300) == ["resume", str(tmp_path), "--headless", "--steps", "300"]
    with pytest.raises(ConfigError):
        TrainOptions(preset="debug", steps=0)
    with pytest.raises(ConfigError):
        TrainOptions(preset="debug", gpu_mem_gib=-1.0)


def test_cli_flags_become_a_headless_run_with_a_folder(tmp_path):
    args, run_dir = cli_train_args(["train", "--preset", "debug", "--steps", "9"], tmp_path, now=NOW)
    assert args[:2] == ["train", "--headless"] and run_dir.parent == tmp_path
    assert run_dir.name.startswith("debug-") and args[args.index("--run-dir") + 1] == str(run_dir)
    args, run_dir = cli_train_args(["--run-dir=/x/y", "--headless"], tmp_path)
    assert run_dir.as_posix() == "/x/y" and args.count("--headless") == 1
    first = new_run_dir(tmp_path, "debug", NOW)
    first.mkdir()
    assert new_run_dir(tmp_path, "debug", NOW).name == first.name + "-2"


def test_trainer_process_reports_its_last_stderr_line(tmp_path):
    code = "import sys; print('Traceback...', file=sys.stderr); print('homestar: error: bad data', file=sys.stderr); sys.exit(2)"
    process = TrainerProcess([sys.executable, "-c", code])
    process.start()
    assert process.wait(20) == 2 and process.poll() == 2
    assert process.error_line() == "bad data"
    process.close()


def test_number_formats():
    assert fmt.gib(1.5 * 2**30) == "1.50 GiB" and fmt.gib(None) == "-"
    assert fmt.count(124_000_000) == "124M" and fmt.count(1_558_000_000) == "1.6B"
    assert fmt.duration(65) == "1m 05s" and fmt.duration(7300) == "2h 01m" and fmt.duration(None) == "-"
    assert fmt.ago(NOW - 600, NOW) == "10m ago" and fmt.ago(NOW - 5, NOW) == "just now"
    assert fmt.tflops(0.0041) == "0.0041" and fmt.rate(5066.4) == "5,066"
