"""A job's objects in its run store: spec, state, log chunks and the cancel request.

Layout (``docs/run-store.md``)::

    <store root>/
      _code/blobs/<sha256>           file contents of every synced project, shared by all runs
      <run id>/                      the run URL (what CheckpointSync / MetricsReporter write to)
        job.json                     JobSpec, create-only
        code.json                    the code bundle manifest (its SHA-256 is in job.json)
        job-state.json               JobState, rewritten by the agent (heartbeat)
        logs/<start>-<session>-<seq>.log   the job's output, immutable chunks in order
        control/cancel.json          present once someone asked the job to stop
        checkpoints/ metrics/ status.json   (CheckpointSync, MetricsReporter)
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Iterator

from trainctl_lightning.errors import RunNotFoundError
from trainctl_lightning.jobs.spec import JobSpec, JobState
from trainctl_lightning.manifest import utc_now
from trainctl_lightning.store import JOB_NAME, RunStore

JOB_STATE_NAME = "job-state.json"
CODE_MANIFEST_NAME = "code.json"
LOGS_DIR = "logs"
CANCEL_NAME = "control/cancel.json"
CODE_BLOBS = "_code/blobs"


def run_url_in(store_url: str, run_id: str) -> str:
    """The URL of run ``run_id`` in the store rooted at ``store_url``."""
    return f"{store_url.rstrip('/')}/{run_id}"


def blobs_url_in(store_url: str) -> str:
    return f"{store_url.rstrip('/')}/{CODE_BLOBS}"


class JobStore:
    """The job objects of one run (wraps the run's :class:`RunStore`)."""

    def __init__(self, run_url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.store = RunStore(run_url, storage_options)
        self.url = self.store.url

    def __repr__(self) -> str:
        return f"JobStore({self.url!r})"

    # ------------------------------------------------------------ spec and state
    def write_spec(self, spec: JobSpec) -> None:
        self.store.write_object(JOB_NAME, spec.to_json(), create_only=True)

    def read_spec(self) -> JobSpec:
        """Raises RunNotFoundError when there is no job at this URL."""
        raw = self.store.read_object(JOB_NAME)
        if raw is None:
            raise RunNotFoundError(f"no job in {self.url} (no {JOB_NAME}); `trainctl runs ls STORE` lists runs")
        return JobSpec.from_json(raw)

    def write_state(self, state: JobState) -> None:
        self.store.write_object(JOB_STATE_NAME, state.to_json())

    def read_state(self) -> JobState | None:
        raw = self.store.read_object(JOB_STATE_NAME)
        return None if raw is None else JobState.from_json(raw)

    def write_code_manifest(self, data: bytes) -> None:
        self.store.write_object(CODE_MANIFEST_NAME, data, create_only=True)

    # ------------------------------------------------------------ logs
    def log_writer(self) -> "LogChunkWriter":
        return LogChunkWriter(self.store)

    def read_log_chunks(self, skip: set[str] | frozenset[str] = frozenset()) -> list[tuple[str, bytes]]:
        return self.store.read_new_objects(LOGS_DIR, "*.log", skip)

    def read_logs(self) -> bytes:
        return b"".join(data for _, data in self.read_log_chunks())

    def follow_logs(self, poll_s: float = 0.5, stop: Any = None) -> Iterator[bytes]:
        """Yield new output as it arrives until the job ends (and its last chunk is read)."""
        seen: set[str] = set()
        while True:
            state = self.read_state()
            chunks = self.read_log_chunks(frozenset(seen))
            for name, data in chunks:
                seen.add(name)
                yield data
            if state is not None and (state.phase.is_terminal() or state.lost) and not chunks:
                # the agent writes its last chunk before the terminal state: one more read suffices
                for name, data in self.read_log_chunks(frozenset(seen)):
                    seen.add(name)
                    yield data
                return
            if stop is not None and stop():
                return
            time.sleep(poll_s)

    # ------------------------------------------------------------ control
    def request_cancel(self, reason: str = "cancelled by the user") -> None:
        body = json.dumps({"requested_at": utc_now(), "reason": reason}).encode()
        self.store.write_object(CANCEL_NAME, body)

    def cancel_requested(self) -> str | None:
        """The reason given, when someone asked this job to stop."""
        raw = self.store.read_object(CANCEL_NAME)
        if raw is None:
            return None
        try:
            return str(json.loads(raw).get("reason") or "cancelled")
        except ValueError:
            return "cancelled"


class LogChunkWriter:
    """Writes a job's output as immutable, ordered chunks (object stores cannot append)."""

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self.prefix = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
        self.seq = 0
        self.bytes_written = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.store.write_object(f"{LOGS_DIR}/{self.prefix}-{self.seq:06d}.log", data, create_only=True)
        self.seq += 1
        self.bytes_written += len(data)
