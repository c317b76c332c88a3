"""Sizes and durations as people read them: the one place that formats them."""

from __future__ import annotations

import math
from datetime import datetime, timezone

__all__ = ["human_age", "human_ago", "human_duration", "human_size", "printable"]


def human_size(n: float) -> str:
    """Decimal units: ``512 B``, ``1.5 MB``, ``300 kB``, ``2.0 GB`` (one decimal below 10)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.1f} {unit}" if v < 10 else f"{v:.0f} {unit}"
    return f"{int(n)} B"


def human_duration(seconds: float | None) -> str:
    """``45s``, ``1.5s``, ``3m05s``, ``2h14m``, ``3d04h``; ``-`` when unknown.

    Under a minute the seconds keep their fraction when they have one (``0.5s``: short limits
    and timeouts say exactly what they were).
    """
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    if seconds < 60:
        return f"{seconds:g}s" if seconds < 10 and seconds != int(seconds) else f"{round(seconds)}s"
    s = round(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def human_ago(seconds: float | None) -> str:
    """``12s ago``, ``3m05s ago``; ``-`` when unknown."""
    text = human_duration(seconds)
    return text if text == "-" else f"{text} ago"


def human_age(when: datetime) -> str:
    """How long ago ``when`` was, in whole units: ``3d ago``, ``5h ago``, ``12m ago``, ``40s ago``."""
    seconds = max(0, int((datetime.now(timezone.utc) - when).total_seconds()))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def printable(value: object) -> str:
    """Text from the store made harmless on a terminal: control characters (an ANSI escape, a
    carriage return, a bell) and other non-printable ones become ``\\x1b``-style escapes."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
