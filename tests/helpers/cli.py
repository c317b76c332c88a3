"""`trainctl` as a user runs it: a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

TRAINCTL = [sys.executable, "-m", "trainctl_lightning.cli.app"]


def trainctl(
    *args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {}), "COLUMNS": "200"}
    return subprocess.run([*TRAINCTL, *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout)


class Running:
    """A ``trainctl`` command still running, its output collected as it arrives (read ``.stdout``).

    Its output goes to pipes with Python's default buffering (``PYTHONUNBUFFERED`` unset), as
    for a user who pipes it on: what arrives early was flushed on purpose.
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None) -> None:
        full_env = {**os.environ, **(env or {}), "COLUMNS": "200"}
        full_env.pop("PYTHONUNBUFFERED", None)
        self.proc = subprocess.Popen(
            [*TRAINCTL, *args],
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._out: list[str] = []
        self._err: list[str] = []
        self._readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self._out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self._err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _pump(stream, sink: list[str]) -> None:  # type: ignore[no-untyped-def]
        for line in iter(stream.readline, ""):
            sink.append(line)

    @property
    def stdout(self) -> str:
        return "".join(self._out)

    @property
    def stderr(self) -> str:
        return "".join(self._err)

    def wait(self, timeout: float = 60) -> int:
        """The exit code once the command has ended and all its output is read."""
        code = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return code

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()
