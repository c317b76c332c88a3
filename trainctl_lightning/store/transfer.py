"""Moving large objects in one pass: uploads hashed as parts are read, downloads verified as ranges arrive.

:class:`~trainctl_lightning.store.objects.ObjectStore` uses these for checkpoint data on S3 and on
local disks (other fsspec backends, and wrapped filesystems, keep fsspec's ``put_file``/``get_file``
and a separate hashing pass):

:func:`upload_hashed`
    Reads the file once, in order, from a file descriptor (``os.pread``: the training process's
    private handle on the written inode). Each part is hashed on the calling thread as it is read
    and handed to ``concurrency`` threads that upload the parts in parallel (S3 multipart, part size
    ``part_size``), so the SHA-256 the manifest records is over exactly the bytes sent, and the
    file is never read a second time. At most ``concurrency + 2`` parts are in memory.
:func:`download_verified`
    Parallel ranged reads (``concurrency`` at once), each written to its place in a temporary file
    with ``os.pwrite``; the SHA-256 is taken in order as the ranges complete, so when the last
    range lands the whole object is verified; the temporary file is renamed over the target only
    then. At most ``concurrency + 2`` ranges are in memory.

A failed part or range fails the whole call (the caller's retry policy runs it again); a
multipart upload that fails is aborted, so no parts stay behind on the server.

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from trainctl_lightning.errors import StoreError

__all__ = ["LOCAL_CHUNK", "can_transfer", "download_verified", "upload_hashed"]

log = logging.getLogger(__name__)

LOCAL_CHUNK = 8 * 2**20
"""Bytes read and written at a time between local files."""

Progress = Callable[[int], None]


def can_transfer(fs: Any) -> str | None:
    """``"s3"`` or ``"local"`` when ``fs`` is an s3fs or fsspec local filesystem (not a wrapper), else None."""
    kind = type(fs).__module__ + "." + type(fs).__name__
    if kind == "s3fs.core.S3FileSystem":
        return "s3"
    if kind == "fsspec.implementations.local.LocalFileSystem":
        return "local"
    return None


def _stopped(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise StoreError("transfer stopped: the publisher is closing")


# ----------------------------------------------------------------------------- upload
def upload_hashed(
    fs: Any,
    fd: int,
    remote: str,
    size: int,
    *,
    concurrency: int,
    part_size: int,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> str:
    """Upload ``size`` bytes read from ``fd`` (from offset 0) to ``remote``; returns their SHA-256.

    Raises:
        StoreError: ``stop`` was set, or the file is shorter than ``size``.
        OSError, botocore errors: from the store, for the caller's retry policy.
    """
    if can_transfer(fs) == "local":
        return _upload_local(fd, remote, size, progress, stop)
    return _upload_s3(fs, fd, remote, size, concurrency, part_size, progress, stop)


def _read_exact(fd: int, offset: int, n: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise StoreError(f"the checkpoint file is {offset + len(data)} bytes, shorter than the {offset + n} expected")
    return data


def _upload_local(fd: int, remote: str, size: int, progress: Progress | None, stop: threading.Event | None) -> str:
    digest = hashlib.sha256()
    out = os.open(remote, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        offset = 0
        while offset < size:
            _stopped(stop)
            data = _read_exact(fd, offset, min(LOCAL_CHUNK, size - offset))
            digest.update(data)
            view = memoryview(data)
            while view:
                view = view[os.write(out, view) :]
            offset += len(data)
            if progress is not None:
                progress(len(data))
    finally:
        os.close(out)
    return digest.hexdigest()


def _s3_call(fs: Any, method: str, **kwargs: Any) -> Any:
    from fsspec.asyn import sync

    return sync(fs.loop, fs._call_s3, method, **kwargs)


def _upload_s3(
    fs: Any,
    fd: int,
    remote: str,
    size: int,
    concurrency: int,
    part_size: int,
    progress: Progress | None,
    stop: threading.Event | None,
) -> str:
    bucket, key, _ = fs.split_path(remote)
    digest = hashlib.sha256()
    if size <= part_size:
        data = _read_exact(fd, 0, size)
        digest.update(data)
        _s3_call(fs, "put_object", Bucket=bucket, Key=key, Body=data)
        if progress is not None:
            progress(size)
        return digest.hexdigest()
    upload_id = _s3_call(fs, "create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
    room = threading.BoundedSemaphore(concurrency + 2)  # parts read but not yet sent: bounded memory

    def send(number: int, data: bytes) -> dict[str, Any]:
        try:
            _stopped(stop)
            reply = _s3_call(fs, "upload_part", Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data)
            if progress is not None:
                progress(len(data))
            return {"PartNumber": number, "ETag": reply["ETag"]}
        finally:
            room.release()

    try:
        futures: list[Future[dict[str, Any]]] = []
        with ThreadPoolExecutor(concurrency, thread_name_prefix="trainctl-upload-part") as pool:
            try:
                for number, offset in enumerate(range(0, size, part_size), start=1):
                    room.acquire()
                    failed = next((f for f in futures if f.done() and f.exception() is not None), None)
                    if failed is not None:
                        room.release()
                        failed.result()  # raises: no point reading further
                    _stopped(stop)
                    try:
                        data = _read_exact(fd, offset, min(part_size, size - offset))
                    except BaseException:
                        room.release()
                        raise
                    digest.update(data)  # in file order, on this thread, as the part is read
                    futures.append(pool.submit(send, number, data))
                parts = [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        _s3_call(fs, "complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
    except BaseException:
        try:
            _s3_call(fs, "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception as exc:  # the store may be what failed; the original error is what is raised
            log.warning(
                "could not abort the multipart upload of %s (%s): the store's lifecycle rules or `trainctl ckpt gc` remove its parts",
                remote,
                exc,
            )
        raise
    finally:
        fs.invalidate_cache(remote)
    return digest.hexdigest()


# --------------------------------------------------------------------------- download
def download_verified(
    fs: Any,
    remote: str,
    out_fd: int,
    size: int,
    *,
    concurrency: int,
    part_size: int,
    progress: Progress | None = None,
) -> tuple[str, int]:
    """Write the object ``remote`` (``size`` bytes as listed) into ``out_fd``; returns (SHA-256, bytes).

    Raises:
        FileNotFoundError: the object is missing.
        OSError, botocore errors: from the store or the local disk.
    """
    if can_transfer(fs) == "local":
        return _download_local(remote, out_fd, progress)
    digest = hashlib.sha256()
    if size <= part_size:
        data = bytes(fs.cat_file(remote))
        digest.update(data)
        _write_all(out_fd, data, 0)
        if progress is not None:
            progress(len(data))
        return digest.hexdigest(), len(data)
    from fsspec.asyn import sync

    def fetch(offset: int, n: int) -> bytes:
        data = bytes(sync(fs.loop, fs._cat_file, remote, start=offset, end=offset + n))
        if len(data) != n:
            raise StoreError(f"a ranged read of {remote} at {offset} returned {len(data)} bytes, not {n}: the object changed")
        _write_all(out_fd, data, offset)
        return data

    got = 0
    ranges = collections.deque((offset, min(part_size, size - offset)) for offset in range(0, size, part_size))
    pending: collections.deque[Future[bytes]] = collections.deque()
    with ThreadPoolExecutor(concurrency, thread_name_prefix="trainctl-download-range") as pool:
        try:
            while ranges or pending:
                while ranges and len(pending) < concurrency + 2:
                    pending.append(pool.submit(fetch, *ranges.popleft()))
                data = pending.popleft().result()  # the next range in order: hash it as soon as it is there
                digest.update(data)
                got += len(data)
                if progress is not None:
                    progress(len(data))
        except BaseException:
            for f in pending:
                f.cancel()
            raise
    return digest.hexdigest(), got


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _download_local(remote: str, out_fd: int, progress: Progress | None) -> tuple[str, int]:
    digest = hashlib.sha256()
    got = 0
    with open(remote, "rb") as src:
        while chunk := src.read(LOCAL_CHUNK):
            digest.update(chunk)
            _write_all(out_fd, chunk, got)
            got += len(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest(), got
