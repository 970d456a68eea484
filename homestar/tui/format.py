"""Short human-readable numbers for the app: bytes, counts, rates, durations, relative times.

Pure functions of their arguments (the caller passes "now"), so screens render deterministically.
"""

from __future__ import annotations

GIB = 2**30


def gib(num_bytes: float | None) -> str:
    """Bytes as GiB with a precision that suits the size: 0.012, 1.23, 12.3, 123."""
    if num_bytes is None:
        return "-"
    return f"{_sig(num_bytes / GIB)} GiB"


def size(num_bytes: float | None) -> str:
    """Bytes in the unit that suits them: 512 B, 64 KiB, 12.5 MiB, 1.23 GiB, 2.05 TiB."""
    if num_bytes is None:
        return "-"
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{_sig(value)} {unit}"
        value /= 1024
    return f"{_sig(value)} TiB"


def gib_value(value_gib: float | None) -> str:
    """A figure already in GiB, same style as gib()."""
    if value_gib is None:
        return "-"
    return f"{_sig(value_gib)} GiB"


def _sig(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.1 or value == 0:
        return f"{value:.2f}"
    return f"{value:.3f}"


def count(value: float) -> str:
    """Parameter or token counts: 850, 12.5K, 124M, 1.3B."""
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= size:
            scaled = value / size
            return f"{scaled:.1f}{suffix}" if scaled < 100 else f"{scaled:.0f}{suffix}"
    return f"{value:.0f}"


def rate(value: float | None) -> str:
    """Tokens per second: 12, 1,234, 45.6K."""
    if value is None:
        return "-"
    if value >= 100_000:
        return count(value)
    return f"{value:,.0f}"


def tflops(value: float | None) -> str:
    """TFLOP/s with enough digits to tell a CPU run from zero."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.1f}"
    if value >= 0.01:
        return f"{value:.2f}"
    return f"{value:.4f}"


def duration(seconds: float | None) -> str:
    """A span for an ETA or elapsed time: 45s, 3m 05s, 2h 10m, 3d 4h."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m {s:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h {m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d {h}h"


def ago(then: float | None, now: float) -> str:
    """How long before `now` a moment was: "just now", "5m ago", "3d ago"."""
    if not then:
        return "-"
    delta = now - then
    if delta < 30:
        return "just now"
    return f"{duration(delta).split()[0]} ago"


def path(value) -> str:
    """A path with the home folder written as ~ (shorter, and the same on every machine for its user)."""
    from pathlib import Path

    text = str(value)
    home = str(Path.home())
    if home not in ("", "/") and (text == home or text.startswith(home + "/")):
        return "~" + text[len(home):]
    return text


def loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def learning_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"
