"""`trainctl` as a user runs it: a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

TRAINCTL = [sys.executable, "-m", "trainctl_lightning.cli.app"]


def trainctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {}), "COLUMNS": "200"}
    return subprocess.run([*TRAINCTL, *args], capture_output=True, text=True, env=full_env, timeout=120)
