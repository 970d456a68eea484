"""The homestar terminal app (Textual): home, training and runs screens.

Entry points for the command line: `run_app()` opens the home screen; `run_app(train_argv=...)`
starts a run with those `homestar train` flags and opens its training screen; `run_app(resume_dir=...)`
resumes a run (or attaches to it if it is training). `make_app(...)` builds the app for tests.
Training always runs in a child process; this package imports Textual, the trainer never does.
"""

from __future__ import annotations

from pathlib import Path

import textual  # noqa: F401  (without Textual, importing this package fails here, as ImportError)


def make_app(**kwargs):
    """See homestar.tui.app.make_app."""
    from homestar.tui.app import make_app as _make_app

    return _make_app(**kwargs)


def run_app(*, train_argv: list[str] | None = None, resume_dir: Path | None = None,
            resume_steps: int | None = None) -> int:
    """Run the app in this terminal until the user quits; returns the exit status."""
    from homestar.tui.app import make_app as _make_app

    kwargs: dict = {}
    if train_argv is not None:
        kwargs["train_argv"] = list(train_argv)
    elif resume_dir is not None:
        kwargs.update(_resume_or_attach(Path(resume_dir), resume_steps))
    app = _make_app(**kwargs)
    app.run()
    return app.return_code or 0


def _resume_or_attach(run_dir: Path, steps: int | None) -> dict:
    from homestar.errors import ConfigError
    from homestar.train.lock import is_locked

    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir} is not a homestar run (no config.json)")
    if is_locked(run_dir):
        return {"attach_dir": run_dir}
    return {"resume_dir": run_dir, "resume_steps": steps}
