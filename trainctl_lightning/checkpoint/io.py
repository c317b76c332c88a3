"""A Lightning ``CheckpointIO`` plugin that takes checkpoint writes off the training loop.

``CheckpointSync`` installs it around whatever ``CheckpointIO`` the strategy had. Every save
and every removal that Lightning's ``ModelCheckpoint`` makes comes through here:

``save_checkpoint`` (training thread)
    waits for a free snapshot slot (``max_pending_snapshots`` bounds host memory), copies the
    checkpoint's tensors to host memory (:mod:`.snapshot`), queues the write, and returns.
writer thread (one, so saves and removals keep their order)
    writes the snapshot to a private staging file, frees the slot, hard-links the staging file
    to a temporary name beside the target and renames it over the target (readers of the
    target path never see a half-written file), then hands the staging file to the publisher.
``remove_checkpoint``
    queued behind the saves before it; the publisher decides when the remote copy may go.

A fault never costs the newest complete checkpoint. A save whose write fails (full disk, I/O
error, permission denied) leaves nothing behind, and every removal queued after it is skipped,
locally and in the store, as Lightning's synchronous IO would never have reached it; the
failure is logged at once as one line and raised at the next save or removal (or by
``CheckpointSync`` at the end of the fit). A removal that comes after a save whose upload is
known to have failed is skipped the same way. A flush that stops waiting while a save is still
being written names it as unfinished; the abandoned write, if it completes, leaves the file in
its folder and removes its staging copy.

The staging file is a second name for the same inode, so a later save over ``last.ckpt`` or a
top-k rotation that deletes the visible file cannot change or remove what is being uploaded.

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

from trainctl_lightning.checkpoint.publisher import (
    FlushResult,
    Publisher,
    PublishJob,
    staged_name,
)
from trainctl_lightning.checkpoint.snapshot import Snapshot, take_snapshot
from trainctl_lightning.errors import ConfigError, TrainctlError, UploadError
from trainctl_lightning.retry import exception_chain

__all__ = ["STAGING_DIR", "SnapshotCheckpointIO"]

log = logging.getLogger(__name__)

STAGING_DIR = ".trainctl-staging"
_OUR_TMP = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")
# Every live plugin, so that an interpreter exiting with uploads queued still flushes them.
_LIVE: weakref.WeakSet[SnapshotCheckpointIO] = weakref.WeakSet()
# A save that waits longer than this for a snapshot slot is worth a warning.
_SLOW_WAIT_S = 0.5
# Publish jobs remembered for wait_published (the newest per local path, this many paths).
_TRACKED_PATHS = 64


@dataclass
class _Save:
    seq: int
    snapshot: Snapshot
    path: str
    storage_options: Any
    meta: dict[str, Any]
    written: threading.Event


@dataclass
class _Remove:
    path: str
    after_seq: int


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


class SnapshotCheckpointIO(CheckpointIO):
    """Writes checkpoints in the background from host-memory snapshots and publishes them.

    Args:
        inner: the ``CheckpointIO`` that knows the file format (Lightning's default writes
            ``torch.save`` files); it is called on the writer thread.
        publisher: makes the publisher that receives every completed file (started on the
            first save, closed by :meth:`teardown`).
        session: short id of this writer; staging files carry it.
        max_pending_snapshots: snapshots held in host memory at once. A save that finds them
            all in use waits until the oldest is on disk.
        flush_timeout: longest wait, in seconds, for uploads at the end of a fit (None: no limit).
        metadata: called on the training thread with ``(checkpoint, path)``; returns the
            manifest fields for that save.
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
    ) -> None:
        super().__init__()
        if isinstance(inner, SnapshotCheckpointIO):
            inner = inner.inner
        if isinstance(inner, AsyncCheckpointIO):  # we already write in the background
            inner = inner.checkpoint_io
        self.inner: CheckpointIO = inner or TorchCheckpointIO()
        self.session = session
        self.max_pending_snapshots = max_pending_snapshots
        self._metadata = metadata or (lambda checkpoint, path: {})
        self.flush_timeout = flush_timeout
        self.active = False
        """True while a fit runs; outside one, a save is written and published before it returns."""
        self.raise_outside_fit = True
        """Whether such a save raises UploadError when it cannot be published (else: logged)."""
        self._new_publisher = publisher
        self.publisher: Publisher | None = None
        self._slots = threading.BoundedSemaphore(max_pending_snapshots)
        self._run: _WriterRun | None = None
        self._start_lock = threading.Lock()
        self._submit_lock = threading.Lock()  # a writer submitting vs. a flush abandoning it
        self._seq = 0
        self._error: BaseException | None = None  # raised at the next save or removal
        self._error_reported = False  # the flush's publisher result already names it
        self._written: dict[str, threading.Event] = {}  # path -> its newest save's "on disk" event
        self._written_lock = threading.Lock()
        self._submitted: OrderedDict[str, PublishJob] = OrderedDict()  # path -> its newest save's publish job
        self._cleaned_dirs: set[str] = set()
        self._started_at = time.time()
        self.snapshot_wait_s = 0.0
        """Total time saves spent waiting for a free snapshot slot (back-pressure)."""
        self.last_flush: FlushResult | None = None
        """Outcome of the latest flush (end of fit, or a save outside a fit)."""
        _LIVE.add(self)

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
        self._raise_writer_error()
        path = _local_path(path)
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
            snapshot = take_snapshot(checkpoint)
        except BaseException:
            self._slots.release()
            raise
        self._seq += 1
        written = threading.Event()
        with self._written_lock:
            self._written[path] = written
        with self._submit_lock:
            run.unwritten[self._seq] = path
        run.ops.put(_Save(self._seq, snapshot, path, storage_options, meta, written))
        if not self.active:
            self._flush_or_raise()

    def remove_checkpoint(self, path: Any) -> None:
        self._raise_writer_error()
        run = self._ensure_started()
        run.ops.put(_Remove(_local_path(path), self._seq))
        if not self.active:
            self._flush_or_raise()

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        with self._written_lock:
            pending = self._written.get(_local_path(path))
        if pending is not None:
            pending.wait()  # a checkpoint we are still writing: read it once it is complete
        kwargs = {} if weights_only is None else {"weights_only": weights_only}
        return self.inner.load_checkpoint(path, map_location=map_location, **kwargs)

    def teardown(self) -> None:
        """End of a fit (normal or not): write what is queued, publish it, stop the threads.

        Never raises, so Lightning's own teardown always completes; the outcome is kept in
        :attr:`last_flush` and logged at ERROR when anything did not make it.
        """
        self.active = False
        self.flush()
        self.inner.teardown()

    def wait_published(self, path: Any, timeout: float | None = None) -> PublishJob | None:
        """Wait until the newest save of ``path`` is published (or has failed), at most ``timeout`` seconds.

        Unlike :meth:`flush`, the background threads keep running and other uploads are not
        waited for. Returns that save's publish job (``state``, ``manifest``, ``error``), or None
        when no save of ``path`` reached the publisher in time.
        """
        path = _local_path(path)
        deadline = None if timeout is None else time.monotonic() + timeout
        run = self._run
        if run is not None and run.thread is not None and run.thread.is_alive():
            reached = threading.Event()  # every save queued before this one is written and submitted
            run.ops.put(_Barrier(reached))
            reached.wait(timeout)
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
            publisher, self.publisher = self.publisher, None
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            result = publisher.close(left)
        result = FlushResult(
            result.published, write_failures + result.failed, result.unfinished + unwritten, result.unwritten + unwritten
        )
        for folder in self._cleaned_dirs:
            try:
                os.rmdir(folder)  # only when empty: a failed upload's files stay
            except OSError:
                pass
        self._cleaned_dirs.clear()
        self.last_flush = result if self.last_flush is None else self.last_flush.merged(result)
        if not result.ok:
            log.error("trainctl: not every checkpoint was published: %s", result.describe())
        return result

    def start_fit(self) -> None:
        """A fit begins: saves go to the background until :meth:`teardown`."""
        self.active = True
        self.last_flush = None

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
        staged: Path | None = None
        tmp = target.with_name(f".{target.name}.{self.session}.tmp")
        try:
            try:
                staged = self._write_staged(op, target)
            finally:
                op.snapshot = None  # type: ignore[assignment]  # free host memory
            # A second name for the staged inode, renamed over the target: readers of the target
            # path see the old file or the new one, never a partial one.
            try:
                os.link(staged, tmp)
            except OSError:  # no hard links here (some network filesystems): a copy will do
                shutil.copyfile(staged, tmp)
            os.replace(tmp, target)
        except Exception as exc:
            # Nothing of this save stays behind, and the file it was to replace is untouched.
            for leftover in (tmp, staged):
                if leftover is not None:
                    leftover.unlink(missing_ok=True)
            self._write_failed(op, run, exc)
            return
        finally:
            self._slots.release()  # after a failure is recorded: the next save sees it
            op.written.set()
            with self._written_lock:
                if self._written.get(op.path) is op.written:
                    del self._written[op.path]
        job = PublishJob(seq=op.seq, local_path=op.path, staged_path=str(staged), meta=op.meta)
        with self._submit_lock:
            run.unwritten.pop(op.seq, None)
            if run.abandoned:
                staged.unlink(missing_ok=True)
                log.error(
                    "trainctl: %s was written to %s after the flush stopped waiting for it; it is not published",
                    target.name,
                    target.parent,
                )
                return
            run.publisher.submit(job)
        with self._written_lock:
            self._submitted.pop(op.path, None)
            self._submitted[op.path] = job
            while len(self._submitted) > _TRACKED_PATHS:
                self._submitted.popitem(last=False)

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

    def _write_staged(self, op: _Save, target: Path) -> Path:
        """Write the snapshot to a private staging file (a partial one is removed)."""
        staging_dir = target.parent / STAGING_DIR
        partial: Path | None = None
        try:
            self._clean_staging(staging_dir)
            staged = staging_dir / staged_name(self.session, op.seq, target.name)
            partial = staged.with_name(staged.name + ".partial")
            op.snapshot.wait_ready()
            if type(self.inner) is TorchCheckpointIO:
                # Straight to disk: Lightning's own writer would first build the whole file in a
                # BytesIO, tripling the host memory a large checkpoint needs. Through a Python
                # file so that a failed write keeps its errno (torch wraps it in a RuntimeError).
                with open(partial, "wb") as out:
                    torch.save(op.snapshot.checkpoint, out)
            else:
                self.inner.save_checkpoint(op.snapshot.checkpoint, partial, storage_options=op.storage_options)
            os.replace(partial, staged)
            partial = None
            return staged
        finally:
            if partial is not None:
                partial.unlink(missing_ok=True)

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
        self.inner.remove_checkpoint(op.path)
        run.publisher.local_removed(op.path, op.after_seq)

    def _clean_staging(self, staging_dir: Path) -> None:
        """Make the staging folder; delete what an earlier, killed process left there.

        Those files may be half-written and are never published.
        """
        key = str(staging_dir)
        if key in self._cleaned_dirs:
            return
        staging_dir.mkdir(parents=True, exist_ok=True)
        for leftover in staging_dir.iterdir():
            if leftover.name.startswith(self.session):
                continue
            try:
                if leftover.stat().st_mtime < self._started_at:
                    leftover.unlink()
                    log.info("trainctl: removed leftover staging file %s from an earlier run", leftover)
            except FileNotFoundError:
                pass
        for leftover in staging_dir.parent.glob(".*.tmp"):
            if not _OUR_TMP.match(leftover.name):
                continue
            try:
                if leftover.stat().st_mtime < self._started_at:
                    leftover.unlink()
            except FileNotFoundError:
                pass
        self._cleaned_dirs.add(key)


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
