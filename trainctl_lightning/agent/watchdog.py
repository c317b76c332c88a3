"""The agent's launcher watchdog: an attached launch whose launcher is gone must not keep an instance busy.

The agent already ends the instance when the job ends (``JobSpec.terminate_instance_after``) and
at the max runtime. This adds the third way an instance outlives its purpose: the launcher that
followed the job stopped refreshing ``control/launcher.json`` (see ``jobs/heartbeat.py``) for
longer than ``JobSpec.launcher_grace_s``. The agent then cancels the job (SIGTERM: Lightning
saves and stops) and, as after any ending, releases an instance its launch created.

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from trainctl_lightning.jobs.heartbeat import read_launcher_heartbeat
from trainctl_lightning.jobs.store import JobStore

__all__ = ["LauncherWatchdog"]

log = logging.getLogger("trainctl_lightning.agent.watchdog")


class LauncherWatchdog:
    """Says when the launcher's heartbeat has not changed for ``grace_s`` seconds.

    The agent's start counts as a beat (the launcher may not have written one yet), so a job
    always gets at least ``grace_s``. A heartbeat that cannot be read is no evidence either way:
    it is skipped, never counted as silence.

    Args:
        jobs: the run's job objects.
        grace_s: how long the heartbeat may stay unchanged.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, jobs: JobStore, grace_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.jobs = jobs
        self.grace_s = grace_s
        self.clock = clock
        self.last_change = clock()
        self._last: bytes | None = None
        self._read_failing = False

    @property
    def interval_s(self) -> float:
        """How often :meth:`check` is worth calling."""
        return min(5.0, self.grace_s / 4)

    def check(self) -> str | None:
        """Why the job should be cancelled, once the heartbeat has been quiet too long; else None."""
        try:
            raw = read_launcher_heartbeat(self.jobs)
        except Exception as exc:
            if not self._read_failing:
                log.warning("could not read the launcher heartbeat (will retry): %s", " ".join(str(exc).split()))
            self._read_failing = True
            return None
        self._read_failing = False
        now = self.clock()
        if raw is not None and raw != self._last:
            self._last = raw
            self.last_change = now
            return None
        quiet = now - self.last_change
        if quiet <= self.grace_s:
            return None
        what = "its heartbeat has not changed" if self._last is not None else "it has written no heartbeat"
        return f"the launcher is gone: {what} for {quiet:.0f}s (launcher_grace_s={self.grace_s:g})"
