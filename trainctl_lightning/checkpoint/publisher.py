"""Background publishing of checkpoint files to the run store.

The publisher owns a few worker threads. Each job is one checkpoint file that is already
complete on local disk, read through a private handle that nothing else writes, deletes or
replaces (a file descriptor on the written inode, uploaded as ``/proc/self/fd/N``, or a private
copy), and is published with :meth:`RunStore.publish_checkpoint`: data first, manifest
last. Around that it keeps the remote side a mirror of what ``ModelCheckpoint`` keeps locally:

* a file that is saved again under the same local path (``last.ckpt``) supersedes its earlier
  version: a queued older version is skipped, a published one is deleted once the new one is
  published;
* a file that ``ModelCheckpoint`` rotates away (top-k) is skipped if its upload has not
  started, and deleted remotely only after every checkpoint saved before the rotation was
  published (so the store never holds fewer good checkpoints than before);
* ``keep_last`` trims the store to the newest N complete checkpoints, never while a newer
  save has failed (to be written or to be published).

A save that could not be written to local disk is recorded here as a failed job
(:meth:`Publisher.write_failed`), so that nothing saved before it is deleted from the store
either. Failures never stop training: a transient one is retried in the background, a permanent one
is logged at ERROR at once and reported again, with every name, when the run flushes.

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from fsspec.callbacks import Callback

from trainctl_lightning.checkpoint.uploader import UploaderProcess
from trainctl_lightning.checkpoint.uploader import supported as uploader_supported
from trainctl_lightning.errors import TrainctlError
from trainctl_lightning.store import RunStore, layout
from trainctl_lightning.store.manifest import CheckpointManifest
from trainctl_lightning.store.transfer import Growing, can_transfer

__all__ = ["FlushResult", "PublishJob", "PublishState", "Publisher", "delete_remote", "keep_newest"]

log = logging.getLogger(__name__)

_WITHDRAWN_GRACE_S = 10.0
"""How long a flush waits, past its deadline if need be, for a withdrawn upload to abort (remove
its parts) before the uploader process is ended."""


class PublishState(str, Enum):
    QUEUED = "queued"
    UPLOADING = "uploading"
    PUBLISHED = "published"
    SKIPPED = "skipped"  # superseded or rotated away before its upload started
    FAILED = "failed"

    def is_terminal(self) -> bool:
        return self in (PublishState.PUBLISHED, PublishState.SKIPPED, PublishState.FAILED)


@dataclass
class PublishJob:
    """One checkpoint file waiting to be published."""

    seq: int
    """Order in which the save happened (monotonic per publisher)."""
    local_path: str
    """Where ModelCheckpoint sees the file (may be replaced or removed while we upload)."""
    staged_path: str
    """What the upload reads: ``/proc/self/fd/<fd>`` (with ``fd``), else a private file that is
    deleted once the job ends. Nothing else writes it."""
    meta: dict[str, Any]
    """Manifest fields: epoch, global_step, created_at, monitor, monitor_value, metrics."""
    size: int = 0
    uploaded: int = 0
    state: PublishState = PublishState.QUEUED
    error: str | None = None
    manifest: CheckpointManifest | None = None
    done: threading.Event = field(default_factory=threading.Event)
    fd: int | None = None
    """Open read descriptor on the content (closed once the job ends), or None."""
    placed: tuple[int, int] | None = None
    """(st_dev, st_ino) of the file at ``local_path`` that this content was (None: that of ``staged_path``)."""
    growth: Growing | None = None
    """Set while the file is still being written: it is uploaded as it grows (``size`` is an
    estimate until the write ends), and published only once the write succeeds."""
    withdrawn: bool = False
    """The save's write did not succeed after the job was submitted: the writer reports it, not the publisher."""

    @property
    def name(self) -> str:
        return os.path.basename(self.local_path)


class _Progress(Callback):
    def __init__(self, job: PublishJob) -> None:
        super().__init__()
        self.job = job

    def relative_update(self, inc: int = 1) -> None:
        self.job.uploaded += inc

    def call(self, *args: Any, **kwargs: Any) -> None:  # absolute updates from some backends
        self.job.uploaded = max(self.job.uploaded, int(self.value or 0))


@dataclass(frozen=True)
class FlushResult:
    """What a flush left behind: empty lists mean everything saved was published."""

    published: list[str]
    failed: list[str]
    """``"<name> (<why>)"`` of every save that was not written or not published."""
    unfinished: list[str]
    """Names of saves that were not published yet when the wait ended (``unwritten`` included)."""
    unwritten: list[str] = field(default_factory=list)
    """The part of ``unfinished`` that was still being written to local disk."""

    @property
    def ok(self) -> bool:
        return not self.failed and not self.unfinished

    def merged(self, other: FlushResult) -> FlushResult:
        return FlushResult(
            self.published + other.published,
            self.failed + other.failed,
            self.unfinished + other.unfinished,
            self.unwritten + other.unwritten,
        )

    def describe(self) -> str:
        parts = []
        if self.failed:
            parts.append(f"failed: {', '.join(self.failed)}")
        uploading = [name for name in self.unfinished if name not in self.unwritten]
        if uploading:
            parts.append(f"still uploading when the wait ended: {', '.join(uploading)}")
        if self.unwritten:
            parts.append(
                f"still being written to local disk when the wait ended, never published: {', '.join(self.unwritten)} "
                f"(the file appears in its folder if the write completes; until then its name holds a "
                "placeholder, which the next run removes)"
            )
        return "; ".join(parts)


class Publisher:
    """Publishes complete checkpoint files in the background.

    Args:
        store: where to publish.
        workers: checkpoints uploaded at once (each also uses the store's multipart concurrency).
        mirror_deletes: delete remote copies of checkpoints ModelCheckpoint rotates away or
            saves over, once their replacements are published.
        keep_last: keep at most this many newest complete checkpoints in the store.
        keep_local: keep local files after they are published; when False a local file is
            deleted once published, unless a newer save replaced it meanwhile.
        session: short id of this writer, recorded in manifests.
        existing: checkpoints already in the store when the run started (earlier attempts);
            publishing a name one of them has is logged, never an overwrite.
        on_published: called (on a worker thread) with each manifest once it is published.
        gate: called (on a worker thread) with each job once its data is up, just before its
            manifest is written; it may block (CheckpointSync holds a checkpoint there until the
            metrics of the steps it covers are in the store).
        upload_process: on S3, run the uploads in an uploader process
            (:mod:`trainctl_lightning.checkpoint.uploader`) instead of on threads of this process;
            it starts with this publisher (a run's first save) and ends with :meth:`close`.
            Ignored elsewhere.
    """

    def __init__(
        self,
        store: RunStore,
        *,
        workers: int = 2,
        mirror_deletes: bool = True,
        keep_last: int | None = None,
        keep_local: bool = True,
        session: str = "",
        existing: list[CheckpointManifest] | None = None,
        on_published: Callable[[CheckpointManifest], None] | None = None,
        gate: Callable[[PublishJob], None] | None = None,
        upload_process: bool = False,
    ) -> None:
        self.store = store
        self.uploader: UploaderProcess | None = None
        if upload_process and can_transfer(store.objects.fs) == "s3" and uploader_supported():
            self.uploader = UploaderProcess()
            store.objects.uploader = self.uploader
            self.uploader.start(store.objects.uploader_spec())  # ready by the time the first part is written
        self._gate = gate
        self.mirror_deletes = mirror_deletes
        self.keep_last = keep_last
        self.keep_local = keep_local
        self.session = session
        self._lock = threading.RLock()
        self._queue: queue.Queue[PublishJob | None] = queue.Queue()
        self._jobs: list[PublishJob] = []
        self._withdrawn: list[PublishJob] = []  # see withdraw: waited for, never reported
        # local path -> (seq, manifest) of the newest version this session published
        self._published: dict[str, tuple[int, CheckpointManifest]] = {}
        self._pending_removals: list[tuple[str, int]] = []  # (local path, last seq saved before it)
        self._earlier = {m.name: m for m in existing or []}
        self._on_published = on_published
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._worker, name=f"trainctl-publish-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    # ----------------------------------------------------------- producer side
    def submit(self, job: PublishJob) -> None:
        """Publish ``job`` in the background; with ``job.growth``, while its file is still being written."""
        with self._lock:
            if job.growth is not None:
                job.size = job.growth.expected  # it supersedes older saves once written: see committed
            else:
                job.size = os.fstat(job.fd).st_size if job.fd is not None else os.path.getsize(job.staged_path)
                self._supersede(job)
            self._jobs.append(job)
        self._queue.put(job)

    def committed(self, job: PublishJob) -> None:
        """The write of ``job`` (submitted with ``growth``) has succeeded: it may be published, and
        it supersedes the queued older saves of its path (not before: until then the older one is
        the newest complete checkpoint of that path)."""
        with self._lock:
            self._supersede(job)
        if job.growth is not None:
            job.growth.commit()

    def _supersede(self, job: PublishJob) -> None:
        for other in self._jobs:
            if other.local_path == job.local_path and other.seq < job.seq and other.state is PublishState.QUEUED:
                other.state = PublishState.SKIPPED
                other.error = f"superseded by a newer save of {job.name}"

    def local_removed(self, local_path: str, after_seq: int) -> None:
        """ModelCheckpoint removed ``local_path``; mirror that once it is safe."""
        with self._lock:
            for job in self._jobs:
                if job.local_path == local_path and job.state is PublishState.QUEUED:
                    job.state = PublishState.SKIPPED
                    job.error = "rotated away by ModelCheckpoint before its upload started"
            if self.mirror_deletes:
                self._pending_removals.append((local_path, after_seq))
        self._run_removals()

    def withdraw(self, job: PublishJob, why: str) -> None:
        """A job submitted while its file was being written (``job.growth``) whose write did not
        succeed: it is dropped from what this publisher reports and decides on (the writer reports
        the save), and its upload stops and removes what it sent."""
        with self._lock:
            job.withdrawn = True
            if job in self._jobs:
                self._jobs.remove(job)
            self._withdrawn.append(job)  # a flush still waits for its upload to stop
        if job.growth is not None:
            job.growth.fail(why)
        self._run_removals()

    def write_failed(self, job: PublishJob) -> None:
        """A save that could not be written to local disk: recorded as failed, so that nothing
        saved before it is deleted remotely (rotation or ``keep_last``) and the flush names it."""
        with self._lock:
            job.state = PublishState.FAILED
            job.done.set()
            self._jobs.append(job)
        self._run_removals()

    def failed_saves(self, up_to_seq: int) -> list[PublishJob]:
        """Saves made at or before ``up_to_seq`` whose write or publish is known to have failed,
        and that no save published after them (up to ``up_to_seq``) has made up for."""
        with self._lock:
            jobs = [j for j in self._jobs if j.seq <= up_to_seq]
            recovered_at = max((j.seq for j in jobs if j.state is PublishState.PUBLISHED), default=0)
            return [j for j in jobs if j.state is PublishState.FAILED and j.seq > recovered_at]

    # ---------------------------------------------------------------- workers
    def _worker(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._process(job)
            except BaseException as exc:  # a bug here must not silently kill the worker
                log.exception("trainctl publisher: unexpected error on %s", job.name)
                self._finish(job, PublishState.FAILED, f"{type(exc).__name__}: {exc}")

    def _process(self, job: PublishJob) -> None:
        with self._lock:
            skipped = job.state is PublishState.SKIPPED
            if not skipped:
                job.state = PublishState.UPLOADING
        if skipped:
            self._finish(job, PublishState.SKIPPED, job.error)
            return
        if job.withdrawn:  # its write failed before its upload began
            self._finish(job, PublishState.FAILED, "withdrawn: its write did not succeed")
            return
        meta = job.meta
        try:
            manifest = self.store.publish_checkpoint(
                [(job.staged_path, job.name)],
                name=job.name,
                epoch=meta.get("epoch"),
                global_step=meta.get("global_step"),
                created_at=meta.get("created_at"),
                monitor=meta.get("monitor"),
                monitor_value=meta.get("monitor_value"),
                metrics=meta.get("metrics"),
                source={"local_path": job.local_path, "session": self.session},
                callback=_Progress(job),
                stop=self._stop,
                verify_unchanged=False,  # staged files are private: nothing else can write them
                before_manifest=None if self._gate is None else functools.partial(self._gate, job),
                growth=job.growth,
            )
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if job.withdrawn:  # its write failed or was given up: the writer has reported that
                log.debug("trainctl: the upload of %s stopped with its write: %s", job.name, reason)
                self._finish(job, PublishState.FAILED, reason)
                return
            log.error("trainctl: could not publish checkpoint %s to %s: %s", job.name, self.store.url, reason)
            self._finish(job, PublishState.FAILED, reason)
            return
        job.manifest = manifest
        job.size = manifest.files[0].size if manifest.files else job.size
        log.info("trainctl: published %s as %s", job.name, self.store.url_of(layout.checkpoint_object(manifest.id)))
        if self._on_published is not None:
            self._on_published(manifest)
        earlier = self._earlier.pop(job.name, None)
        if earlier is not None:
            log.info(
                "trainctl: %s also exists in the store from an earlier attempt (%s, step %s); both are kept, "
                "and %s is now the newest with that name",
                job.name,
                earlier.id,
                earlier.global_step,
                manifest.id,
            )
        # Uploads finish out of order: only the newest save of a local path stays remote.
        with self._lock:
            current = self._published.get(job.local_path)
            if current is None or current[0] < job.seq:
                self._published[job.local_path] = (job.seq, manifest)
                stale = current[1] if current else None
            else:
                stale = manifest
        if self.mirror_deletes and stale is not None:
            self._delete(stale, why=f"{job.name} was saved again")
        if not self.keep_local:
            self._drop_local(job)
        self._finish(job, PublishState.PUBLISHED, None)
        self._apply_retention(job)

    def _finish(self, job: PublishJob, state: PublishState, error: str | None) -> None:
        with self._lock:
            fd, job.fd = job.fd, None
        if fd is not None:
            os.close(fd)
        elif job.staged_path:
            try:
                os.unlink(job.staged_path)
            except FileNotFoundError:
                pass
        log.debug("trainctl: save #%d %s: %s", job.seq, job.name, state.value)
        with self._lock:
            job.state = state
            job.error = error
            job.done.set()
        self._run_removals()

    def _drop_local(self, job: PublishJob) -> None:
        with self._lock:
            newer = any(j.local_path == job.local_path and j.seq > job.seq for j in self._jobs)
        try:
            if job.placed is not None:
                mine = job.placed
            else:
                stat = os.fstat(job.fd) if job.fd is not None else os.stat(job.staged_path)
                mine = (stat.st_dev, stat.st_ino)
            local = os.stat(job.local_path)
        except FileNotFoundError:
            return
        if not newer and (local.st_dev, local.st_ino) == mine:  # not replaced by a newer save meanwhile
            os.unlink(job.local_path)

    def _run_removals(self) -> None:
        to_delete: list[tuple[str, CheckpointManifest]] = []
        with self._lock:
            keep: list[tuple[str, int]] = []
            for path, after_seq in self._pending_removals:
                before = [j for j in self._jobs if j.seq <= after_seq and j.local_path != path]
                own = [j for j in self._jobs if j.local_path == path]
                if not all(j.state.is_terminal() for j in before + own):
                    keep.append((path, after_seq))
                    continue
                failed = [j.name for j in self.failed_saves(after_seq) if j.local_path != path]
                if failed:
                    log.warning(
                        "trainctl: keeping the remote copy of %s, which ModelCheckpoint rotated away, "
                        "because %s, saved before that, was not published",
                        os.path.basename(path),
                        ", ".join(failed),
                    )
                    continue
                published = self._published.pop(path, None)
                if published is not None:
                    to_delete.append((path, published[1]))
            self._pending_removals = keep
        for path, manifest in to_delete:
            self._delete(manifest, why=f"ModelCheckpoint removed {os.path.basename(path)}")

    def _apply_retention(self, published: PublishJob) -> None:
        if not self.keep_last:
            return
        with self._lock:
            newer_failed = [j.name for j in self._jobs if j.state is PublishState.FAILED and j.seq > published.seq]
        if newer_failed:
            log.warning(
                "trainctl: keep_last=%d: deleting nothing from %s while %s, saved after %s, is not published",
                self.keep_last,
                self.store.url,
                ", ".join(newer_failed),
                published.name,
            )
            return
        keep_newest(self.store, self.keep_last)

    def _delete(self, manifest: CheckpointManifest, why: str) -> None:
        delete_remote(self.store, manifest, why)

    # ------------------------------------------------------------------ flush
    def pending(self) -> list[PublishJob]:
        with self._lock:
            return [j for j in self._jobs if not j.state.is_terminal()]

    def wait(self, timeout: float | None = None, progress: bool = True) -> FlushResult:
        """Wait for every submitted job to end, for at most ``timeout`` seconds.

        When time runs out, retries in progress are abandoned and the unfinished jobs are
        reported. The jobs' outcomes are reported once: a later wait only covers newer jobs.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = self.pending()
        if pending and progress:
            _show_progress(self, pending, deadline, self.store.url)
        for job in pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            job.done.wait(left)
        with self._lock:
            stopping = list(self._withdrawn)
        for job in stopping:  # uploads that stop and remove what they sent: a moment, past the deadline too
            left = None if deadline is None else max(_WITHDRAWN_GRACE_S, deadline - time.monotonic())
            job.done.wait(left)
        with self._lock:
            self._withdrawn = [j for j in self._withdrawn if not j.done.is_set()]
        with self._lock:
            jobs, self._jobs = self._jobs, [j for j in self._jobs if not j.state.is_terminal()]
        self._run_removals()
        return FlushResult(
            published=[j.name for j in jobs if j.state is PublishState.PUBLISHED],
            failed=[f"{j.name} ({j.error})" for j in jobs if j.state is PublishState.FAILED],
            unfinished=[j.name for j in jobs if not j.state.is_terminal()],
        )

    def close(self, timeout: float | None = None) -> FlushResult:
        """Flush, then stop the workers; abandoned uploads are reported as unfinished."""
        result = self.wait(timeout)
        self._stop.set()
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=5)
        if self.uploader is not None:
            if self.store.objects.uploader is self.uploader:
                self.store.objects.uploader = None
            self.uploader.close()
        return result


def _show_progress(publisher: Publisher, jobs: list[PublishJob], deadline: float | None, url: str) -> None:
    """A rich progress bar over the bytes still to go up, until done or the deadline."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    total = sum(j.size for j in jobs)
    log.info("trainctl: waiting for %d checkpoint upload(s) (%.1f MB) to %s", len(jobs), total / 1e6, url)
    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]publishing {task.fields[n]} checkpoint(s)"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task("publish", total=total or 1, n=len(jobs))
        while True:
            left = [j for j in jobs if not j.state.is_terminal()]
            done_bytes = sum(j.size if j.state.is_terminal() else min(j.uploaded, j.size) for j in jobs)
            bar.update(task, completed=done_bytes, n=len(left))
            if not left or (deadline is not None and time.monotonic() >= deadline):
                return
            left[0].done.wait(0.2)


def keep_newest(store: RunStore, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` (>= 1) complete checkpoints of ``store``: never the
    newest complete one. A listing that fails deletes nothing (the next save tries again)."""
    try:
        complete = store.list_checkpoints()
    except TrainctlError as exc:
        log.warning("trainctl: keep_last: cannot list %s: %s", store.url, exc)
        return
    for manifest in complete[: max(0, len(complete) - keep_last)]:
        delete_remote(store, manifest, why=f"keep_last={keep_last}")


def delete_remote(store: RunStore, manifest: CheckpointManifest, why: str) -> None:
    """Delete a published checkpoint (manifest first: it stops existing at once), logging, not
    raising, a failure: the data stays complete and the next save tries retention again."""
    try:
        store.delete_checkpoint(manifest)
        log.info("trainctl: deleted remote checkpoint %s (%s)", manifest.id, why)
    except Exception as exc:
        log.error("trainctl: could not delete remote checkpoint %s (%s): %s", manifest.id, why, exc)
