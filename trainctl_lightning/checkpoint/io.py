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

The staging file is a second name for the same inode, so a later save over ``last.ckpt`` or a
top-k rotation that deletes the visible file cannot change or remove what is being uploaded.

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import atexit
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
from dataclasses import dataclass
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
        self._ops: queue.Queue[_Save | _Remove | _Barrier | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._seq = 0
        self._error: BaseException | None = None
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

    def _ensure_started(self) -> Publisher:
        with self._start_lock:
            if self.publisher is None:
                self.publisher = self._new_publisher()
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write_loop, name="trainctl-ckpt-writer", daemon=True)
                self._writer.start()
            return self.publisher

    # ------------------------------------------------------- training thread
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self._raise_writer_error()
        path = _local_path(path)
        self._ensure_started()
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
            meta = self._metadata(checkpoint, path)
            snapshot = take_snapshot(checkpoint)
        except BaseException:
            self._slots.release()
            raise
        self._seq += 1
        written = threading.Event()
        with self._written_lock:
            self._written[path] = written
        self._ops.put(_Save(self._seq, snapshot, path, storage_options, meta, written))
        if not self.active:
            self._flush_or_raise()

    def remove_checkpoint(self, path: Any) -> None:
        self._raise_writer_error()
        self._ensure_started()
        self._ops.put(_Remove(_local_path(path), self._seq))
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
        writer = self._writer
        if writer is not None and writer.is_alive():
            reached = threading.Event()  # every save queued before this one is written and submitted
            self._ops.put(_Barrier(reached))
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
        fails at its very end) cannot hide earlier failures.
        """
        timeout = self.flush_timeout if timeout is None else timeout
        if self._writer is None and self.publisher is None:
            return FlushResult([], [], [])
        write_failures: list[str] = []
        if self._writer is not None:
            done = threading.Event()
            self._ops.put(_Barrier(done))
            done.wait(timeout)
            self._ops.put(None)
            self._writer.join(timeout=5)
            self._writer = None
            if self._error is not None:
                write_failures.append(f"local write ({self._error})")
                self._error = None
        result = FlushResult([], [], [])
        if self.publisher is not None:
            publisher, self.publisher = self.publisher, None
            result = publisher.close(timeout)
        result = FlushResult(result.published, write_failures + result.failed, result.unfinished)
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
            raise TrainctlError(f"writing a checkpoint in the background failed: {error}") from error

    # --------------------------------------------------------- writer thread
    def _write_loop(self) -> None:
        while True:
            op = self._ops.get()
            if op is None:
                return
            try:
                if isinstance(op, _Save):
                    self._write(op)
                elif isinstance(op, _Remove):
                    self._remove(op)
                else:
                    op.done.set()
            except BaseException as exc:
                log.error("trainctl: background checkpoint operation on %s failed: %s", getattr(op, "path", "?"), exc)
                self._error = exc

    def _write(self, op: _Save) -> None:
        target = Path(op.path)
        try:
            staged = self._write_staged(op, target)
            # A second name for the staged inode, renamed over the target: readers of the target
            # path see the old file or the new one, never a partial one.
            tmp = target.with_name(f".{target.name}.{self.session}.tmp")
            try:
                os.link(staged, tmp)
            except OSError:  # no hard links here (some network filesystems): a copy will do
                shutil.copyfile(staged, tmp)
            os.replace(tmp, target)
        finally:
            op.written.set()
            with self._written_lock:
                if self._written.get(op.path) is op.written:
                    del self._written[op.path]
        assert self.publisher is not None
        job = PublishJob(seq=op.seq, local_path=op.path, staged_path=str(staged), meta=op.meta)
        self.publisher.submit(job)
        with self._written_lock:
            self._submitted.pop(op.path, None)
            self._submitted[op.path] = job
            while len(self._submitted) > _TRACKED_PATHS:
                self._submitted.popitem(last=False)

    def _write_staged(self, op: _Save, target: Path) -> Path:
        """Write the snapshot to a private staging file; free its memory and slot either way."""
        staging_dir = target.parent / STAGING_DIR
        partial: Path | None = None
        try:
            self._clean_staging(staging_dir)
            staged = staging_dir / staged_name(self.session, op.seq, target.name)
            partial = staged.with_name(staged.name + ".partial")
            op.snapshot.wait_ready()
            if type(self.inner) is TorchCheckpointIO:
                # Straight to disk: Lightning's own writer would first build the whole file in a
                # BytesIO, tripling the host memory a large checkpoint needs.
                torch.save(op.snapshot.checkpoint, partial)
            else:
                self.inner.save_checkpoint(op.snapshot.checkpoint, partial, storage_options=op.storage_options)
            os.replace(partial, staged)
            partial = None
            return staged
        finally:
            op.snapshot = None  # type: ignore[assignment]  # free host memory before the slot
            self._slots.release()
            if partial is not None:
                partial.unlink(missing_ok=True)

    def _remove(self, op: _Remove) -> None:
        self.inner.remove_checkpoint(op.path)
        assert self.publisher is not None
        self.publisher.local_removed(op.path, op.after_seq)

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
        if io.publisher is not None or io._writer is not None:
            io.flush()


def _local_path(path: Any) -> str:
    text = os.fspath(path)
    if "://" in text and not text.startswith("file://"):
        raise ConfigError(
            f"CheckpointSync uploads checkpoints that Lightning writes to local disk, but this one goes to "
            f"{text!r}; give ModelCheckpoint a local dirpath and CheckpointSync the remote URL"
        )
    return os.path.abspath(text.removeprefix("file://"))
