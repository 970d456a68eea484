"""Bad input gets one line on stderr and a non-zero exit, never a traceback, and no run changes."""

from __future__ import annotations

import shutil

import pytest

from homestar.cli import main
from train_helpers import FAST, snapshot_tree


def _run(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own exit for a malformed flag
        code = exc.code
    err = capsys.readouterr().err
    return code, err


def _assert_one_line_error(code, err, *needles):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, corpus_dir):
    home = tmp_path_factory.mktemp("home")
    run = tmp_path_factory.mktemp("runs") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("HOMESTAR_HOME", str(home))
    assert main(["train", *FAST, "--data", str(corpus_dir), "--run-dir", str(run), "--steps", "4",
                 "--save-every", "2", "--runtime", "torch"]) == 0
    mp.undo()
    return run


def test_missing_data_path(tmp_path, homestar_home, capsys):
    code, err = _run(["train", *FAST, "--data", str(tmp_path / "nope"), "--steps", "2"], capsys)
    _assert_one_line_error(code, err, "nope")
    assert not (homestar_home / "runs").exists() or not any((homestar_home / "runs").iterdir())


def test_empty_folder(tmp_path, homestar_home, capsys):
    (tmp_path / "empty").mkdir()
    code, err = _run(["train", *FAST, "--data", str(tmp_path / "empty"), "--steps", "2"], capsys)
    _assert_one_line_error(code, err)


def test_binary_file(tmp_path, homestar_home, capsys):
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 200)
    code, err = _run(["train", *FAST, "--data", str(binary), "--steps", "2"], capsys)
    _assert_one_line_error(code, err)


def test_unknown_preset(homestar_home, corpus_dir, capsys):
    code, err = _run(["train", "--preset", "giant", "--data", str(corpus_dir), "--headless", "--device", "cpu"], capsys)
    _assert_one_line_error(code, err, "giant")


@pytest.mark.parametrize("flag,value", [("--steps", "0"), ("--steps", "-3"), ("--micro-batch", "x"),
                                        ("--gpu-mem-gib", "-1"), ("--gpu-mem-gib", "0"), ("--seq-len", "0"),
                                        ("--precision", "fp8"), ("--save-every", "-1")])
def test_impossible_flag_values(homestar_home, corpus_dir, capsys, flag, value):
    code, err = _run(["train", *FAST, "--data", str(corpus_dir), flag, value], capsys)
    _assert_one_line_error(code, err)


def test_fp16_on_cpu_is_refused(homestar_home, corpus_dir, capsys):
    code, err = _run(["train", *FAST, "--data", str(corpus_dir), "--precision", "fp16"], capsys)
    _assert_one_line_error(code, err, "fp16")


def test_existing_run_dir_is_not_overwritten(saved_run, homestar_home, corpus_dir, capsys):
    before = snapshot_tree(saved_run)
    code, err = _run(["train", *FAST, "--data", str(corpus_dir), "--run-dir", str(saved_run)], capsys)
    _assert_one_line_error(code, err, "resume")
    assert snapshot_tree(saved_run) == before


def test_corrupt_checkpoint_is_refused_without_changes(saved_run, tmp_path, homestar_home, capsys):
    run = tmp_path / "copy"
    shutil.copytree(saved_run, run)
    for checkpoint in (run / "checkpoints").iterdir():
        weights = checkpoint / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    before = snapshot_tree(run)
    code, err = _run(["resume", str(run), "--steps", "8", "--headless"], capsys)
    assert code != 0 and "Traceback" not in err
    assert "checkpoint" in err.strip().splitlines()[-1]
    assert snapshot_tree(run) == before


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, homestar_home, capsys):
    code, err = _run(["resume", str(tmp_path), "--headless"], capsys)
    _assert_one_line_error(code, err, "config.json")


def test_resume_to_fewer_steps_is_refused(saved_run, homestar_home, capsys):
    before = snapshot_tree(saved_run)
    code, err = _run(["resume", str(saved_run), "--steps", "2", "--headless"], capsys)
    _assert_one_line_error(code, err, "step 4")
    assert snapshot_tree(saved_run) == before


def test_sample_of_missing_run(tmp_path, capsys):
    code, err = _run(["sample", str(tmp_path / "none"), "--prompt", "x"], capsys)
    _assert_one_line_error(code, err)
