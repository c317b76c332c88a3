"""The launcher's heartbeat: ``<run>/control/launcher.json``, refreshed while an attached launch follows its job.

A job whose spec has ``launcher_grace_s`` is cancelled by its agent once this object has not
changed for that long (``trainctl_lightning/agent/watchdog.py``): the launcher was killed, its
laptop went to sleep, or its network is gone, and nobody is watching the instance any more.
Only the change counts, measured on the agent's clock, so the two machines' clocks need not agree.

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from typing import Any

from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.store import layout
from trainctl_lightning.timeutil import utc_now

__all__ = [
    "DEFAULT_LAUNCHER_GRACE_S",
    "LAUNCHER_HEARTBEAT_S",
    "LauncherHeartbeat",
    "read_launcher_heartbeat",
    "write_launcher_heartbeat",
]

log = logging.getLogger(__name__)

#: How often an attached launcher refreshes its heartbeat.
LAUNCHER_HEARTBEAT_S = 15.0
#: ``JobSpec.launcher_grace_s`` of an attached launch: long enough for a laptop's short sleep.
DEFAULT_LAUNCHER_GRACE_S = 600.0


def write_launcher_heartbeat(jobs: JobStore, seq: int = 0) -> None:
    body = {"heartbeat_at": utc_now(), "seq": seq, "host": socket.gethostname(), "pid": os.getpid()}
    jobs.objects.write(layout.LAUNCHER_HEARTBEAT, json.dumps(body).encode())


def read_launcher_heartbeat(jobs: JobStore) -> bytes | None:
    """The heartbeat object as stored (None before the first); compare it, do not parse its time."""
    return jobs.objects.read(layout.LAUNCHER_HEARTBEAT)


class LauncherHeartbeat:
    """Refreshes the launcher heartbeat on a background thread for the duration of a ``with`` block.

    A write that fails is logged once and retried at the next beat; it never interrupts the launcher.

    Example::

        with LauncherHeartbeat(run.job):
            for chunk in run.follow():
                ...
    """

    def __init__(self, jobs: JobStore, interval_s: float = LAUNCHER_HEARTBEAT_S) -> None:
        self.jobs = jobs
        self.interval_s = interval_s
        self.beats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def __enter__(self) -> LauncherHeartbeat:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="trainctl-launcher-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                write_launcher_heartbeat(self.jobs, self.beats)
                self.beats += 1
                self._failing = False
            except Exception as exc:
                if not self._failing:
                    log.warning("trainctl: could not refresh the launcher heartbeat in %s (will retry): %s", self.jobs.url, exc)
                self._failing = True
            self._stop.wait(self.interval_s)
