"""Time as the run store records it: UTC, ISO-8601 with microseconds and a ``Z``."""

from __future__ import annotations

from datetime import datetime, timezone

__all__ = ["now", "parse_time", "utc_now"]


def now() -> datetime:
    """This machine's clock, in UTC: the one place trainctl reads it (tests skew it here)."""
    return datetime.now(timezone.utc)


def utc_now() -> str:
    """Now, as stored: ``2026-12-01T05:45:00.123456Z``."""
    return now().isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(value: str) -> datetime:
    """A stored time (or any ISO-8601 time) as an aware datetime; naive times are taken as UTC.

    Raises:
        ValueError: not an ISO-8601 time.
    """
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
