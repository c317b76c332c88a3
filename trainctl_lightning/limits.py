"""Checks for the numeric limits a user sets (hours, seconds, sizes): finite, positive, bounded.

``float("inf")`` and ``nan`` compare in ways that slip past a plain ``> 0`` test (``inf > 0``
holds, and ``nan`` fails every comparison), and TOML spells both (``max_hours = inf``). A limit
that is not a finite positive number would reach the instance's boot script or the agent's
timers, so it is refused where it is given, with one line naming the key and the value.
"""

from __future__ import annotations

import math
from typing import Any

from trainctl_lightning.errors import ConfigError

__all__ = ["MAX_RUNTIME_LIMIT_S", "check_limit"]

#: The longest hard runtime cap accepted (366 days): beyond it a "cap" is no cap, and a shutdown
#: scheduled in minutes stays a small, exact integer.
MAX_RUNTIME_LIMIT_S = 366 * 24 * 3600.0


def check_limit(name: str, value: Any, unit: str = "seconds", *, maximum: float | None = None) -> float:
    """``value`` as a float, if it is a finite number > 0 (and at most ``maximum``).

    Args:
        name: the key or argument, for the message (``max_hours``, ``JobSpec.stop_grace_s``).
        unit: what the number counts, for the message.
        maximum: the largest value allowed, in ``unit``.

    Raises:
        ConfigError: not a number (booleans included), not finite, not > 0, or over ``maximum``.

    Example::

        check_limit("max_hours", 12, "hours", maximum=MAX_RUNTIME_LIMIT_S / 3600)  # -> 12.0
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} = {value!r} must be a number of {unit}, got {type(value).__name__}")
    allowed = f"a finite number of {unit} > 0" + (f" and <= {maximum:g}" if maximum is not None else "")
    if not math.isfinite(value) or value <= 0 or (maximum is not None and value > maximum):
        raise ConfigError(f"{name} = {value!r} is not allowed: it must be {allowed}")
    return float(value)
