"""A Lightning ``CheckpointIO`` plugin that takes checkpoint writes off the training loop.

``CheckpointSync`` installs it around whatever ``CheckpointIO`` the strategy had, for the length
of a fit, and puts that one back when the fit ends (normally or not). Every save and every
removal that Lightning's ``ModelCheckpoint`` makes comes through here:

``save_checkpoint`` (training thread)
    waits for a free snapshot slot (``max_pending_snapshots`` bounds host memory), copies the
    checkpoint's tensors to host memory (:mod:`.snapshot`), *reserves* the target path, queues
    the write, and returns.
writer thread (one, so saves and removals keep their order)
    writes the snapshot, frees the slot, puts the file at the target path and hands a private,
    read-only handle on it to the publisher.
``remove_checkpoint``
    queued behind the saves before it; the publisher decides when the remote copy may go.

**The pending window.** When ``save_checkpoint`` returns, the target path exists, as with
Lightning's synchronous IO, so ``ModelCheckpoint``'s version counter (``name-vN.ckpt``) never
picks the name of a save that is still being written, and no save overwrites a different
checkpoint. Until the write completes, the path holds either the file it held before (saving
over ``last.ckpt``: the old checkpoint stays readable until the new one is renamed over it) or,
for a new name, a small placeholder whose content is :data:`PENDING_MARKER`, which
``torch.load`` refuses. Our own readers (:meth:`SnapshotCheckpointIO.load_checkpoint`, so
``trainer.fit/test(ckpt_path=...)``, and :meth:`~SnapshotCheckpointIO.wait_published`) wait for
the pending write of that path first; an outside reader that opens the file during a fit may see
the placeholder (Lightning's own ``AsyncCheckpointIO`` shows it nothing at all then). After the
fit every write has completed. A process killed mid-write can leave a placeholder behind; the
next run removes it from the folder on its first save there.

**Nothing else in the folder.** With Lightning's ``TorchCheckpointIO`` the file is written
unnamed (``O_TMPFILE``), fsynced, linked for an instant to ``.<name>.<session>.tmp`` beside the
target and renamed over it, so readers of the target never see a partial file and a listing
almost never sees the temporary name. Where the file system has no ``O_TMPFILE`` the temporary
name exists for the length of the write, as Lightning's own non-atomic write window does. The
upload reads the written inode through a file descriptor kept open until it is published, so a
later save over ``last.ckpt`` or a top-k rotation that deletes the visible file cannot change or
remove what is being uploaded. This path is ``torch.save`` of the same dict to the same path,
which is what ``TorchCheckpointIO`` does (it only adds a whole-file ``BytesIO`` first).

**A configured ``CheckpointIO`` keeps doing the saving.** A custom ``CheckpointIO`` is called on
the writer thread as ``save_checkpoint(snapshot, target_path, storage_options=...)``, exactly
the arguments Lightning passes (the snapshot is an equal host-memory copy of the checkpoint);
the file it wrote is then copied to an unnamed private file that the upload reads, since such an
IO may rewrite the target in place later. A user's ``AsyncCheckpointIO`` is composed with, not
replaced: its ``save_checkpoint`` and ``remove_checkpoint`` are called on the training thread
exactly as Lightning would, and its inner ``checkpoint_io`` is wrapped in a notifier for the
fit, which hands each file that inner IO has written to the publisher. ``load_checkpoint``
forwards exactly the arguments it receives. ``storage_options`` with ``TorchCheckpointIO``
raises Lightning's ``TypeError``, synchronously.

A fault never costs the newest complete checkpoint. A save whose write fails (full disk, I/O
error, permission denied) leaves nothing behind (its placeholder is removed), and every removal
queued after it is skipped, locally and in the store, as Lightning's synchronous IO would never
have reached it; the failure is logged at once as one line and raised at the next save or
removal (or by ``CheckpointSync`` at the end of the fit). A removal that comes after a save
whose upload is known to have failed is skipped the same way. A flush that stops waiting while a
save is still being written names it as unfinished; the abandoned write, if it completes,
leaves the file in its folder and is not published.

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.plugins.io import AsyncCheckpointIO

from trainctl_lightning.checkpoint.publisher import FlushResult, Publisher, PublishJob
from trainctl_lightning.checkpoint.snapshot import BufferPool, Snapshot, take_snapshot
from trainctl_lightning.errors import ConfigError, TrainctlError, UploadError
from trainctl_lightning.retry import exception_chain
from trainctl_lightning.store.transfer import WRITE_CHUNK, Growing, can_transfer

__all__ = ["PENDING_MARKER", "SnapshotCheckpointIO"]

log = logging.getLogger(__name__)

PENDING_MARKER = b"TRAINCTL PENDING CHECKPOINT: being written in the background by trainctl CheckpointSync\n"
"""The whole content of a reserved path until its checkpoint is written over it."""
_OUR_TMP = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")
_LEGACY_STAGING = ".trainctl-staging"  # where versions before 0.12 staged files: cleaned like the rest
_PROC_FD = "/proc/self/fd"
# Every live plugin, so that an interpreter exiting with uploads queued still flushes them.
_LIVE: weakref.WeakSet[SnapshotCheckpointIO] = weakref.WeakSet()
# A save that waits longer than this for a snapshot slot is worth a warning.
_SLOW_WAIT_S = 0.5
# Publish jobs remembered for wait_published (the newest per local path, this many paths).
_TRACKED_PATHS = 64


@dataclass
class _Reservation:
    """A path with saves pending, and what it should hold when the next of them is placed."""

    expected: tuple[int, int] | None
    """(st_dev, st_ino) of what the path holds now or will once the save before is placed; None: absent."""
    pending: int = 0


@dataclass
class _Save:
    seq: int
    snapshot: Snapshot
    path: str
    storage_options: Any
    meta: dict[str, Any]
    written: threading.Event
    reservation: _Reservation
    given: Any
    """The path as Lightning gave it (what a configured IO is called with)."""


@dataclass
class _Remove:
    path: str
    after_seq: int
    given: Any = None


@dataclass
class _Expected:
    """A save handed to the user's AsyncCheckpointIO whose inner write has not finished."""

    seq: int
    path: str
    meta: dict[str, Any]
    written: threading.Event


@dataclass
class _WriterRun:
    """One writer thread and what it shares with the flush that ends it."""

    ops: queue.Queue[_Save | _Remove | _Barrier | None]
    publisher: Publisher
    thread: threading.Thread | None = None
    unwritten: dict[int, str] = field(default_factory=dict)
    """seq -> local path of every save accepted but not yet written and handed to the publisher."""
    abandoned: bool = False
    """A flush stopped waiting for this writer: it submits and removes nothing more."""
    streams: dict[int, PublishJob] = field(default_factory=dict)
    """seq -> the publish job of a save whose upload started with its write, until the write ends."""


class _WriteNotifier(CheckpointIO):
    """Stands in for the inner ``checkpoint_io`` of a user's ``AsyncCheckpointIO`` during a fit:
    every call goes to that inner IO unchanged; a finished save is also handed to ``owner``."""

    def __init__(self, base: CheckpointIO, owner: SnapshotCheckpointIO) -> None:
        super().__init__()
        self.base = base
        self.owner = owner

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        path = args[1] if len(args) > 1 else kwargs.get("path")
        try:
            self.base.save_checkpoint(*args, **kwargs)
        except BaseException as exc:
            self.owner._async_written(path, exc)
            raise
        self.owner._async_written(path, None)

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        return self.base.load_checkpoint(*args, **kwargs)

    def remove_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        self.base.remove_checkpoint(*args, **kwargs)

    def teardown(self) -> None:
        self.base.teardown()


class SnapshotCheckpointIO(CheckpointIO):
    """Writes checkpoints in the background from host-memory snapshots and publishes them.

    Args:
        inner: the ``CheckpointIO`` the strategy had (None: Lightning's ``TorchCheckpointIO``).
            A custom one is called on the writer thread; an ``AsyncCheckpointIO`` is composed
            with (see the module docstring).
        publisher: makes the publisher that receives every completed file (started on the
            first save, closed by :meth:`teardown`).
        session: short id of this writer; temporary names carry it.
        max_pending_snapshots: snapshots held in host memory at once. A save that finds them
            all in use waits until the oldest is on disk.
        flush_timeout: longest wait, in seconds, for uploads at the end of a fit (None: no limit).
        metadata: called on the training thread with ``(checkpoint, path)``; returns the
            manifest fields for that save.
        on_teardown: called at the very end of :meth:`teardown` (``CheckpointSync`` puts the
            strategy's own ``CheckpointIO`` back there).
    """

    def __init__(
        self,
        inner: CheckpointIO | None,
        publisher: Callable[[], Publisher],
        *,
        session: str,
        max_pending_snapshots: int = 1,
        flush_timeout: float | None = 600.0,
        metadata: Callable[[dict[str, Any], str], dict[str, Any]] | None = None,
        on_teardown: Callable[[], None] | None = None,
        zip_crc32: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(inner, SnapshotCheckpointIO):
            inner = inner.inner
        self.inner: CheckpointIO = inner or TorchCheckpointIO()
        self._async: AsyncCheckpointIO | None = self.inner if isinstance(self.inner, AsyncCheckpointIO) else None
        self._async_base: CheckpointIO | None = None  # its inner IO, while our notifier stands in for it
        self._async_expected: list[_Expected] = []
        self._deferred_removals: list[tuple[str, int]] = []  # async: (path, seq) until the saves before are written
        self._async_closed = False
        self._own_format = type(self.inner) is TorchCheckpointIO
        self.session = session
        self.max_pending_snapshots = max_pending_snapshots
        self._metadata = metadata or (lambda checkpoint, path: {})
        self.flush_timeout = flush_timeout
        self.on_teardown = on_teardown
        self.active = False
        """True while a fit runs; outside one, a save is written and published before it returns."""
        self.raise_outside_fit = True
        """Whether such a save raises UploadError when it cannot be published (else: logged)."""
        self.stream_uploads = True
        """Our own format to S3 or a local disk: the upload starts with the write and reads the
        file as it grows (``torch.save`` only appends), so the checkpoint is safe about when the
        slower of the two ends, not when both have run one after the other. False: the upload
        starts once the file is written (benchmarks compare the two)."""
        self.zip_crc32 = zip_crc32
        """Our own format: whether ``torch.save`` writes the zip CRC-32 of each record. Off by
        default: it cost about 1 CPU-second per GB on the write (2-3x the write without it), no
        ``torch.load`` since torch 2.6 checks it, and the manifest's SHA-256 of the whole file,
        checked on every download, covers the same bytes. On for readers that do check it (torch
        older than 2.6, ``unzip -t``). Torch before 2.6 always writes it."""
        self._new_publisher = publisher
        self.publisher: Publisher | None = None
        self._slots = threading.BoundedSemaphore(max_pending_snapshots)
        # Host buffers reused from one snapshot to the next (our own format only: a configured IO
        # is handed the snapshot and might keep a reference to it after its save returns).
        self.buffer_pool: BufferPool | None = BufferPool(max_pending_snapshots - 1) if self._own_format else None
        self._run: _WriterRun | None = None
        self._start_lock = threading.Lock()
        self._submit_lock = threading.Lock()  # a writer submitting vs. a flush abandoning it
        self._seq = 0
        #: Called on the training thread when a flush begins (CheckpointSync: store the buffered
        #: metrics and let the checkpoints that waited for them be published).
        self.before_flush: Callable[[], None] | None = None
        self._error: BaseException | None = None  # raised at the next save or removal
        self._error_reported = False  # the flush's publisher result already names it
        self._written: dict[str, threading.Event] = {}  # path -> its newest save's "on disk" event
        self._written_lock = threading.RLock()
        self._reserved: dict[str, _Reservation] = {}  # path -> its pending saves
        self._submitted: OrderedDict[str, PublishJob] = OrderedDict()  # path -> its newest save's publish job
        self._cleaned_dirs: set[str] = set()
        self._started_at = time.time()
        self.snapshot_wait_s = 0.0
        """Total time saves spent waiting for a free snapshot slot (back-pressure)."""
        self.last_flush: FlushResult | None = None
        """Outcome of the latest flush (end of fit, or a save outside a fit)."""
        _LIVE.add(self)

    @property
    def saves_queued(self) -> int:
        """How many saves this IO has taken (the ``seq`` of the newest one)."""
        return self._seq

    @property
    def checkpoint_io(self) -> CheckpointIO:
        """The IO that does the file format: the user's own, or the inner IO of their ``AsyncCheckpointIO``."""
        if self._async is not None:
            return self._async_base if self._async_base is not None else self._async.checkpoint_io  # type: ignore[return-value]
        return self.inner

    def _ensure_publisher(self) -> Publisher:
        with self._start_lock:
            if self.publisher is None:
                self.publisher = self._new_publisher()
                self._async_closed = False
            return self.publisher

    def _ensure_started(self) -> _WriterRun:
        with self._start_lock:
            if self.publisher is None:
                self.publisher = self._new_publisher()
            run = self._run
            if run is None or run.thread is None or not run.thread.is_alive():
                # A fresh queue per writer: one that a timed-out flush abandoned may still be
                # finishing its write, and must never take operations of a later one.
                run = _WriterRun(queue.Queue(), self.publisher)
                run.thread = threading.Thread(target=self._write_loop, args=(run,), name="trainctl-ckpt-writer", daemon=True)
                self._run = run
                run.thread.start()
            return run

    # ------------------------------------------------------- training thread
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if self._async is not None:
            self._save_async(checkpoint, path, storage_options)
            return
        if storage_options is not None and self._own_format:
            # What TorchCheckpointIO.save_checkpoint raises, word for word, and as early.
            raise TypeError(
                "`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg"
                f" is not supported for `{type(self.inner).__name__}`. Please implement your custom `CheckpointIO`"
                " to define how you'd like to use `storage_options`."
            )
        self._raise_writer_error()
        given, path = path, _local_path(path)
        run = self._ensure_started()
        started = time.perf_counter()
        if not self._slots.acquire(blocking=False):
            self._slots.acquire()
            waited = time.perf_counter() - started
            self.snapshot_wait_s += waited
            if waited > _SLOW_WAIT_S:
                log.warning(
                    "trainctl: save of %s waited %.1fs for the previous checkpoint to reach disk "
                    "(max_pending_snapshots=%d); checkpoints are coming faster than disk can take them",
                    os.path.basename(path),
                    waited,
                    self.max_pending_snapshots,
                )
        try:
            # The slot is freed only once the save before it is written or has failed, so with
            # max_pending_snapshots=1 a failed write is always raised here, at the next save.
            self._raise_writer_error()
            meta = self._metadata(checkpoint, path)
            snapshot = take_snapshot(checkpoint, self.buffer_pool)
            self._clean_folder(Path(path).parent)
            reservation = self._reserve(path)
        except BaseException:
            self._slots.release()
            raise
        self._seq += 1
        written = threading.Event()
        with self._written_lock:
            self._written[path] = written
        with self._submit_lock:
            run.unwritten[self._seq] = path
        log.debug("trainctl: writing %s (save #%d)", path, self._seq)
        run.ops.put(_Save(self._seq, snapshot, path, storage_options, meta, written, reservation, given))
        if not self.active:
            self._flush_or_raise()

    def _reserve(self, path: str) -> _Reservation:
        """Make ``path`` exist now (a placeholder if it is new; an existing file is left as it is)."""
        with self._written_lock:
            reservation = self._reserved.get(path)
            if reservation is None:
                folder = os.path.dirname(path)
                if self._own_format or isinstance(self.inner, TorchCheckpointIO):
                    os.makedirs(folder, exist_ok=True)  # as TorchCheckpointIO (and its subclasses) does first
                # Any other configured IO finds a missing folder missing, as it would without us (and
                # its first save into a new folder reserves no name until that IO has written it).
                reservation = _Reservation(_create_placeholder(path) if os.path.isdir(folder) else None)
                self._reserved[path] = reservation
            reservation.pending += 1
            return reservation

    def remove_checkpoint(self, path: Any) -> None:
        if self._async is not None:
            self._async.remove_checkpoint(path)  # synchronous, as Lightning calls it
            with self._written_lock:
                self._deferred_removals.append((_local_path(path), self._seq))
            self._run_deferred_removals()
            return
        self._raise_writer_error()
        run = self._ensure_started()
        run.ops.put(_Remove(_local_path(path), self._seq, path))
        if not self.active:
            self._flush_or_raise()

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The inner IO's ``load_checkpoint`` with exactly these arguments, once a pending write
        of that path (``args[0]`` or ``path=``) is complete."""
        path = args[0] if args else kwargs.get("path")
        if path is not None:
            try:
                local: str | None = _local_path(path)
            except ConfigError:
                local = None  # a remote checkpoint: nothing of ours is writing it
            with self._written_lock:
                pending = self._written.get(local) if local is not None else None
            if pending is not None:
                pending.wait()  # a checkpoint we are still writing: read it once it is complete
        return self.inner.load_checkpoint(*args, **kwargs)

    def teardown(self) -> None:
        """End of a fit (normal or not): write what is queued, publish it, stop the threads, and
        put the strategy's own ``CheckpointIO`` back (``on_teardown``).

        Never raises for a publishing problem, so Lightning's own teardown always completes; the
        outcome is kept in :attr:`last_flush` and logged at ERROR when anything did not make it.
        What the user's ``CheckpointIO.teardown`` raises (an ``AsyncCheckpointIO``'s failed
        write) is raised, as without us.
        """
        self.active = False
        try:
            if self._async is not None:
                self._teardown_async()
            else:
                try:
                    self.flush()
                finally:
                    self.inner.teardown()
        finally:
            if self.on_teardown is not None:
                self.on_teardown()

    def wait_published(self, path: Any, timeout: float | None = None) -> PublishJob | None:
        """Wait until the newest save of ``path`` is published (or has failed), at most ``timeout`` seconds.

        Unlike :meth:`flush`, the background threads keep running and other uploads are not
        waited for. Returns that save's publish job (``state``, ``manifest``, ``error``), or None
        when no save of ``path`` reached the publisher in time.
        """
        path = _local_path(path)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._written_lock:
            pending = self._written.get(path)
        if pending is not None:
            pending.wait(timeout)
        run = self._run
        if run is not None and run.thread is not None and run.thread.is_alive():
            reached = threading.Event()  # every save queued before this one is written and submitted
            run.ops.put(_Barrier(reached))
            reached.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._written_lock:
            job = self._submitted.get(path)
        if job is not None:
            job.done.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return job

    def flush(self, timeout: float | None = None) -> FlushResult:
        """Write and publish everything queued, waiting at most ``timeout`` (default
        ``flush_timeout``) seconds; then stop the background threads.

        Returns what this flush saw; :attr:`last_flush` accumulates every flush since
        :meth:`start_fit`, so a later, empty flush (Lightning tears down twice when a fit
        fails at its very end) cannot hide earlier failures. A save still being written when
        the wait ends is named in ``unfinished`` (and ``unwritten``), never left out.
        """
        timeout = self.flush_timeout if timeout is None else timeout
        if self.before_flush is not None:
            self.before_flush()  # releases what waits for the metrics (CheckpointSync's gate)
        if self._run is None and self.publisher is None:
            return FlushResult([], [], [])
        deadline = None if timeout is None else time.monotonic() + timeout
        write_failures: list[str] = []
        unwritten: list[str] = []
        run, self._run = self._run, None
        if run is not None:
            done = threading.Event()
            run.ops.put(_Barrier(done))
            reached = done.wait(timeout)
            run.ops.put(None)
            if reached and run.thread is not None:
                run.thread.join(timeout=5)
            with self._submit_lock:
                # From here on, a write still under way submits nothing: it could only be
                # published by a publisher that is closing, and would be reported by nobody.
                run.abandoned = True
                unwritten = [os.path.basename(path) for path in run.unwritten.values()]
                for seq in list(run.streams):  # their uploads stop; they are named as unwritten below
                    stream = run.streams.pop(seq, None)  # (the writer may be ending it now: one of us does)
                    if stream is not None:
                        run.publisher.withdraw(stream, "a flush stopped waiting for its write")
            if unwritten:
                log.error(
                    "trainctl: stopped waiting after %ss while %s was still being written to local disk; it is not published",
                    timeout,
                    ", ".join(unwritten),
                )
        if self._error is not None:
            if not self._error_reported:
                write_failures.append(f"background checkpoint operation ({self._error})")
            self._error = None
            self._error_reported = False
        result = FlushResult([], [], [])
        if self.publisher is not None:
            with self._submit_lock:
                publisher, self.publisher = self.publisher, None
                self._async_closed = True
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            result = publisher.close(left)
        result = FlushResult(
            result.published, write_failures + result.failed, result.unfinished + unwritten, result.unwritten + unwritten
        )
        self._cleaned_dirs.clear()
        self.last_flush = result if self.last_flush is None else self.last_flush.merged(result)
        if not result.ok:
            log.error("trainctl: not every checkpoint was published: %s", result.describe())
        return result

    def start_fit(self) -> None:
        """A fit begins: saves go to the background until :meth:`teardown`."""
        self.active = True
        self.last_flush = None
        if self._async is not None and self._async_base is None:
            base = self._async.checkpoint_io
            if base is None:  # what Strategy.checkpoint_io would have given it
                base = TorchCheckpointIO()
                self._async.checkpoint_io = base
            self._async_base = base
            self._async._checkpoint_io = _WriteNotifier(base, self)

    def _flush_or_raise(self) -> None:
        result = self.flush()
        if not result.ok and self.raise_outside_fit:
            raise UploadError(f"checkpoint not published: {result.describe()}", failed=result.failed + result.unfinished)

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._error_reported = False
            if isinstance(error, TrainctlError):
                raise error
            raise TrainctlError(f"writing a checkpoint in the background failed: {error}") from error

    # ------------------------------------------- a user's AsyncCheckpointIO
    def _save_async(self, checkpoint: dict[str, Any], path: Any, storage_options: Any) -> None:
        assert self._async is not None
        local = _local_path(path)
        self._ensure_publisher()
        meta = self._metadata(checkpoint, local)
        with self._written_lock:
            self._seq += 1
            expected = _Expected(self._seq, local, meta, threading.Event())
            self._written[local] = expected.written
            self._async_expected.append(expected)
        # Exactly the call Lightning's strategy makes.
        self._async.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def _async_written(self, path: Any, error: BaseException | None) -> None:
        """The inner IO of the user's AsyncCheckpointIO finished a save (its executor thread)."""
        try:
            local = _local_path(path)
        except ConfigError:
            return
        with self._written_lock:
            expected = next((e for e in self._async_expected if e.path == local), None)
            if expected is None:
                return  # a save that did not come through us
            self._async_expected.remove(expected)
        try:
            self._publish_async(expected, error)
        finally:
            expected.written.set()
            with self._written_lock:
                if self._written.get(local) is expected.written:
                    del self._written[local]
            self._run_deferred_removals()

    def _publish_async(self, expected: _Expected, error: BaseException | None) -> None:
        fd: int | None = None
        placed = (0, 0)
        if error is None:
            try:
                fd, placed = _private_copy(Path(expected.path))
            except OSError as exc:
                error = exc
        with self._submit_lock:
            publisher = None if self._async_closed else self.publisher
            if publisher is None:
                if fd is not None:
                    os.close(fd)
                log.error("trainctl: %s was written after the fit's flush; it is not published", expected.path)
                return
            if error is not None:
                failed = PublishJob(seq=expected.seq, local_path=expected.path, staged_path="", meta=expected.meta)
                failed.error = f"not written: {_describe_os_error(error)}"
                log.error("trainctl: checkpoint %s was not written: %s", expected.path, failed.error)
                publisher.write_failed(failed)
                return
            assert fd is not None
            job = _fd_job(expected.seq, expected.path, fd, expected.meta, placed)
            publisher.submit(job)
        self._track(job)

    def _run_deferred_removals(self) -> None:
        with self._written_lock:
            oldest = min((e.seq for e in self._async_expected), default=None)
            ready = [r for r in self._deferred_removals if oldest is None or r[1] < oldest]
            self._deferred_removals = [r for r in self._deferred_removals if r not in ready]
            publisher = None if self._async_closed else self.publisher
        for path, after_seq in ready:
            if publisher is not None:
                publisher.local_removed(path, after_seq)

    def _teardown_async(self) -> None:
        assert self._async is not None
        try:
            self._async.teardown()  # waits for its writes; raises what one of them raised
        finally:
            with self._written_lock:
                left, self._async_expected = self._async_expected, []
            for expected in left:  # never reached the inner IO
                expected.written.set()
            self._run_deferred_removals()
            if self._async_base is not None:
                if isinstance(self._async._checkpoint_io, _WriteNotifier):
                    self._async._checkpoint_io = self._async_base
                self._async_base = None
            self.flush()

    # --------------------------------------------------------- writer thread
    def _write_loop(self, run: _WriterRun) -> None:
        while True:
            op = run.ops.get()
            if op is None:
                return
            try:
                if isinstance(op, _Save):
                    self._write(op, run)
                elif isinstance(op, _Remove):
                    self._remove(op, run)
                else:
                    op.done.set()
            except BaseException as exc:
                log.error("trainctl: background checkpoint operation on %s failed: %s", getattr(op, "path", "?"), exc)
                self._error = exc
                self._error_reported = False

    def _write(self, op: _Save, run: _WriterRun) -> None:
        target = Path(op.path)
        fd: int | None = None
        placed = (0, 0)
        try:
            try:
                op.snapshot.wait_ready()
                if self._own_format:
                    fd = self._write_own(op, target, run)
                    if fd is not None:
                        stat = os.fstat(fd)
                        placed = (stat.st_dev, stat.st_ino)
                else:
                    # The configured IO writes, to the target path, with Lightning's arguments.
                    self.inner.save_checkpoint(op.snapshot.checkpoint, op.given, storage_options=op.storage_options)
                    fd, placed = _private_copy(target)
            finally:
                # torch.save has returned: the buffers go back to the pool for the next save
                # (without a pool, this frees the host memory).
                op.snapshot.release()
                op.snapshot = None  # type: ignore[assignment]
        except Exception as exc:
            # Nothing of this save stays behind, and the file it was to replace is untouched.
            _remove_placeholder(target, op.reservation)
            self._end_stream(op, run, None, f"not written to {target.parent}: {_describe_os_error(exc)}")
            self._write_failed(op, run, exc)
            return
        finally:
            self._slots.release()  # after a failure is recorded: the next save sees it
            op.written.set()
            with self._written_lock:
                if self._written.get(op.path) is op.written:
                    del self._written[op.path]
                op.reservation.pending -= 1
                if op.reservation.pending <= 0 and self._reserved.get(op.path) is op.reservation:
                    del self._reserved[op.path]
        with self._submit_lock:
            run.unwritten.pop(op.seq, None)
            if fd is None:
                self._end_stream(op, run, None, f"{target.name} was removed or replaced while it was written")
                return  # replaced by someone else meanwhile: see _write_own
            if run.abandoned:
                os.close(fd)
                self._end_stream(op, run, None, "a flush stopped waiting for its write")
                log.error(
                    "trainctl: %s was written to %s after the flush stopped waiting for it; it is not published",
                    target.name,
                    target.parent,
                )
                return
            stream = self._end_stream(op, run, fd, None)
            if stream is not None:
                os.close(fd)  # the job reads through its own descriptor
                job = stream
                log.debug("trainctl: %s (save #%d) is on disk; its upload is under way", op.path, op.seq)
            else:
                log.debug("trainctl: %s (save #%d) is on disk; publishing it", op.path, op.seq)
                job = _fd_job(op.seq, op.path, fd, op.meta, placed)
                run.publisher.submit(job)
        self._track(job)

    def _start_stream(self, op: _Save, run: _WriterRun, fd: int) -> Growing | None:
        """Submit the upload of the file ``fd`` is being written to, to run alongside the write
        (on S3 and local disks, with /proc); returns what the writer tells it, or None."""
        if (
            not self.stream_uploads
            or can_transfer(run.publisher.store.objects.fs) is None
            or not os.path.isdir(_PROC_FD)
            or op.snapshot.nbytes <= 0
        ):
            return None
        with self._submit_lock:
            if run.abandoned:
                return None
            stat = os.fstat(fd)
            job_fd = os.dup(fd)
            growth = Growing(job_fd, op.snapshot.nbytes)
            job = PublishJob(
                seq=op.seq,
                local_path=op.path,
                staged_path=f"{_PROC_FD}/{job_fd}",
                meta=op.meta,
                fd=job_fd,
                placed=(stat.st_dev, stat.st_ino),
                growth=growth,
            )
            run.streams[op.seq] = job
            run.publisher.submit(job)
        return growth

    def _end_stream(self, op: _Save, run: _WriterRun, fd: int | None, failed: str | None) -> PublishJob | None:
        """The write of a save whose upload started with it has ended: committed (``fd``, its
        file in place), or ``failed`` (the job is withdrawn; the writer reports the save)."""
        job = run.streams.pop(op.seq, None)
        if job is None or job.growth is None:
            return None
        if failed is not None:
            run.publisher.withdraw(job, failed)
            return None
        run.publisher.committed(job)
        return job

    def _track(self, job: PublishJob) -> None:
        with self._written_lock:
            self._submitted.pop(job.local_path, None)
            self._submitted[job.local_path] = job
            while len(self._submitted) > _TRACKED_PATHS:
                self._submitted.popitem(last=False)

    def _write_own(self, op: _Save, target: Path, run: _WriterRun) -> int | None:
        """``torch.save`` to an unnamed file, renamed over the target; returns a read fd on it
        (None: the path was removed or replaced by someone else since the save, who wins, as
        they would have after a synchronous save)."""
        unnamed = _can_link_unnamed(target.parent)
        tmp = target.with_name(f".{target.name}.{self.session}.tmp")
        folder = str(target.parent)

        def opener(path: str, flags: int) -> int:
            if unnamed:  # no name at all while it is written
                return os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o666)
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)

        named = not unnamed
        fd = -1
        try:
            # Straight to disk: Lightning's own writer would first build the whole file in a
            # BytesIO, tripling the host memory a large checkpoint needs. Through a Python file
            # so that a failed write keeps its errno (torch wraps it in a RuntimeError).
            with open(tmp, "wb", opener=opener) as out:
                fd = os.dup(out.fileno())
                growth = self._start_stream(op, run, fd)
                appended = _AppendOnly(out)
                with _ZipCrc32(self.zip_crc32) as crc:
                    torch.save(op.snapshot.checkpoint, crc.writer(appended))  # a writable file-like
                out.flush()
                if growth is not None:
                    if appended.moved:  # not seen so far: torch.save's zip writer only appends
                        self._end_stream(op, run, None, "torch.save moved in the file: it is uploaded once written")
                    else:
                        growth.end(os.fstat(out.fileno()).st_size)  # the upload's last part can go now
                os.fsync(out.fileno())
            if not named:
                tmp.unlink(missing_ok=True)
                _link_unnamed(fd, tmp)
                named = True
            if not _holds(target, op.reservation.expected):
                log.info("trainctl: %s was removed or replaced while it was being written; keeping that", target)
                tmp.unlink(missing_ok=True)
                os.close(fd)
                return None
            os.replace(tmp, target)
            named = False
            stat = os.fstat(fd)
            op.reservation.expected = (stat.st_dev, stat.st_ino)
            return fd
        except BaseException:
            if named:
                tmp.unlink(missing_ok=True)
            if fd >= 0:
                os.close(fd)
            raise

    def _write_failed(self, op: _Save, run: _WriterRun, exc: Exception) -> None:
        """Report a save that could not be written; removals queued after it will be skipped."""
        target = Path(op.path)
        cause = _describe_os_error(exc)
        line = (
            f"checkpoint {target.name} could not be written to {target.parent}: {cause}{_free_space(target.parent)}; "
            f"the checkpoints saved before it are kept, locally and in the store{_newest_here(target.parent)}; "
            f"{_what_to_do(exc, target.parent)}"
        )
        log.error("trainctl: %s", line)
        with self._submit_lock:
            run.unwritten.pop(op.seq, None)
            if not run.abandoned:
                failed = PublishJob(seq=op.seq, local_path=op.path, staged_path="", meta=op.meta)
                failed.error = (
                    f"not written to {target.parent}: {cause}; the checkpoints saved before it are kept; "
                    f"{_what_to_do(exc, target.parent)}"
                )
                run.publisher.write_failed(failed)
        error = UploadError(line, failed=[target.name])
        error.__cause__ = exc
        self._error = error
        self._error_reported = not run.abandoned

    def _remove(self, op: _Remove, run: _WriterRun) -> None:
        # Lightning's synchronous IO would have raised before removing anything after a failed
        # save: keep the file here and in the store until the fit ends or a flush reports.
        failed = [job.name for job in run.publisher.failed_saves(op.after_seq)]
        if failed or run.abandoned:
            why = (
                f"{', '.join(failed)} was not written or published"
                if failed
                else "a flush stopped waiting for the saves before it"
            )
            log.warning(
                "trainctl: keeping %s, locally and in the store, though ModelCheckpoint rotated it away: %s",
                op.path,
                why,
            )
            return
        self.inner.remove_checkpoint(op.path if op.given is None else op.given)
        with self._written_lock:
            reservation = self._reserved.get(op.path)
            if reservation is not None:  # saved again after this removal: keep the name taken
                reservation.expected = _create_placeholder(op.path)
        run.publisher.local_removed(op.path, op.after_seq)

    def _clean_folder(self, folder: Path) -> None:
        """On the first save in ``folder``: delete what an earlier, killed process left there
        (placeholders, temporary files, a legacy staging folder); none of it is ever published."""
        key = str(folder)
        if key in self._cleaned_dirs:
            return
        self._cleaned_dirs.add(key)
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return
        for entry in entries:
            try:
                stat = entry.stat(follow_symlinks=False)
                if stat.st_mtime >= self._started_at or not entry.is_file(follow_symlinks=False):
                    if entry.name == _LEGACY_STAGING and entry.is_dir(follow_symlinks=False):
                        self._clean_legacy_staging(Path(entry.path))
                    continue
                if _OUR_TMP.match(entry.name):
                    os.unlink(entry.path)
                elif stat.st_size == len(PENDING_MARKER) and Path(entry.path).read_bytes() == PENDING_MARKER:
                    os.unlink(entry.path)
                    log.info("trainctl: removed %s, the placeholder of a checkpoint an earlier run never finished", entry.path)
            except FileNotFoundError:
                pass

    def _clean_legacy_staging(self, staging: Path) -> None:
        for leftover in staging.iterdir():
            try:
                if leftover.stat().st_mtime < self._started_at:
                    leftover.unlink()
            except FileNotFoundError:
                pass
        try:
            staging.rmdir()
        except OSError:
            pass


_UNNAMED_OK: dict[int, bool] = {}  # st_dev -> whether an O_TMPFILE file can be given a name there
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000


class _ZipCrc32:
    """``torch.save`` with or without the zip CRC-32 of each record (``torch.serialization.set_crc32_options``,
    torch 2.6 and later; earlier ones always write it).

    The option is read once, when ``torch.save`` opens its zip writer, before its first write.
    Recent torch keeps it per thread; earlier releases, process-wide. So it is set, under a lock,
    only from entering until the first write through :meth:`writer` (or the exit, if nothing was
    written), then put back: where it is process-wide, another thread's ``torch.save`` is left as
    its caller configured it but for that window of pickling the checkpoint's structure
    (milliseconds).
    """

    _lock = threading.Lock()

    def __init__(self, enabled: bool) -> None:
        self._set = getattr(torch.serialization, "set_crc32_options", None)
        self._get = getattr(torch.serialization, "get_crc32_options", None)
        self._enabled = enabled
        self._before: bool | None = None

    def __enter__(self) -> _ZipCrc32:
        if self._set is not None and self._get is not None:
            self._lock.acquire()
            self._before = bool(self._get())
            self._set(self._enabled)
        return self

    def _put_back(self) -> None:
        if self._before is not None:
            assert self._set is not None
            self._set(self._before)
            self._before = None
            self._lock.release()

    def __exit__(self, *exc: object) -> None:
        self._put_back()

    def writer(self, out: Any) -> Any:
        """``out``, whose first ``write`` puts the option back first."""
        crc = self

        class _First:
            def __getattr__(self, name: str) -> Any:
                return getattr(out, name)

            def write(self, data: Any) -> int:
                crc._put_back()
                self.write = out.write  # type: ignore[method-assign]  # from now on: straight through
                return int(out.write(data))

        return _First()


class _AppendOnly:
    """What ``torch.save`` writes through: its writes go straight to the file, in order, in pieces
    of at most ``WRITE_CHUNK`` bytes. While the file is uploaded as it grows, a seek (``torch.save``
    seeks only past data it skips, under ``torch.serialization.skip_data``) is noted, and the upload
    then waits for the whole file."""

    def __init__(self, out: Any) -> None:
        self._out = out
        self.moved = False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), WRITE_CHUNK):  # a whole tensor at once: see WRITE_CHUNK
            self._out.write(view[start : start + WRITE_CHUNK])
        return len(view)

    def flush(self) -> None:
        self._out.flush()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.moved = True
        return int(self._out.seek(offset, whence))

    def tell(self) -> int:
        return int(self._out.tell())


def _link_unnamed(fd: int, name: Path) -> None:
    """Give the unnamed (``O_TMPFILE``) file open at ``fd`` the name ``name``."""
    try:
        os.link(f"{_PROC_FD}/{fd}", name, follow_symlinks=True)
        return
    except OSError as exc:
        first = exc
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.linkat(fd, b"", _AT_FDCWD, os.fsencode(name), _AT_EMPTY_PATH) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{os.strerror(code)} (and {first.strerror} through {_PROC_FD})", str(name))


def _can_link_unnamed(folder: Path) -> bool:
    """Whether files can be written unnamed in ``folder`` and named afterwards (probed once per file system)."""
    if not (hasattr(os, "O_TMPFILE") and os.path.isdir(_PROC_FD)):
        return False
    try:
        dev = os.stat(folder).st_dev
    except OSError:
        return False
    known = _UNNAMED_OK.get(dev)
    if known is not None:
        return known
    probe = folder / f".trainctl-probe.{os.getpid()}.{threading.get_ident()}"
    ok = False
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            _link_unnamed(fd, probe)
            ok = True
        except OSError as exc:
            log.debug(
                "trainctl: no unnamed files in %s (%s): the temporary name shows while a checkpoint is written", folder, exc
            )
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    _UNNAMED_OK[dev] = ok
    return ok


def _create_placeholder(path: str) -> tuple[int, int] | None:
    """Create ``path`` holding :data:`PENDING_MARKER` unless something is there; returns the
    identity of what ``path`` holds then."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except FileExistsError:
        return _identity(path)
    try:
        os.write(fd, PENDING_MARKER)
        stat = os.fstat(fd)
    finally:
        os.close(fd)
    return (stat.st_dev, stat.st_ino)


def _identity(path: str | Path) -> tuple[int, int] | None:
    try:
        stat = os.lstat(path)
    except FileNotFoundError:
        return None
    return (stat.st_dev, stat.st_ino)


def _holds(path: Path, expected: tuple[int, int] | None) -> bool:
    return _identity(path) == expected


def _remove_placeholder(target: Path, reservation: _Reservation) -> None:
    """After a failed write: remove the placeholder it reserved, if it is still there, untouched."""
    try:
        if _holds(target, reservation.expected) and target.read_bytes() == PENDING_MARKER:
            target.unlink()
            reservation.expected = None
    except OSError:
        pass


def _private_copy(path: Path) -> tuple[int, tuple[int, int]]:
    """A read fd on an unnamed copy of ``path``, beside it (the file a configured IO wrote, which
    it may later rewrite in place), and the identity of ``path``."""
    with open(path, "rb") as src, tempfile.TemporaryFile(dir=path.parent) as copy:
        stat = os.fstat(src.fileno())
        shutil.copyfileobj(src, copy, 2**22)
        copy.flush()
        return os.dup(copy.fileno()), (stat.st_dev, stat.st_ino)


def _fd_job(seq: int, path: str, fd: int, meta: dict[str, Any], placed: tuple[int, int]) -> PublishJob:
    """A publish job that uploads what ``fd`` reads (closed when the job ends)."""
    if os.path.isdir(_PROC_FD):
        return PublishJob(seq=seq, local_path=path, staged_path=f"{_PROC_FD}/{fd}", meta=meta, fd=fd, placed=placed)
    # No /proc (macOS): a private copy outside the checkpoint folder, deleted when the job ends.
    try:
        handle, copy = tempfile.mkstemp(prefix="trainctl-upload-")
        with open(handle, "wb") as out:
            os.lseek(fd, 0, os.SEEK_SET)
            while chunk := os.read(fd, 2**22):
                out.write(chunk)
    finally:
        os.close(fd)
    return PublishJob(seq=seq, local_path=path, staged_path=copy, meta=meta, placed=placed)


@dataclass
class _Barrier:
    done: threading.Event


@atexit.register
def _flush_at_exit() -> None:
    for io in list(_LIVE):
        if io.publisher is not None or io._run is not None:
            io.flush()


def _describe_os_error(exc: BaseException) -> str:
    """``No space left on device ([Errno 28])`` for the OSError behind ``exc`` (torch.save wraps
    a failed write in a RuntimeError), else the exception's type and message."""
    for error in exception_chain(exc):
        if isinstance(error, OSError) and error.errno is not None:
            return f"{error.strerror or os.strerror(error.errno)} ([Errno {error.errno}])"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


def _errno_of(exc: BaseException) -> int | None:
    for error in exception_chain(exc):
        if isinstance(error, OSError) and error.errno is not None:
            return error.errno
    return None


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f" ({free / 2**20:.0f} MiB free there)"


def _newest_here(folder: Path) -> str:
    """``; newest there: epoch=0.ckpt`` -- the newest complete checkpoint file left in ``folder``."""
    found: list[tuple[float, str]] = []
    try:
        for entry in os.scandir(folder):
            if entry.name.endswith(".ckpt") and not entry.name.startswith(".") and entry.is_file():
                found.append((entry.stat().st_mtime, entry.name))
    except OSError:  # unreadable, or a file removed while we looked: say nothing rather than guess
        return ""
    return f" (newest there: {max(found)[1]})" if found else ""


def _what_to_do(exc: BaseException, folder: Path) -> str:
    code = _errno_of(exc)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"free space in {folder} or give ModelCheckpoint a dirpath on a larger disk, then resume"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make {folder} writable or give ModelCheckpoint a writable dirpath, then resume"
    return f"check the disk that holds {folder} (dmesg) or give ModelCheckpoint a dirpath on another disk, then resume"


def _local_path(path: Any) -> str:
    text = os.fspath(path)
    if "://" in text and not text.startswith("file://"):
        raise ConfigError(
            f"CheckpointSync uploads checkpoints that Lightning writes to local disk, but this one goes to "
            f"{text!r}; give ModelCheckpoint a local dirpath and CheckpointSync the remote URL"
        )
    return os.path.abspath(text.removeprefix("file://"))
