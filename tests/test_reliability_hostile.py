"""Random and truncated bytes in every file homestar reads: one clear line, a non-zero exit where the
file is needed, no traceback, and nothing else on disk changed (property-based, hypothesis)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from homestar.cli import main
from homestar.train import events as ev
from homestar.train.checkpoint import list_checkpoints
from homestar.train.control import Control
from train_helpers import FAST

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _hostile(original: bytes):
    """Random bytes, or the real file cut short (often the nastier: a valid prefix)."""
    return st.one_of(st.binary(max_size=600),
                     st.integers(0, max(0, len(original) - 1)).map(lambda n: original[:n]))


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus_dir):
    home = tmp_path_factory.mktemp("home")
    run = tmp_path_factory.mktemp("runs") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("HOMESTAR_HOME", str(home))
    assert main(["train", *FAST, "--data", str(corpus_dir), "--run-dir", str(run), "--steps", "2",
                 "--save-every", "1", "--eval-every", "0", "--runtime", "torch"]) == 0
    yield run
    mp.undo()


def _stat_tree(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file: cheap proof that nothing was written."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def _refused(code: int, err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert code != 0 and "Traceback" not in err
    assert lines and lines[-1].startswith("homestar: error:") and needle in lines[-1], err


class Damaged:
    """Replace one file's bytes for the length of a `with`, then put the original back."""

    def __init__(self, path: Path, data: bytes):
        self.path, self.data = path, data

    def __enter__(self):
        self.original = self.path.read_bytes()
        self.path.write_bytes(self.data)
        return self

    def __exit__(self, *exc):
        self.path.write_bytes(self.original)


_SAMPLE_DOES_NOT_READ = ("optimizer.safetensors", "rng.safetensors", "state.json")


def _resume_is_refused(run: Path, damaged: list[Path], data: bytes, needle: str, capsys) -> None:
    originals = [p.read_bytes() for p in damaged]
    try:
        for p in damaged:
            p.write_bytes(data)
        before = _stat_tree(run)
        code, err = _cli(["resume", str(run), "--steps", "3", "--headless"], capsys)
        _refused(code, err, needle)
        assert _stat_tree(run) == before
        code, err = _cli(["sample", str(run), "--prompt", "x", "--tokens", "2"], capsys)
        if needle in _SAMPLE_DOES_NOT_READ:  # sampling reads only the weights and the manifest
            assert code == 0 and "Traceback" not in err, err
        else:
            _refused(code, err, needle)
        code, err = _cli(["runs"], capsys)
        assert code == 0 and "Traceback" not in err
    finally:
        for p, original in zip(damaged, originals):
            p.write_bytes(original)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_run_files(run, capsys, homestar_home, name):
    path = run / name

    @SETTINGS
    @given(data=_hostile(path.read_bytes()))
    def check(data):
        _resume_is_refused(run, [path], data, name, capsys)

    check()


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json",
                                  "manifest.json"])
def test_checkpoint_files(run, capsys, homestar_home, name):
    copies = [c / name for c in list_checkpoints(run)]
    assert len(copies) == 2

    @SETTINGS
    @given(data=_hostile(copies[-1].read_bytes()))
    def check(data):
        _resume_is_refused(run, copies, data, name, capsys)

    check()


def test_damaged_latest_checkpoint_falls_back_with_a_warning(run, tmp_path, capsys, homestar_home):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (list_checkpoints(copy)[-1] / "manifest.json").write_bytes(b"\x00garbage")
    code, err = _cli(["resume", str(copy), "--steps", "3", "--headless"], capsys)
    assert code == 0 and "warning" in err and "manifest.json" in err
    assert json.loads((copy / "metrics.jsonl").read_text().splitlines()[-1])["status"] == "finished"


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=4), max_leaves=8)
records = st.fixed_dictionaries({"event": st.sampled_from(["step", "eval", "end", "start", "x"])},
                                optional={"step": json_values, "loss": json_values, "status": json_values})


@SETTINGS
@given(garbage=st.one_of(st.binary(max_size=600), st.lists(records, max_size=5).map(
    lambda rs: "\n".join(json.dumps(r) for r in rs).encode())))
def test_metrics_log(run, capsys, homestar_home, garbage):
    path = run / "metrics.jsonl"
    with Damaged(path, path.read_bytes() + b"\n" + garbage):
        good = [e for e in ev.read_events(path) if e["event"] == "step"]
        assert all(isinstance(e["step"], int) and isinstance(e["loss"], (int, float)) for e in good)
        assert [e["step"] for e in good][:2] == [1, 2]
        code, err = _cli(["runs"], capsys)
        assert code == 0 and "Traceback" not in err
        from homestar.train.runs import read_run

        assert read_run(run).step >= 0


@SETTINGS
@given(data=st.binary(max_size=400))
def test_runs_elsewhere_list(homestar_home, capsys, data):
    homestar_home.mkdir(parents=True, exist_ok=True)
    (homestar_home / "runs-elsewhere.txt").write_bytes(data)
    code, err = _cli(["runs"], capsys)
    assert code == 0 and "Traceback" not in err


@SETTINGS
@given(data=st.binary(max_size=200) | st.text(max_size=40).map(lambda t: ("steps " + t).encode()))
def test_control_file(tmp_path, data):
    (tmp_path / "control").write_bytes(data)
    control = Control(tmp_path)
    assert control.poll() in (None, "stop", "save", "pause")
    assert control.extend_to is None or control.extend_to >= 0


def test_preset_file(tmp_path, monkeypatch, capsys, homestar_home, corpus_dir):
    import homestar.model.presets as presets

    original = presets._preset_files()["debug"].read_bytes()
    path = tmp_path / "debug.toml"
    monkeypatch.setattr(presets, "_preset_files", lambda: {"debug": path})

    @SETTINGS
    @given(data=_hostile(original))
    def check(data):
        path.write_bytes(data)
        try:
            presets.load_preset_file(path)
        except presets.ConfigError:
            pass
        else:
            return  # still a valid preset (a cut after a whole line): nothing to refuse
        target = tmp_path / "run"
        code, err = _cli(["train", *FAST, "--data", str(corpus_dir), "--run-dir", str(target), "--steps", "1"],
                         capsys)
        _refused(code, err, "debug.toml")
        assert not target.exists()

    check()
