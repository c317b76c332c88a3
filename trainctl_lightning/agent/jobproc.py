"""The job's process as seen from outside its agent: a record on disk, and how to end its group.

The agent starts each job in a process group (and session) of its own and writes
``<workdir>/jobs/<run id>.json`` right after: the group id, the leader's pid and its start time
(``/proc/<pid>/stat`` field 22, clock ticks since boot), the run URL and the job's stop grace.
Whoever must stop the job when the agent cannot (the local provider's ``stop``/``terminate``
after the agent was SIGKILLed) reads that record instead of guessing from the process tree,
and checks the start time before signalling, so a reused pid is never hit.

**When the agent dies, its job gets SIGTERM** (Linux ``PR_SET_PDEATHSIG``, set between fork
and exec): a job without its agent has no one shipping its output or heartbeat, and would run
unsupervised forever. SIGTERM rather than SIGKILL, so that Lightning and ``CheckpointSync``
still save and publish a checkpoint, as on any other stop. A job that ignores SIGTERM, and any
process the job started in its group, are ended by ``trainctl stop``/``terminate`` (SIGTERM,
then SIGKILL after the recorded grace). Elsewhere than Linux there is no death signal; the
record still lets ``stop``/``terminate`` end the job.

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from trainctl_lightning.store.files import write_atomic

__all__ = [
    "AGENT_UMASK",
    "DEATH_SIGNAL",
    "JOBS_DIR",
    "JobProcess",
    "children_of",
    "die_with_parent",
    "die_with_parent_now",
    "process_start_time",
    "processes",
    "read_job_records",
    "remove_job_record",
    "use_agent_umask",
    "write_job_record",
]

log = logging.getLogger(__name__)

AGENT_UMASK = 0o077
"""The agent's own umask: what it creates (logs, code, environments, records) is the user's only."""
JOBS_DIR = "jobs"
"""Folder of the agent's workdir that holds one record per running job."""
DEATH_SIGNAL = signal.SIGTERM
"""What a job gets when its agent dies (Linux)."""
_PR_SET_PDEATHSIG = 1
#: How long a group that got SIGKILL may take to disappear before we give up on it.
_KILL_WAIT_S = 10.0


def process_start_time(pid: int) -> int | None:
    """Start time of a live process (clock ticks since boot, from /proc), None if gone or a zombie."""
    stat = _stat(pid)
    return None if stat is None else int(stat[19])


def _stat(pid: int, zombies: bool = False) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name; None if gone or (unless
    ``zombies``) a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return None if fields[0] in ("Z", "X") and not zombies else fields


def processes(zombies: bool = False) -> Iterator[tuple[int, int, int, int]]:
    """(pid, parent pid, process group, session) of every live process, zombies too with ``zombies``
    (a parent that reaps needs to find them)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry), zombies)) is not None:
            yield int(entry), int(fields[1]), int(fields[2]), int(fields[3])


def children_of(pid: int, zombies: bool = False) -> list[int]:
    """The processes whose parent is ``pid``."""
    return [child for child, parent, _, _ in processes(zombies) if parent == pid]


def _group_members(pgid: int) -> Iterator[int]:
    """Live processes whose process group is ``pgid``."""
    return (pid for pid, _, group, _ in processes() if group == pgid)


def _has_env(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read().split(b"\0")
    except OSError:
        return False


_job_umask: int | None = None


def use_agent_umask() -> None:
    """Make what this (agent) process creates private; jobs it starts get the umask it had."""
    global _job_umask
    previous = os.umask(AGENT_UMASK)
    if _job_umask is None:
        _job_umask = previous


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get :data:`DEATH_SIGNAL` when the agent dies (Linux)
    and sets its ``umask`` (the agent's own is private; the job gets the one the agent started with).

    ``prctl`` is resolved here, before the fork, so the child only makes the call (and nothing
    that could wait on a lock another thread of the agent held at fork time). The signal is tied
    to the forking thread: the agent starts jobs from its main thread, which lives as long as it.
    None when there is nothing to do.
    """
    umask = _job_umask
    prctl = None
    if sys.platform.startswith("linux") and (libc_name := ctypes.util.find_library("c")) is not None:
        prctl = ctypes.CDLL(libc_name, use_errno=True).prctl
    if prctl is None and umask is None:
        return None
    parent = os.getpid()
    sig = int(DEATH_SIGNAL)

    def preexec() -> None:
        if umask is not None:
            os.umask(umask)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
            if os.getppid() != parent:  # the agent died before the call: nobody would signal us
                os.kill(os.getpid(), sig)

    return preexec


def die_with_parent_now(parent: int) -> None:
    """Called by a child at its start: get :data:`DEATH_SIGNAL` when ``parent`` (its creator) dies (Linux).

    For a child started without a ``preexec_fn`` (:func:`die_with_parent` makes ``subprocess``
    fork the whole parent: a copy of its page tables, and every page of its memory shared
    copy-on-write with the child until ``exec``), so that ``subprocess`` can use ``vfork``. If
    ``parent`` already died before the call, nobody would signal this process: it signals itself.
    As with :func:`die_with_parent`, the signal is tied to the thread that started the child.
    """
    if sys.platform.startswith("linux") and (libc_name := ctypes.util.find_library("c")) is not None:
        ctypes.CDLL(libc_name, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(DEATH_SIGNAL), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), DEATH_SIGNAL)


@dataclass
class JobProcess:
    """One job started by an agent: enough to find and end its whole process group later."""

    run_id: str
    run_url: str
    pid: int
    """The job's first process; also its process group (and session) id."""
    start_time: int | None
    """The leader's start time (clock ticks since boot): a reused pid has another one."""
    agent_pid: int
    stop_grace_s: float
    """Seconds between SIGTERM and SIGKILL, as the job asked."""

    @property
    def pgid(self) -> int:
        return self.pid

    def leader_alive(self) -> bool:
        return self.start_time is not None and process_start_time(self.pid) == self.start_time

    def members(self) -> list[int]:
        """Live processes of the job's group that are provably this job's.

        While the leader lives (same start time), its group is the job's. Once it is gone, a
        process still in the group counts only if it carries the job's ``TRAINCTL_RUN_ID``
        (every process of the job inherits it): a group id can be reused once a group empties.
        """
        found = list(_group_members(self.pgid))
        if self.leader_alive():
            return found
        marker = f"TRAINCTL_RUN_ID={self.run_id}".encode()
        return [pid for pid in found if _has_env(pid, marker)]

    def end(self, grace_s: float | None = None) -> str | None:
        """SIGTERM the job's processes, SIGKILL what is left after the grace, wait until they are gone.

        Returns what was done, in words (None when nothing of the job was running).

        Raises:
            ProcessLookupError: never; processes that vanish meanwhile are simply gone.
            TimeoutError: processes of the job survived SIGKILL for 10 s (uninterruptible IO).
        """
        grace = self.stop_grace_s if grace_s is None else grace_s
        members = self.members()
        if not members:
            return None
        self._signal(members, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while members and time.monotonic() < deadline:
            time.sleep(0.05)
            members = self.members()
        if not members:
            return f"process group {self.pgid} ended on SIGTERM"
        self._signal(members, signal.SIGKILL)
        deadline = time.monotonic() + _KILL_WAIT_S
        while members and time.monotonic() < deadline:
            time.sleep(0.05)
            members = self.members()
        if members:
            raise TimeoutError(
                f"process(es) {', '.join(map(str, members))} of process group {self.pgid} still run "
                f"{_KILL_WAIT_S:.0f}s after SIGKILL"
            )
        return f"process group {self.pgid} killed with SIGKILL after {grace:g}s of SIGTERM"

    def _signal(self, members: list[int], sig: int) -> None:
        if self.leader_alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, sig)
            return
        for pid in members:  # the leader is gone: only the processes proven to be the job's
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def _record_path(workdir: Path, run_id: str) -> Path:
    return Path(workdir) / JOBS_DIR / f"{run_id}.json"


def write_job_record(workdir: Path, job: JobProcess) -> None:
    """Record a job the agent just started (private to the user: the run URL is in it)."""
    path = _record_path(workdir, job.run_id)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, json.dumps(asdict(job), sort_keys=True).encode())
    os.chmod(path, 0o600)


def remove_job_record(workdir: Path, run_id: str) -> None:
    _record_path(workdir, run_id).unlink(missing_ok=True)


def read_job_records(workdir: Path) -> list[JobProcess]:
    """Every job recorded under ``workdir``; an unreadable record is skipped with a warning naming it."""
    folder = Path(workdir) / JOBS_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            if not isinstance(data.get("pid"), int) or data["pid"] <= 1:  # never killpg(0) or init
                raise ValueError(f"pid {data.get('pid')!r} is not a job's")
            found.append(
                JobProcess(
                    run_id=str(data["run_id"]),
                    run_url=str(data["run_url"]),
                    pid=int(data["pid"]),
                    start_time=None if data.get("start_time") is None else int(data["start_time"]),
                    agent_pid=int(data["agent_pid"]),
                    stop_grace_s=float(data.get("stop_grace_s", 60.0)),
                )
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("skipping unreadable job record %s: %s", path, exc)
    return found
