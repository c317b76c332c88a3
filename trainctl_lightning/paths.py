"""Where trainctl keeps things on this machine."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["HOME_ENV", "default_store_url", "trainctl_home"]

HOME_ENV = "TRAINCTL_HOME"


def trainctl_home() -> Path:
    """``$TRAINCTL_HOME``, default ``~/.trainctl``: local-provider instances and the default store."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".trainctl").expanduser().resolve()


def default_store_url() -> str:
    """The store used when none is configured: a directory under :func:`trainctl_home`."""
    return f"file://{trainctl_home() / 'store'}"
