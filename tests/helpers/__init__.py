"""What tests share: helpers and fakes (fixtures live in ``tests/conftest.py``).

Test modules import from here, never from each other.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Use instead of a fixed sleep before an assert: the test goes on as soon as the condition
    holds and fails with a clear message (naming ``what``) once ``timeout`` seconds have passed.

    Raises:
        AssertionError: the predicate stayed falsy for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {what or getattr(predicate, '__name__', 'a condition')}"
            )
        time.sleep(interval)


__all__ = ["wait_until"]
