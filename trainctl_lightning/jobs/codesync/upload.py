"""Uploading a scanned bundle: only the blobs the store lacks, then the run's manifest."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsspec.callbacks import Callback

from trainctl_lightning.errors import ConfigError, ConflictError, IntegrityError
from trainctl_lightning.humanize import human_size
from trainctl_lightning.jobs.codesync.bundle import (
    SHA_RE,
    BundleFile,
    CodeBundle,
    run_parallel,
)
from trainctl_lightning.jobs.spec import CodeRef
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.paths import PRIVATE_FILE_MODE, make_private_dir
from trainctl_lightning.store import ObjectStore, layout
from trainctl_lightning.store.files import copy_verified, sha256_file

__all__ = ["UploadStats", "upload_bundle"]

log = logging.getLogger(__name__)

# Blobs up to this size are read into memory once, checked and put in one request: what is
# stored is exactly what was hashed. Larger ones are streamed and the local file re-hashed after.
_IN_MEMORY_MAX = 8 << 20


@dataclass
class UploadStats:
    """What one :func:`upload_bundle` did."""

    files: int
    """Files in the bundle."""
    bytes_total: int
    """Bytes in the bundle."""
    files_uploaded: int
    """Blobs uploaded (distinct contents the store did not have yet)."""
    bytes_uploaded: int
    seconds: float

    def describe(self) -> str:
        unchanged = self.files - self.files_uploaded
        return (
            f"code: {self.files} files, {human_size(self.bytes_total)}; uploaded {self.files_uploaded} "
            f"({human_size(self.bytes_uploaded)}), {unchanged} unchanged, in {self.seconds:.2f}s"
        )


def upload_bundle(
    bundle: CodeBundle,
    store_url: str,
    run_url: str,
    *,
    storage_options: dict[str, Any] | None = None,
    workers: int = 8,
    progress: Callable[[int], None] | None = None,
) -> tuple[CodeRef, UploadStats]:
    """Upload the blobs the store lacks, then the run's manifest (create-only).

    Args:
        bundle: from :func:`scan_project`.
        store_url: the store root; blobs go to ``<store_url>/_code/blobs/<sha256>``.
        run_url: the run; the manifest goes to ``<run_url>/code.json``.
        storage_options: passed to fsspec (credentials, ``endpoint_url``).
        workers: blobs uploaded in parallel.
        progress: called with the number of bytes just uploaded, possibly from several
            threads (one at a time), for a progress bar.

    Returns:
        The :class:`CodeRef` for the job spec, and what was uploaded.

    Raises:
        StoreError: the store cannot be listed or written (one line saying what to do).
        IntegrityError: a local file changed after it was scanned; nothing refers to it.
        ConflictError: the run already has a different code manifest.
    """
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    started = time.monotonic()
    blobs = ObjectStore(layout.blobs_url_in(store_url), storage_options)
    jobs = JobStore(run_url, storage_options)
    present = {name: size for name, size in blobs.list_sizes().items() if SHA_RE.match(name)}
    todo: dict[str, BundleFile] = {}
    for f in bundle.files:
        if present.get(f.sha256) != f.size and f.sha256 not in todo:
            todo[f.sha256] = f
    report = _locked(progress)
    if todo:
        run_parallel(
            ThreadPoolExecutor(max_workers=min(workers, len(todo)), thread_name_prefix="trainctl-code-up"),
            [functools.partial(_put_blob, blobs, bundle.root, f, report) for f in todo.values()],
        )
    data = bundle.manifest_bytes()
    try:
        jobs.write_code_manifest(data)
    except ConflictError:
        # a retried launch of the same run with the same tree is fine; another tree is not
        if jobs.objects.read(layout.CODE_MANIFEST) != data:
            raise ConflictError(
                f"{jobs.objects.url_of(layout.CODE_MANIFEST)} already holds another code manifest; it was not "
                "overwritten (launch with a new run id)"
            ) from None
    ref = CodeRef(
        manifest_url=jobs.objects.url_of(layout.CODE_MANIFEST),
        manifest_sha256=hashlib.sha256(data).hexdigest(),
        blobs_url=blobs.url,
        files=len(bundle.files),
        bytes=bundle.total_bytes,
    )
    stats = UploadStats(
        files=len(bundle.files),
        bytes_total=bundle.total_bytes,
        files_uploaded=len(todo),
        bytes_uploaded=sum(f.size for f in todo.values()),
        seconds=time.monotonic() - started,
    )
    log.info(
        "code: %d files (%s), uploaded %d (%s) in %.1fs",
        stats.files,
        human_size(stats.bytes_total),
        stats.files_uploaded,
        human_size(stats.bytes_uploaded),
        stats.seconds,
    )
    return ref, stats


def _locked(progress: Callable[[int], None] | None) -> Callable[[int], None]:
    if progress is None:
        return lambda n: None
    lock = threading.Lock()

    def report(n: int) -> None:
        if n:
            with lock:
                progress(n)

    return report


class _Progress(Callback):
    def __init__(self, report: Callable[[int], None]) -> None:
        super().__init__()
        self.value: int = 0
        self._report = report

    def relative_update(self, inc: int = 1) -> None:
        self.value += inc
        self._report(inc)

    def absolute_update(self, value: int) -> None:
        self._report(max(0, value - self.value))
        self.value = value


def _changed(local: Path) -> IntegrityError:
    return IntegrityError(
        f"{local} changed after it was scanned for upload; its new content was not stored. "
        "Launch again once it is no longer being written"
    )


def _put_blob(blobs: ObjectStore, root: Path, f: BundleFile, report: Callable[[int], None]) -> None:
    """Store one blob under its checksum; content that no longer matches is never stored under it."""
    local = root / f.path
    if blobs.is_local:
        # copied under a temporary name while hashing, then renamed: a half-written or changed
        # file never appears under a checksum name (a later listing would take it as present)
        target = blobs.path(f.sha256)
        make_private_dir(os.path.dirname(target))  # a local store is private to the user
        try:
            copy_verified(local, target, f.sha256, mode=PRIVATE_FILE_MODE, progress=report)
        except IntegrityError:
            raise _changed(local) from None
        return
    if f.size <= _IN_MEMORY_MAX:
        data = local.read_bytes()
        if hashlib.sha256(data).hexdigest() != f.sha256:
            raise _changed(local)
        blobs.write(f.sha256, data)
        report(len(data))
        return
    blobs.upload(local, f.sha256, size=f.size, callback=_Progress(report))
    if sha256_file(local)[0] != f.sha256:
        try:
            blobs.delete(f.sha256)
        except Exception as exc:  # the store may be failing too; the blob is referenced by nothing
            log.warning("could not remove %s after its source changed: %s", blobs.url_of(f.sha256), exc)
        raise _changed(local)
