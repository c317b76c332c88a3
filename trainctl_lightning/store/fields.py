"""Strict readers for fields of JSON objects read from the store (manifests, status records).

A damaged value raises ``ValueError`` naming it; the caller turns that into one line naming the
object (or a warning when it was only listed). Internal: not part of the public API.
"""

from __future__ import annotations

from typing import Any

__all__ = ["opt_float", "opt_int"]


def opt_int(value: Any) -> int | None:
    """A whole number or None (``True`` and ``1.0`` are not whole numbers here)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not a whole number")
    return value


def opt_float(value: Any) -> float | None:
    """A number or None (``float()`` raises ValueError/TypeError on anything else)."""
    return None if value is None else float(value)
