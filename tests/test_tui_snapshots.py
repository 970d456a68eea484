"""SVG snapshots of every screen at 120x40 and 80x24, dark and light, fed by recorded events.

No model and no trainer: the training screen is given the hand-written events of
fixtures/recorded_run/metrics.jsonl, the home screen a fixed machine and plan, the runs screen
run folders copied from the fixture. Update with `pytest tests/test_tui_snapshots.py --snapshot-update`.
"""

from __future__ import annotations

import time

import pytest

from test_tui_fixtures import FIXTURES, NOW, copy_run, machine, make_test_app, recorded_events

WIDE, NARROW = (120, 40), (80, 24)


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """Paths under the home folder print as ~/..., the same on every machine."""
    monkeypatch.setenv("HOME", str(tmp_path))


async def _settle(pilot, condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the screen did not settle"
        await pilot.pause(0.05)
    await pilot.pause()


def _table_drawn(pilot, selector: str, rows: int) -> bool:
    """The table has its rows and has sized its columns (DataTable does that when it next idles)."""
    table = pilot.app.screen.query_one(selector)
    return table.row_count == rows and table.virtual_size.width > 50


def _presets_shown(pilot) -> bool:
    return _table_drawn(pilot, "#presets", 7)


def _feed(events: list[dict], theme: str = "textual-dark"):
    async def run_before(pilot) -> None:
        pilot.app.theme = theme
        screen = pilot.app.screen
        screen.feed(events)
        screen.redraw(force=True)
        await pilot.pause()

    return run_before


@pytest.mark.parametrize("size", [WIDE, NARROW], ids=["120x40", "80x24"])
def test_home(snap_compare, tmp_path, size):
    app = make_test_app(tmp_path)

    async def run_before(pilot) -> None:
        await _settle(pilot, lambda: _presets_shown(pilot))

    assert snap_compare(app, terminal_size=size, run_before=run_before)


def test_home_cpu_only_light_with_settings_open(snap_compare, tmp_path):
    app = make_test_app(tmp_path, machine=machine(gpu=False))

    async def run_before(pilot) -> None:
        pilot.app.theme = "textual-light"
        await _settle(pilot, lambda: _presets_shown(pilot))
        await pilot.press("down", "a")
        pilot.app.screen.query_one("#set-steps").cursor_blink = False  # a blinking cursor is a coin toss
        await pilot.pause()

    assert snap_compare(app, terminal_size=NARROW, run_before=run_before)


@pytest.mark.parametrize("size", [WIDE, NARROW], ids=["120x40", "80x24"])
def test_training(snap_compare, tmp_path, size):
    app = make_test_app(tmp_path, attach_dir=FIXTURES, follow=False)
    assert snap_compare(app, terminal_size=size, run_before=_feed(recorded_events()))


def test_training_light(snap_compare, tmp_path):
    app = make_test_app(tmp_path, attach_dir=FIXTURES, follow=False)
    assert snap_compare(app, terminal_size=WIDE, run_before=_feed(recorded_events(), "textual-light"))


def test_training_failed(snap_compare, tmp_path):
    events = recorded_events() + [
        {"event": "error", "time": NOW, "step": 120, "message": "OutOfMemoryError: CUDA out of memory. Tried to "
                                                               "allocate 2.00 GiB (GPU 0; 8.00 GiB total)"},
        {"event": "end", "time": NOW, "step": 120, "status": "failed"}]
    app = make_test_app(tmp_path, attach_dir=FIXTURES, follow=False)
    assert snap_compare(app, terminal_size=NARROW, run_before=_feed(events))


def test_training_torch_runtime_has_no_chunk_map(snap_compare, tmp_path):
    events = [dict(e, runtime="torch") if e["event"] == "start" else e
              for e in recorded_events()[:60] if e["event"] != "chunks"]
    app = make_test_app(tmp_path, attach_dir=FIXTURES, follow=False)
    assert snap_compare(app, terminal_size=NARROW, run_before=_feed(events))


def test_training_help(snap_compare, tmp_path):
    app = make_test_app(tmp_path, attach_dir=FIXTURES, follow=False)

    async def run_before(pilot) -> None:
        await _feed(recorded_events())(pilot)
        await pilot.press("question_mark")

    assert snap_compare(app, terminal_size=NARROW, run_before=run_before)


@pytest.mark.parametrize("size", [WIDE, NARROW], ids=["120x40", "80x24"])
def test_runs(snap_compare, tmp_path, size):
    root = tmp_path / "runs"
    copy_run(root, "debug-20251130-120000", mtime=NOW - 300,
             extra=[{"event": "end", "time": NOW - 300, "step": 120, "status": "stopped"}])
    copy_run(root, "small-20251129-093000", mtime=NOW - 86400, checkpoints=(100, 200),
             extra=[{"event": "end", "time": NOW - 86400, "step": 200, "status": "finished"}])
    copy_run(root, "medium-20251128-180000", mtime=NOW - 3 * 86400, checkpoints=(),
             extra=[{"event": "end", "time": NOW - 3 * 86400, "step": 120, "status": "failed"}])
    app = make_test_app(tmp_path)

    async def run_before(pilot) -> None:
        await _settle(pilot, lambda: _presets_shown(pilot))
        await pilot.press("r")
        await _settle(pilot, lambda: len(getattr(pilot.app.screen, "runs", [])) == 3
                      and _table_drawn(pilot, "#runs-table", 3))

    assert snap_compare(app, terminal_size=size, run_before=run_before)
