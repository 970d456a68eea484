"""The app driven with Pilot against a stand-in trainer process (fixtures/recorded_run/fake_trainer.py).

The stand-in takes the real command line, writes a real run folder and obeys the real control
file, without a model, so these flows run in seconds: train from the home screen, pause, extend,
save and quit; resume from the runs screen; attach to a headless run and stop it; delete; and a
trainer that refuses its input or crashes while the app carries on.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

from textual.widgets import DataTable, Input

from homestar.train.events import read_events
from homestar.tui.screens.ask_steps import AskStepsScreen
from homestar.tui.screens.confirm import ConfirmScreen
from homestar.tui.screens.help import HelpScreen
from homestar.tui.screens.runs import RunsScreen
from homestar.tui.screens.training import TrainingScreen
from test_tui_fixtures import NOW, copy_run, fake_command, make_test_app


async def wait_for(pilot, condition, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def _env(**values: str) -> dict[str, str]:
    return {**os.environ, **values}


async def _presets_ready(pilot) -> None:
    await wait_for(pilot, lambda: pilot.app.screen.query_one("#presets", DataTable).row_count > 0, what="plans")


def test_enter_trains_the_recommended_preset_then_pause_extend_and_q_saves_and_quits(tmp_path):
    app = make_test_app(tmp_path)

    async def run() -> TrainingScreen:
        async with app.run_test(size=(120, 40)) as pilot:
            await _presets_ready(pilot)
            await pilot.press("enter")
            screen = app.screen
            assert isinstance(screen, TrainingScreen)
            assert screen.args[screen.args.index("--preset") + 1] == "medium"  # the recommended one
            await wait_for(pilot, lambda: screen.state.step >= 3, what="steps")
            assert screen.state.chunks is not None and screen.state.train_steps
            await pilot.press("p")
            await wait_for(pilot, lambda: screen.state.phase == "paused", what="pause")
            await pilot.press("p")
            await wait_for(pilot, lambda: screen.state.phase == "running", what="resume")
            await pilot.press("e")
            assert isinstance(app.screen, AskStepsScreen)
            app.screen.query_one(Input).value = "500"
            await pilot.press("enter")
            await wait_for(pilot, lambda: screen.state.total_steps == 1500, what="extension")
            await pilot.press("q")
            await wait_for(pilot, lambda: app.return_code is not None, what="exit after saving")
            return screen

    screen = asyncio.run(run())
    events = read_events(screen.run_dir / "metrics.jsonl")
    assert events[-1]["event"] == "end" and events[-1]["status"] == "stopped"
    saved = events[-2]
    assert saved["event"] == "checkpoint" and saved["step"] == events[-1]["step"] > 3
    assert (screen.run_dir / "checkpoints" / f"step_{saved['step']:07d}").is_dir()


def test_runs_screen_resumes_a_run_at_its_saved_step(tmp_path):
    runs_root = tmp_path / "runs"
    end = {"event": "end", "time": NOW - 300, "step": 120, "status": "stopped"}
    copy_run(runs_root, "debug-20251130-120000", extra=[end])  # saved at step 100, logged to 120
    app = make_test_app(tmp_path)

    async def run() -> TrainingScreen:
        async with app.run_test(size=(120, 40)) as pilot:
            await _presets_ready(pilot)
            await pilot.press("r")
            assert isinstance(app.screen, RunsScreen)
            await wait_for(pilot, lambda: app.screen.runs, timeout=30, what="runs")
            assert app.screen.runs[0].saved_step == 100
            await pilot.press("enter")
            screen = app.screen
            assert isinstance(screen, TrainingScreen) and screen.args[0] == "resume"
            await wait_for(pilot, lambda: screen.state.resumed and screen.state.step > 102, what="resumed steps")
            await pilot.press("x")
            await wait_for(pilot, lambda: screen.state.phase == "stopped", what="stop")
            await pilot.press("escape")
            await wait_for(pilot, lambda: isinstance(app.screen, RunsScreen), what="back to runs")
            return screen

    screen = asyncio.run(run())
    steps = [e["step"] for e in read_events(screen.run_dir / "metrics.jsonl") if e["event"] == "step"]
    assert steps == list(range(1, steps[-1] + 1))  # resumed exactly after 100: no step twice, none missed
    assert screen.state.train_steps == steps  # the screen re-read the log the resume rewrote


def test_a_refused_run_shows_the_trainers_reason_and_the_app_goes_on(tmp_path):
    app = make_test_app(tmp_path, env=_env(FAKE_TRAINER_MODE="usage-error"))

    async def run() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await _presets_ready(pilot)
            await pilot.press("enter")
            screen = app.screen
            await wait_for(pilot, lambda: screen.state.phase == "failed", what="failure")
            assert "the data is too small" in str(screen.query_one("#banner").render())
            await pilot.press("escape")
            await wait_for(pilot, lambda: not isinstance(app.screen, TrainingScreen), what="home")
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)

    asyncio.run(run())


def test_a_crash_mid_run_is_shown_as_a_readable_message(tmp_path):
    app = make_test_app(tmp_path, env=_env(FAKE_TRAINER_MODE="crash"))

    async def run() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await _presets_ready(pilot)
            await pilot.press("enter")
            screen = app.screen
            await wait_for(pilot, lambda: screen.state.phase == "failed" and screen.process is None, what="crash")
            banner = str(screen.query_one("#banner").render())
            assert "Training failed: OutOfMemoryError: CUDA out of memory" in banner
            assert any("out of memory" in str(n.message) for n in app._notifications)
            await pilot.press("p")  # keys still answer; nothing to pause
            assert app.return_code is None

    asyncio.run(run())


def test_attach_follows_a_headless_run_and_stops_it(tmp_path):
    run_dir = tmp_path / "runs" / "headless-run"
    trainer = subprocess.Popen(fake_command(["train", "--headless", "--run-dir", str(run_dir), "--preset", "debug",
                                             "--steps", "5000"]), env=_env(FAKE_TRAINER_STEP_S="0.02"))
    try:
        app = make_test_app(tmp_path, attach_dir=run_dir)

        async def run() -> TrainingScreen:
            async with app.run_test(size=(80, 24)) as pilot:
                screen = app.screen
                assert isinstance(screen, TrainingScreen) and screen.attached
                await wait_for(pilot, lambda: screen.state.step > 5, what="followed steps")
                await pilot.press("x")
                await wait_for(pilot, lambda: screen.state.phase == "stopped", what="stopped")
                return screen

        screen = asyncio.run(run())
        assert trainer.wait(10) == 0
        assert screen.state.saved_step == screen.state.step
    finally:
        trainer.kill()
        trainer.wait()


def test_delete_asks_first(tmp_path):
    runs_root = tmp_path / "runs"
    path = copy_run(runs_root, "old-run", extra=[{"event": "end", "time": NOW, "step": 120, "status": "stopped"}])
    app = make_test_app(tmp_path)

    async def run() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("r")
            await wait_for(pilot, lambda: app.screen.runs, timeout=30, what="runs")
            await pilot.press("d")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("escape")
            assert path.exists()
            await pilot.press("d")
            await pilot.press("y")
            await wait_for(pilot, lambda: not path.exists(), what="deletion")
            await wait_for(pilot, lambda: not app.screen.runs, what="empty list")

    asyncio.run(run())


def test_palette_offers_the_training_actions(tmp_path):
    app = make_test_app(tmp_path, attach_dir=tmp_path / "runs" / "none", follow=False)

    async def run() -> list[str]:
        async with app.run_test(size=(80, 24)):
            return [c.title for c in app.get_system_commands(app.screen)]

    titles = asyncio.run(run())
    for title in ("Pause or resume training", "Save a checkpoint now", "Stop and save", "Extend the run",
                  "Stop, save and quit", "Toggle dark/light theme"):
        assert title in titles


def test_settings_data_and_budgets_reach_the_planner_and_the_trainer(tmp_path):
    data = tmp_path / "texts"
    data.mkdir()
    asked, started = [], []

    def plans(machine, gpu, cpu):
        asked.append((gpu, cpu))
        from test_tui_fixtures import plans as fixture_plans

        return fixture_plans()

    def command(args: list[str]) -> list[str]:
        started.append(args)
        return [sys.executable, "-c", "pass"]

    app = make_test_app(tmp_path, plans=plans, train_command=command)

    async def run() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await _presets_ready(pilot)
            await pilot.press("a")  # advanced settings open, the cursor in "steps"
            assert app.screen.focused is app.screen.query_one("#set-steps", Input)
            app.screen.query_one("#set-steps", Input).value = "50"
            app.screen.query_one("#set-gpu", Input).value = "2"
            app.screen.query_one("#set-cpu", Input).value = "8.5"
            await wait_for(pilot, lambda: asked[-1] == (2.0, 8.5), what="a new plan for the budgets")
            app.screen.query_one("#data-input", Input).value = str(data)
            app.screen.query_one("#presets").focus()
            await pilot.press("down", "enter")  # the preset under the recommended one
            await wait_for(pilot, lambda: started, what="the trainer's start")

    asyncio.run(run())
    args = started[0]
    flags = dict(zip(args[2::2], args[3::2]))
    assert flags["--preset"] == "large" and flags["--steps"] == "50" and flags["--data"] == str(data)
    assert flags["--gpu-mem-gib"] == "2.0" and flags["--cpu-mem-gib"] == "8.5"
    assert flags["--micro-batch"] == "2" and flags["--accum"] == "16"  # the plan's batch shape


def test_the_folder_picker_puts_the_chosen_folder_in_the_data_field(tmp_path):
    from homestar.tui.screens.folder_picker import FolderPickerScreen

    data = tmp_path / "corpus"
    data.mkdir()
    (data / "a.txt").write_text("hello")
    app = make_test_app(tmp_path)

    async def run() -> str:
        async with app.run_test(size=(80, 24)) as pilot:
            app.screen.query_one("#data-input", Input).value = str(tmp_path)
            await pilot.press("b")
            assert isinstance(app.screen, FolderPickerScreen)
            await wait_for(pilot, lambda: app.screen.query_one("#picker-tree").cursor_node is not None
                           and len(app.screen.query_one("#picker-tree").root.children) == 1, what="the tree")
            await pilot.press("down")  # from tmp_path to its only entry, "corpus"
            await pilot.press("u")
            await pilot.pause()
            return app.screen.query_one("#data-input", Input).value

    assert asyncio.run(run()) == str(data)


def test_e_after_the_run_finished_resumes_it_for_more_steps(tmp_path):
    app = make_test_app(tmp_path)

    async def run() -> TrainingScreen:
        async with app.run_test(size=(80, 24)) as pilot:
            await _presets_ready(pilot)
            app.screen.query_one("#set-steps", Input).value = "8"
            await pilot.press("enter")
            screen = app.screen
            await wait_for(pilot, lambda: screen.state.phase == "finished" and screen.state.step == 8, what="finish")
            await pilot.press("e")
            app.screen.query_one(Input).value = "5"
            await pilot.press("enter")
            await wait_for(pilot, lambda: screen.state.resumed and screen.state.phase == "finished", what="more steps")
            return screen

    screen = asyncio.run(run())
    assert screen.state.step == 13 and screen.state.total_steps == 13
    assert [e["step"] for e in read_events(screen.run_dir / "metrics.jsonl") if e["event"] == "start"] == [0, 8]
