"""The one exception family that reaches users.

Components raise `HomestarError` (or a subclass) with a message written for the person at the
keyboard; the CLI prints that one line to stderr and exits non-zero, the app shows it. Anything
else escaping is a bug and keeps its traceback.
"""


class HomestarError(Exception):
    """A user-facing failure: bad input, a missing file, a budget that cannot be met."""

    exit_code = 2


class DataError(HomestarError):
    """The training data is missing, empty, binary or undecodable."""


class ConfigError(HomestarError):
    """A preset, flag value or run configuration is invalid."""


class CheckpointError(HomestarError):
    """A checkpoint or run folder is missing, damaged or incompatible."""


class BudgetError(HomestarError):
    """A memory budget cannot hold what the run needs."""
