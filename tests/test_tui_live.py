"""The whole app flow with the real trainer: a `debug` run on the CPU in a child process.

Home screen -> Enter trains the recommended preset on a small data folder -> the loss curve and
the chunk map fill in -> key presses are answered within 100 ms while the trainer works (both
cores busy) -> q saves and quits -> a new app's runs screen resumes the run at the saved step.
HOMESTAR_HOME is a temporary folder, so nothing touches the user's runs or caches.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from types import SimpleNamespace

import pytest
from textual import events
from textual.widgets import Input

from homestar.train.events import read_events
from homestar.tui import make_app
from homestar.tui.screens.help import HelpScreen
from homestar.tui.screens.runs import RunsScreen
from homestar.tui.screens.training import TrainingScreen
from test_tui_fixtures import machine
from test_tui_flow import wait_for

KEY_DEADLINE_S = 0.1


def _debug_plan() -> SimpleNamespace:
    return SimpleNamespace(preset="debug", params=140_000, fits="yes", recommended=True, gpu_peak_gib=0.0,
                           cpu_peak_gib=0.3, chunk_elems=65536, micro_batch=4, accum=1, device="cpu",
                           precision="fp32", est_tok_s=500.0, reason="trains in seconds")


def _write_data(folder) -> None:
    """About 150 KB of real text (a few standard library modules): a quick tokenizer, enough tokens."""
    import argparse
    import textwrap

    folder.mkdir()
    for module in (argparse, textwrap, random):
        source = open(module.__file__, encoding="utf-8").read()
        (folder / f"{module.__name__}.txt").write_text(source)


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.001)


async def _press_latency(app) -> float:
    """Seconds from a key press reaching the app to the help overlay laid out on screen.

    The key goes in as the terminal driver would send it. (Pilot.press is not used: it waits for
    the whole process to go idle, which a training screen being fed events never quite does.)
    """
    start = time.perf_counter()
    app.post_message(events.Key("question_mark", "?"))
    await _until(lambda: isinstance(app.screen, HelpScreen) and any(w.region for w in app.screen.query("#help-keys")))
    elapsed = time.perf_counter() - start
    app.post_message(events.Key("escape", None))
    await _until(lambda: isinstance(app.screen, TrainingScreen))
    await asyncio.sleep(0.2)
    return elapsed


@pytest.mark.slow
def test_train_quit_and_resume_with_the_real_trainer(tmp_path, monkeypatch):
    monkeypatch.setenv("HOMESTAR_HOME", str(tmp_path / "home"))
    data = tmp_path / "data"
    _write_data(data)
    settings = dict(machine=machine(gpu=False), plans=[_debug_plan()], runs_root=tmp_path / "home" / "runs",
                    poll_s=0.1, redraw_s=0.25, stop_timeout_s=90)
    latencies: list[float] = []

    async def first_session() -> TrainingScreen:
        app = make_app(**settings)
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: app.screen.query_one("#presets").row_count == 1, what="plan")
            app.screen.query_one("#data-input", Input).value = str(data)
            app.screen.query_one("#set-steps", Input).value = "200"
            await pilot.press("enter")
            screen = app.screen
            assert isinstance(screen, TrainingScreen)
            await wait_for(pilot, lambda: screen.state.step >= 3 and screen.state.chunks, timeout=120,
                           what="the loss curve and the chunk map")
            for _ in range(8):
                latencies.append(await _press_latency(app))
            await pilot.press("q")
            await wait_for(pilot, lambda: app.return_code is not None, timeout=90, what="save and quit")
            return screen

    first = asyncio.run(first_session())
    events = read_events(first.run_dir / "metrics.jsonl")
    assert events[-1]["event"] == "end" and events[-1]["status"] == "stopped"
    saved = events[-1]["step"]
    assert saved >= 3 and (first.run_dir / "checkpoints" / f"step_{saved:07d}").is_dir()
    print(f"\nkey press answered in {statistics.median(latencies) * 1000:.1f} ms median, "
          f"{max(latencies) * 1000:.1f} ms worst, over {len(latencies)} presses while training")
    assert max(latencies) < KEY_DEADLINE_S, latencies  # every press answered within 100 ms

    async def second_session() -> TrainingScreen:
        app = make_app(**settings)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("r")
            await wait_for(pilot, lambda: isinstance(app.screen, RunsScreen) and app.screen.runs, timeout=60,
                           what="runs")
            assert app.screen.runs[0].saved_step == saved
            await pilot.press("enter")
            screen = app.screen
            await wait_for(pilot, lambda: screen.state.resumed and screen.state.step > saved, timeout=120,
                           what="resumed training")
            await pilot.press("q")
            await wait_for(pilot, lambda: app.return_code is not None, timeout=90, what="save and quit")
            return screen

    second = asyncio.run(second_session())
    starts = [e for e in read_events(second.run_dir / "metrics.jsonl") if e["event"] == "start"]
    assert [s["step"] for s in starts] == [0, saved] and starts[-1]["resumed"]
