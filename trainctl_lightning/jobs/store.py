"""A job's objects in its run store: spec, state, log chunks and the cancel request.

The names are in :mod:`trainctl_lightning.store.layout` (``docs/run-store.md``).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from trainctl_lightning.errors import IntegrityError, RunNotFoundError
from trainctl_lightning.jobs.spec import JobSpec, JobState
from trainctl_lightning.runkey import detached_signature, verify_detached
from trainctl_lightning.store import ObjectStore, layout
from trainctl_lightning.timeutil import utc_now

__all__ = ["JobStore", "LogChunkWriter", "NodeLogMerger", "chunk_time_ms"]

T = TypeVar("T")


class JobStore:
    """The job objects of one run.

    Args:
        run_url: the run's URL (``<store>/<run id>``).
        storage_options: passed to fsspec.
        node: a multi-node run's node whose state and logs this reads and writes
            (``layout.node_object``: node 0's are the run's own); the spec and the cancel
            request are the run's whatever the node.
    """

    def __init__(self, run_url: str, storage_options: dict[str, Any] | None = None, node: int = 0) -> None:
        self.objects = ObjectStore(run_url, storage_options)
        """The run's objects; its ``retry`` may be swapped (the agent's short ticks)."""
        self.url = self.objects.url
        self.node = node
        self._state_name = layout.node_object(node, layout.JOB_STATE)
        self._logs = layout.node_object(node, layout.LOGS)

    def for_node(self, node: int) -> JobStore:
        """The same run seen as node ``node`` (sharing this one's object store and its retry policy)."""
        other = JobStore.__new__(JobStore)
        other.objects, other.url, other.node = self.objects, self.url, node
        other._state_name = layout.node_object(node, layout.JOB_STATE)
        other._logs = layout.node_object(node, layout.LOGS)
        return other

    def __repr__(self) -> str:
        return f"JobStore({self.url!r})"

    def exists(self) -> bool:
        """Whether a job was written here (its ``job.json``)."""
        return self.objects.exists(layout.JOB)

    # ------------------------------------------------------------ spec and state
    def write_spec(self, spec: JobSpec, run_key: str | None = None) -> None:
        """Write ``job.json`` once; with ``run_key``, its signature first (the agent may be waiting
        for ``job.json`` already, and must find the signature with it)."""
        data = spec.to_json()
        if run_key:
            signature = detached_signature(run_key, data, purpose="job", run_id=spec.run_id)
            self.objects.write(layout.JOB_SIGNATURE, signature, create_only=True)
        self.objects.write(layout.JOB, data, create_only=True)

    def read_signed_spec(self, run_id: str, run_key: str) -> JobSpec:
        """The job spec, only if ``job.sig`` proves that the launcher holding ``run_key`` wrote it.

        Raises:
            AuthenticationError: no signature, or one that does not match (one line naming job.json).
            RunNotFoundError, IntegrityError: as :meth:`read_spec`.
        """
        raw = self.objects.read(layout.JOB)
        if raw is None:
            raise RunNotFoundError(f"no job in {self.url} (no {layout.JOB})")
        name = self.objects.url_of(layout.JOB)
        verify_detached(run_key, self.objects.read(layout.JOB_SIGNATURE), raw, purpose="job", name=name, run_id=run_id)
        return _parse(JobSpec.from_json, raw, name, "job spec")

    def read_spec(self) -> JobSpec:
        """The job spec.

        Raises:
            RunNotFoundError: there is no job at this URL.
            IntegrityError: ``job.json`` is there but does not parse (one line naming it).
        """
        raw = self.objects.read(layout.JOB)
        if raw is None:
            raise RunNotFoundError(f"no job in {self.url} (no {layout.JOB}); `trainctl runs ls STORE` lists runs")
        return _parse(JobSpec.from_json, raw, self.objects.url_of(layout.JOB), "job spec")

    def write_state(self, state: JobState) -> None:
        self.objects.write(self._state_name, state.to_json())

    def read_state(self) -> JobState | None:
        """The job's state, or None before anyone wrote one.

        Raises:
            IntegrityError: ``job-state.json`` is there but does not parse (one line naming it).
        """
        raw = self.objects.read(self._state_name)
        return None if raw is None else _parse(JobState.from_json, raw, self.objects.url_of(self._state_name), "job state")

    def write_code_manifest(self, data: bytes) -> None:
        self.objects.write(layout.CODE_MANIFEST, data, create_only=True)

    # ------------------------------------------------------------ logs
    def log_writer(self, attempt: int | None = None, part: int = 1) -> LogChunkWriter:
        return LogChunkWriter(self.objects, attempt, part, folder=self._logs)

    def read_log_chunks(self, skip: set[str] | frozenset[str] = frozenset()) -> list[tuple[str, bytes]]:
        return self.objects.read_new(self._logs, "*.log", skip)

    def read_logs(self) -> bytes:
        return b"".join(data for _, data in self.read_log_chunks())

    def read_node_logs(self, nodes: int, node: int | None = None) -> bytes:
        """A multi-node run's output: every node's, line by line in the order the nodes wrote it,
        each line prefixed ``[node K] ``; or only node ``node``'s, as it printed it."""
        if node is not None:
            return self.for_node(node).read_logs()
        merger = NodeLogMerger()
        for k in range(nodes):
            merger.add(k, self.for_node(k).read_log_chunks())
        return merger.flush()

    def follow_logs(
        self, poll_s: float = 0.5, stop: Callable[[], bool] | None = None, nodes: int = 1, node: int | None = None
    ) -> Iterator[bytes]:
        """Yield new output as it arrives until the job ends (and its last chunk is read).

        A multi-node run (``nodes`` > 1) yields every node's lines prefixed ``[node K] ``, or only
        node ``node``'s. The run ends with node 0's (the lead's) state, which it writes once the
        other nodes ended.
        """
        seen: dict[int, set[str]] = {}
        sources = (
            [self] if nodes <= 1 else [self.for_node(node)] if node is not None else [self.for_node(k) for k in range(nodes)]
        )
        merger = NodeLogMerger() if nodes > 1 and node is None else None

        def read_new() -> Iterator[bytes]:
            for source in sources:
                names = seen.setdefault(source.node, set())
                chunks = source.read_log_chunks(frozenset(names))
                names.update(name for name, _ in chunks)
                if merger is not None:
                    merger.add(source.node, chunks)
                else:
                    yield from (data for _, data in chunks)
            if merger is not None:
                data = merger.flush(final=False)
                if data:
                    yield data

        while True:
            state = self.read_state()
            got = False
            for data in read_new():
                got = True
                yield data
            if state is not None and (state.phase.is_terminal() or state.lost) and not got:
                # the agent writes its last chunk before the terminal state: one more read suffices
                yield from read_new()
                if merger is not None and (rest := merger.flush()):
                    yield rest
                return
            if stop is not None and stop():
                return
            time.sleep(poll_s)

    # ------------------------------------------------------------ control
    def request_cancel(self, reason: str = "cancelled by the user") -> None:
        body = json.dumps({"requested_at": utc_now(), "reason": reason}).encode()
        self.objects.write(layout.CANCEL, body)

    def cancel_requested(self) -> str | None:
        """The reason given, when someone asked this job to stop."""
        raw = self.objects.read(layout.CANCEL)
        if raw is None:
            return None
        try:
            return str(json.loads(raw).get("reason") or "cancelled")
        except ValueError:
            return "cancelled"


def chunk_time_ms(name: str) -> int | None:
    """The writer's clock (ms since the epoch) in a log chunk's name (``...-t<ms>.log``); None for
    chunks written before names carried it, or a name that does not parse."""
    stem = name.rsplit("/", 1)[-1].removesuffix(".log")
    tail = stem.rsplit("-", 1)[-1]
    return int(tail[1:]) if tail.startswith("t") and tail[1:].isdigit() else None


class NodeLogMerger:
    """Interleaves several nodes' log chunks into lines prefixed ``[node K] ``.

    Each node's chunks are added in their own order; complete lines are released ordered by
    the time of the chunk that completed them (a node's own lines stay in order). A line cut
    between two chunks is held until its end arrives, or until :meth:`flush` with ``final``.
    """

    def __init__(self) -> None:
        self._partial: dict[int, bytes] = {}
        self._pending: list[tuple[int, int, int, bytes]] = []  # (chunk time, node, sequence, line)
        self._seq = 0

    def add(self, node: int, chunks: list[tuple[str, bytes]]) -> None:
        for name, data in chunks:
            when = chunk_time_ms(name) or 0
            text = self._partial.pop(node, b"") + data
            *lines, rest = text.split(b"\n")
            for line in lines:
                self._pending.append((when, node, self._seq, line + b"\n"))
                self._seq += 1
            if rest:
                self._partial[node] = rest

    def flush(self, final: bool = True) -> bytes:
        """The lines released so far, prefixed and in order; with ``final``, a cut line too."""
        if final:
            for node, rest in sorted(self._partial.items()):
                self._pending.append((2**63, node, self._seq, rest + b"\n"))
                self._seq += 1
            self._partial.clear()
        self._pending.sort(key=lambda item: (item[0], item[2]))
        out = b"".join(b"[node %d] " % node + line for _, node, _, line in self._pending)
        self._pending.clear()
        return out


def _parse(parse: Callable[[bytes], T], raw: bytes, where: str, what: str) -> T:
    """``parse(raw)``, with any parse failure turned into one IntegrityError line naming the object."""
    try:
        return parse(raw)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise IntegrityError(
            f"{where} is not a readable trainctl {what} ({type(exc).__name__}: {exc}); it is damaged or was "
            "written by something else: delete it or fix it by hand"
        ) from None


class LogChunkWriter:
    """Writes a job's output as immutable, ordered chunks (object stores cannot append).

    Chunks are read in name order. A managed run's chunks start with the attempt (``a0002-1-``),
    so that every attempt's output follows the previous one's even when the replacement's clock
    is behind; ``part`` orders writers within an attempt (0: before the agent, 1: the agent,
    2: after it, e.g. the supervisor's notes).
    """

    def __init__(self, objects: ObjectStore, attempt: int | None = None, part: int = 1, folder: str = layout.LOGS) -> None:
        self.objects = objects
        self.folder = folder
        stamp = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
        self.prefix = stamp if attempt is None else f"a{attempt:04d}-{part}-{stamp}"
        self.seq = 0
        self.bytes_written = 0
        self._stamp: tuple[int, int] | None = None  # (seq, ms) of the chunk being written

    def next_name(self) -> str:
        """The object the next chunk goes to (the same until a write of it succeeds)."""
        if self._stamp is None or self._stamp[0] != self.seq:
            self._stamp = (self.seq, int(time.time() * 1000))
        return f"{self.folder}/{self.prefix}-{self.seq:06d}-t{self._stamp[1]}.log"

    def write(self, data: bytes) -> None:
        if not data:
            return
        # The time suffix orders chunks of different nodes for `trainctl logs` (by the writer's clock);
        # within one writer, the sequence number orders them. A chunk retried after a failed write
        # (whose reply may have been lost) keeps its name: the store then finds the same bytes there.
        self.objects.write(self.next_name(), data, create_only=True)
        self.seq += 1
        self.bytes_written += len(data)
