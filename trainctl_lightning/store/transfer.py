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

    With a :class:`Growth`, the file is still being written (``torch.save``'s zip writer only
    appends): each part is read as soon as the file has grown past it, so the upload runs
    alongside the write and ends shortly after it, instead of starting when it ends. Its size is
    known only then; the upload returns it with the SHA-256.
:func:`download_verified`
    Parallel ranged reads (``concurrency`` at once; on S3 with a botocore client on threads, as
    boto3's ``download_file`` does, built from the s3fs filesystem's own credentials, endpoint and
    configuration, else as tasks on s3fs's loop), each written to its place in a temporary file
    with ``os.pwrite``; the SHA-256 is taken in order as the ranges complete, so when the last
    range lands the whole object is verified; the temporary file is renamed over the target only
    then. At most ``concurrency + 2`` ranges are in memory.

A failed part or range fails the whole call (the caller's retry policy runs it again); a
multipart upload that fails is aborted, so no parts stay behind on the server.

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import mmap
import os
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from trainctl_lightning.errors import StoreError

__all__ = ["LOCAL_CHUNK", "WRITE_CHUNK", "Growing", "Growth", "can_transfer", "download_verified", "upload_hashed", "warm_up"]

log = logging.getLogger(__name__)

WRITE_CHUNK = 2**20
"""The most bytes handed to the kernel in one write to a local file. On this project's 2-core VM
(ext4, Linux 6.18), one ``pwrite`` of a whole 16 MiB range, or ``torch.save``'s one write of a
whole tensor, now and then cost 3-10x the kernel time per byte of the same bytes written in 1 MiB
pieces (copying into the page cache: ``copy_folio_from_iter_atomic``); 1 MiB pieces were never
slow (1 GB written 12 times each way, and downloads side by side: 0.7-0.8 against 1.6-2.8 s of
system time per GB)."""
LOCAL_CHUNK = 8 * 2**20
"""Bytes read and written at a time between local files."""

Progress = Callable[[int], None]

MAX_PARTS = 10_000
"""S3's most parts per multipart upload."""
_GROWTH_POLL_S = 0.005
"""How often a reader looks at the size of a file that is being written."""


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


# ----------------------------------------------------------------------------- growth
class Growth:
    """A file that is still being written, and only appended to, read by an upload as it grows.

    Bytes below the file's size (``fstat``) are final: the kernel raises a file's size only past
    bytes already copied in, and the writer never goes back. Subclasses say when the write has
    ended (:meth:`_ended`): the upload's last part waits for that.

    Args:
        fd: a descriptor on the file (its size is read from it).
        expected: about how large the file will be (it sets the part size within S3's part limit).
    """

    def __init__(self, fd: int, expected: int) -> None:
        self.fd = fd
        self.expected = expected

    def wait(self, need: int, stop: threading.Event | None = None) -> tuple[int, bool]:
        """Block until the file holds ``need`` bytes or its write has ended.

        Returns:
            (bytes written, whether the write has ended: then that is the final size).

        Raises:
            StoreError: the write failed (nothing of it may be published), or ``stop`` was set.
        """
        while True:
            final = self._ended(0.0)
            if final is not None:
                return final, True
            size = os.fstat(self.fd).st_size
            if size >= need:
                return size, False
            _stopped(stop)
            final = self._ended(_GROWTH_POLL_S)
            if final is not None:
                return final, True

    def _ended(self, timeout: float) -> int | None:
        """The final size once the write has ended (waiting up to ``timeout`` s for it), else None.

        Raises:
            StoreError: the write failed.
        """
        raise NotImplementedError


class Growing(Growth):
    """The writer's side, in the writing process: :meth:`end` when every byte is written, then
    :meth:`commit` when the file is safely in place (or :meth:`fail` at any point). Thread-safe."""

    def __init__(self, fd: int, expected: int) -> None:
        super().__init__(fd, expected)
        self._cond = threading.Condition()
        self._final: int | None = None
        self._committed = False
        self._error: str | None = None

    def end(self, size: int) -> None:
        """Every byte is written: the file is ``size`` bytes and will not change."""
        with self._cond:
            self._final = size
            self._cond.notify_all()

    def commit(self) -> None:
        """The write succeeded as a whole (flushed to disk and in place): it may be published."""
        with self._cond:
            self._committed = True
            self._cond.notify_all()

    def fail(self, why: str) -> None:
        """The write failed or was given up (``why``: one line): nothing of it may be published."""
        with self._cond:
            if not self._committed:
                self._error = why
            self._cond.notify_all()

    def outcome(self) -> tuple[int | None, str | None]:
        """(final size or None, error or None), now."""
        with self._cond:
            return self._final, self._error

    def wait_committed(self, timeout: float | None = None) -> None:
        """Block until :meth:`commit`.

        Raises:
            StoreError: the write failed, or ``timeout`` passed first.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._committed or self._error is not None, timeout):
                raise StoreError(f"the checkpoint's write did not finish within {timeout:.0f}s; it is not published")
            if self._error is not None:
                raise StoreError(self._error)

    def _ended(self, timeout: float) -> int | None:
        with self._cond:
            if self._final is None and self._error is None and timeout > 0:
                self._cond.wait(timeout)
            if self._error is not None:
                raise StoreError(self._error)
            return self._final


class _Written(Growth):
    """A file that is complete: ``size`` bytes."""

    def __init__(self, fd: int, size: int) -> None:
        super().__init__(fd, size)
        self.size = size

    def wait(self, need: int, stop: threading.Event | None = None) -> tuple[int, bool]:
        return self.size, True


def part_size_for(size: int, part_size: int) -> int:
    """``part_size``, or larger (whole MiB) where ``size`` bytes would need more than S3's 10,000 parts."""
    least = -(-size // MAX_PARTS)
    return max(part_size, -(-least // 2**20) * 2**20)


# ----------------------------------------------------------------------------- upload
def warm_up(fs: Any, remote_dir: str, concurrency: int) -> None:
    """Make the S3 client that uploads to ``remote_dir`` will use, and send one request (HEAD of
    its bucket), as the first upload would: credentials, endpoint, configuration, connection pool."""
    _upload_requests(fs, concurrency)("head_bucket", Bucket=fs.split_path(remote_dir)[0])


def _upload_requests(fs: Any, concurrency: int) -> Callable[..., Any]:
    """``call(method, **kwargs)``: S3 requests for uploads, from a botocore client on threads where
    ``fs`` maps to one (``_UPLOAD_ON_THREADS``), else on s3fs's loop; errors as s3fs raises them."""
    client = _thread_client(fs, concurrency) if _UPLOAD_ON_THREADS else None

    def call(method: str, **kwargs: Any) -> Any:
        if client is None:
            return _s3_call(fs, method, **kwargs)
        from botocore.exceptions import ClientError
        from s3fs.errors import translate_boto_error

        try:
            return getattr(client, method)(**kwargs)
        except ClientError as exc:  # as s3fs raises it (PermissionError, FileNotFoundError...), the ClientError as cause
            raise translate_boto_error(exc) from exc

    return call


def upload_hashed(
    fs: Any,
    fd: int,
    remote: str,
    size: int | None,
    *,
    concurrency: int,
    part_size: int,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    growth: Growth | None = None,
) -> tuple[str, int]:
    """Upload the bytes read from ``fd`` (from offset 0) to ``remote``; returns (SHA-256, size).

    Args:
        size: the file's size; None with ``growth``: the file is being written, and is read as it grows.

    Raises:
        StoreError: ``stop`` was set, the file is shorter than ``size``, or the write that
            ``growth`` follows failed.
        OSError, botocore errors: from the store, for the caller's retry policy.
    """
    if growth is None:
        if size is None:
            raise ValueError("upload_hashed needs the size of a file that is not growing")
        growth = _Written(fd, size)
    if can_transfer(fs) == "local":
        return _upload_local(fd, remote, growth, progress, stop)
    return _upload_s3(fs, fd, remote, growth, concurrency, part_size, progress, stop)


def _read_exact(fd: int, offset: int, n: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise StoreError(f"the checkpoint file is {offset + len(data)} bytes, shorter than the {offset + n} expected")
    return data


def _upload_local(
    fd: int, remote: str, growth: Growth, progress: Progress | None, stop: threading.Event | None
) -> tuple[str, int]:
    digest = hashlib.sha256()
    out = os.open(remote, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        offset = 0
        while True:
            _stopped(stop)
            there, _ = growth.wait(offset + LOCAL_CHUNK, stop)
            if offset >= there:  # the write has ended, and all of it is here
                break
            data = _read_exact(fd, offset, min(LOCAL_CHUNK, there - offset))
            digest.update(data)
            _write_all(out, data, offset)
            offset += len(data)
            if progress is not None:
                progress(len(data))
    finally:
        os.close(out)
    return digest.hexdigest(), offset


def _s3_call(fs: Any, method: str, **kwargs: Any) -> Any:
    from fsspec.asyn import sync

    return sync(fs.loop, fs._call_s3, method, **kwargs)


class _PartBuffers:
    """``count`` reusable part buffers of ``size`` bytes each, in anonymous memory maps.

    The parts of one transfer take turns in these instead of a fresh ``bytes`` per part: the
    memory is bounded (``count * size``), touched once, and goes back to the system when the
    transfer ends (an unmapped region, not a freed heap block that the allocator may keep).
    """

    def __init__(self, count: int, size: int) -> None:
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(count):
            self._free.put(mmap.mmap(-1, size))

    def take(self) -> mmap.mmap:
        return self._free.get()

    def give(self, buf: mmap.mmap) -> None:
        self._free.put(buf)


class _PartBody(io.RawIOBase):
    """A read-only, seekable file over one part's bytes in a reused buffer.

    Given as an ``upload_part`` Body, the HTTP client streams it in small chunks; a ``bytes`` Body
    of a whole part is copied whole, twice, by asyncio's socket transport (``data[n:]``, then
    into its send buffer) on every part: that was most of the upload's extra memory.
    """

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: len(self._view)}[whence]
        self._pos = min(max(0, base + offset), len(self._view))
        return self._pos

    def readinto(self, b: Any) -> int:
        n = min(len(b), len(self._view) - self._pos)
        b[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        data = bytes(self._view[self._pos : end])
        self._pos = end
        return data

    def __len__(self) -> int:
        return len(self._view)


def _read_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset`` (``os.preadv``: no intermediate ``bytes``)."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise StoreError(f"the checkpoint file is {offset + got} bytes, shorter than the {offset + len(view)} expected")
        got += n


def _upload_s3(
    fs: Any,
    fd: int,
    remote: str,
    growth: Growth,
    concurrency: int,
    part_size: int,
    progress: Progress | None,
    stop: threading.Event | None,
) -> tuple[str, int]:
    bucket, key, _ = fs.split_path(remote)
    digest = hashlib.sha256()
    # A file that may end up larger than expected gets room: its size is known only at the end.
    part_size = part_size_for(growth.expected if isinstance(growth, _Written) else 2 * growth.expected, part_size)
    call = _upload_requests(fs, concurrency)
    there, ended = growth.wait(part_size + 1, stop)  # one part or less: one PUT
    if ended and there <= part_size:
        data = _read_exact(fd, 0, there)
        digest.update(data)
        call("put_object", Bucket=bucket, Key=key, Body=data)
        if progress is not None:
            progress(there)
        return digest.hexdigest(), there

    upload_id = call("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
    buffers = _PartBuffers(concurrency + 2, part_size)  # parts read but not yet sent: bounded memory

    def send(number: int, buf: mmap.mmap, n: int) -> dict[str, Any]:
        try:
            _stopped(stop)
            with memoryview(buf) as whole, whole[:n] as view:
                body = _PartBody(view)
                try:
                    reply = call(
                        "upload_part",
                        Bucket=bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=body,
                        ContentLength=n,
                    )
                finally:
                    body._view = memoryview(b"")  # the buffer is reused: nothing may read it through this body now
            if progress is not None:
                progress(n)
            return {"PartNumber": number, "ETag": reply["ETag"]}
        finally:
            buffers.give(buf)

    offset = 0
    try:
        futures: list[Future[dict[str, Any]]] = []
        with ThreadPoolExecutor(concurrency, thread_name_prefix="trainctl-upload-part") as pool:
            try:
                number = 0
                while True:
                    if not ended and there < offset + part_size:
                        there, ended = growth.wait(offset + part_size, stop)  # the file grows past this part
                    n = min(part_size, there - offset)
                    if n <= 0:
                        break
                    number += 1
                    if number > MAX_PARTS:
                        raise StoreError(
                            f"{remote} is larger than {MAX_PARTS} parts of {part_size} bytes: far larger than the "
                            f"{growth.expected} bytes expected; set a larger part_size on the store"
                        )
                    buf = buffers.take()
                    failed = next((f for f in futures if f.done() and f.exception() is not None), None)
                    if failed is not None:
                        buffers.give(buf)
                        failed.result()  # raises: no point reading further
                    try:
                        _stopped(stop)
                        with memoryview(buf) as whole, whole[:n] as view:
                            _read_into(fd, view, offset)
                            digest.update(view)  # in file order, on this thread, as the part is read
                    except BaseException:
                        buffers.give(buf)
                        raise
                    futures.append(pool.submit(send, number, buf, n))
                    offset += n
                parts = [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        call("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
    except BaseException:
        try:
            call("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception as exc:  # the store may be what failed; the original error is what is raised
            log.warning(
                "could not abort the multipart upload of %s (%s): the store's lifecycle rules or `trainctl ckpt gc` remove its parts",
                remote,
                exc,
            )
        raise
    finally:
        fs.invalidate_cache(remote)
    return digest.hexdigest(), offset


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
    client = _thread_client(fs, concurrency) if _DOWNLOAD_ON_THREADS else None
    if client is not None:
        return _download_s3_threads(fs, client, remote, out_fd, size, concurrency, part_size, progress)
    return _download_s3(fs, remote, out_fd, size, concurrency, part_size, progress)


_UPLOAD_ON_THREADS = True
"""Multipart uploads' requests from a botocore client on threads where the filesystem maps to one
(as for ranged reads), else on s3fs's loop. Measured side by side on a 2-core machine (1 GB, a
fresh process per upload, SeaweedFS on loopback): 3.9 s of client CPU per GB on threads against
4.6 s on the loop (boto3 ``upload_file``: 2.6 s; the difference is mostly the SHA-256 taken on the
way). Benchmarks may switch it to compare."""
_DOWNLOAD_ON_THREADS = True
"""Ranged reads with a botocore client on threads where the filesystem maps to one, else as tasks
on s3fs's loop. Measured side by side on a 2-core machine (2 GB, a fresh process per download,
SeaweedFS on loopback): 540 MB/s on threads against 469 MB/s on the loop (boto3 ``download_file``:
596 MB/s); aiohttp's path costs more CPU per byte. Benchmarks may switch it to compare."""
_READ_CHUNK = 256 * 2**10
"""Bytes read from a response body at a time (as boto3's s3transfer does)."""
_clients: dict[int, tuple[int, Any]] = {}
"""id(filesystem) -> (concurrency, client), dropped when the filesystem is collected. By identity, not
a ``WeakKeyDictionary``: fsspec filesystems built with the same arguments compare equal, yet each
resolves its endpoint and credentials from the environment it was made in, so an equal one's
client may name another endpoint (one since stopped: a refused connection)."""
_clients_lock = threading.Lock()


def _thread_client(fs: Any, concurrency: int) -> Any | None:
    """A (thread-safe) botocore S3 client with ``fs``'s endpoint, credentials and configuration, or None.

    Built as s3fs builds its own aiobotocore client (``S3FileSystem.set_session``): the same
    keys or the same default credential chain and profile, ``client_kwargs`` and ``config_kwargs``
    (timeouts included), unsigned when ``anon``. None where that cannot be mapped faithfully: an
    injected session, region discovery per bucket (no endpoint or region given), session options
    other than ``profile``, ``s3_additional_kwargs`` (which s3fs adds to its requests), or an s3fs
    without the attributes this reads.
    """
    needed = ("_session_is_owned", "s3_additional_kwargs", "kwargs", "client_kwargs", "cache_regions", "_prepare_config_kwargs")
    if not all(hasattr(fs, name) for name in needed):
        return None
    if not fs._session_is_owned or fs.s3_additional_kwargs or set(fs.kwargs) - {"profile"}:
        return None
    client_kwargs = dict(fs.client_kwargs)
    if fs.cache_regions and not (client_kwargs.get("region_name") or client_kwargs.get("endpoint_url") or fs.endpoint_url):
        return None
    with _clients_lock:
        cached = _clients.get(id(fs))
        if cached is not None and cached[0] >= concurrency:
            return cached[1]
    import botocore.session
    from botocore.config import Config

    init_kwargs = {
        "aws_access_key_id": fs.key,
        "aws_secret_access_key": fs.secret,
        "aws_session_token": fs.token,
        "endpoint_url": fs.endpoint_url,
    }
    init_kwargs = {k: v for k, v in init_kwargs.items() if v is not None and v != client_kwargs.get(k)}
    if "use_ssl" not in client_kwargs:
        init_kwargs["use_ssl"] = fs.use_ssl
    config_kwargs = fs._prepare_config_kwargs()
    if fs.anon:
        from botocore import UNSIGNED

        secret_keys = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
        init_kwargs = {k: v for k, v in init_kwargs.items() if k not in secret_keys}
        client_kwargs = {k: v for k, v in client_kwargs.items() if k not in secret_keys}
        config_kwargs["signature_version"] = UNSIGNED
    config_kwargs["max_pool_connections"] = max(concurrency, config_kwargs.get("max_pool_connections") or 0)
    session = botocore.session.Session(**fs.kwargs)
    endpoint = client_kwargs.get("endpoint_url") or fs.endpoint_url
    if (
        isinstance(endpoint, str)
        and endpoint.lower().startswith("http://")
        and not fs.anon
        and "request_checksum_calculation" not in config_kwargs
        and not os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION")
        and not session.get_scoped_config().get("request_checksum_calculation")
    ):
        # Over plain HTTP botocore signs each request's payload (SigV4 over its SHA-256, which the
        # store checks); its default CRC-32 beside that checks the same bytes again, for about 0.5
        # CPU-s per GB. Over HTTPS it keeps the CRC-32 and leaves the payload unsigned instead.
        config_kwargs["request_checksum_calculation"] = "when_required"
    client = session.create_client("s3", config=Config(**config_kwargs), **init_kwargs, **client_kwargs)
    with _clients_lock:
        if id(fs) not in _clients:
            weakref.finalize(fs, _forget_client, id(fs))
        _clients[id(fs)] = (concurrency, client)
    return client


def _forget_client(key: int) -> None:
    # No lock: the collector may run this on a thread that holds it; a dict pop is atomic.
    _clients.pop(key, None)


def _write_in_order(
    ranges: list[tuple[int, int]],
    done: queue.Queue[tuple[int, mmap.mmap, int] | BaseException],
    give_back: Callable[[mmap.mmap], None],
    out_fd: int | None,
    progress: Progress | None,
) -> tuple[str, int]:
    """Write each range that arrives in ``done`` to its place (unless ``out_fd`` is None: written
    already); hash them in file order as they complete."""
    digest = hashlib.sha256()
    got = 0
    arrived: dict[int, tuple[mmap.mmap, int]] = {}
    for index, (offset, _) in enumerate(ranges):
        while index not in arrived:
            item = done.get()
            if isinstance(item, BaseException):
                raise item
            arrived[item[0]] = item[1:]
        buf, n = arrived.pop(index)
        with memoryview(buf) as whole, whole[:n] as view:
            if out_fd is not None:
                _write_all(out_fd, view, offset)
            digest.update(view)  # the next range in order: hashed as soon as it is there
        give_back(buf)
        got += n
        if progress is not None:
            progress(n)
    return digest.hexdigest(), got


def _read_body(body: Any, view: memoryview) -> int:
    """Read a response body into ``view``; returns the bytes read (fewer: the body ended early).

    Straight from the connection into the buffer (``http.client``'s ``readinto``) where the body
    is botocore's plain, unencoded stream over urllib3 over ``http.client`` (a GET of an object
    without a ``Content-Encoding``): no ``bytes`` per chunk and one copy less per byte, which on a
    machine that also serves the store is CPU the download needs. A body read to its end gives its
    connection back to urllib3's pool (``release_conn``), as urllib3's own reads do; otherwise
    closing the body would close the connection, and every range would open a new one. Else in
    ``_READ_CHUNK`` reads.
    """
    raw: Any = getattr(body, "_raw_stream", None)
    fp: Any = getattr(raw, "_fp", None)
    headers = getattr(raw, "headers", None)
    plain = headers is not None and not headers.get("content-encoding") and not headers.get("transfer-encoding")
    got = 0
    if _READ_INTO and plain and callable(getattr(fp, "readinto", None)) and callable(getattr(raw, "release_conn", None)):
        while got < len(view):
            k = fp.readinto(view[got:])
            if not k:
                break
            got += k
        if got == len(view) and fp.isclosed():  # the whole body was read: the connection is free
            raw.release_conn()  # back to the pool, as urllib3 does when it reads a body to its end
        return got
    while got < len(view):
        chunk = body.read(min(_READ_CHUNK, len(view) - got))  # small reads: no whole range in the heap
        if not chunk:
            break
        view[got : got + len(chunk)] = chunk
        got += len(chunk)
    return got


_READ_INTO = True
_WRITE_ON_FETCH = True
"""Each range is written to its place by the thread that fetched it, as soon as it is there (out of
order, as boto3's ``download_file`` does); the hash still goes in order over the buffers. Writing
them all from the one hashing thread, in order, held the whole download to that thread's pace
once the kernel throttled writes of dirty pages: measured side by side on a 2-core machine (2 GB,
fresh processes, SeaweedFS on loopback, 3 rounds each): medians 263-327 MB/s written in order
against 376-460 MB/s written by the fetching threads, boto3 378-384 MB/s."""
_SPARE_RANGES = 2
"""Ranges fetched ahead of the oldest one not yet hashed (beyond ``concurrency``): 8 instead of 2
measured no faster (400 against 400 MB/s, 1 GB)."""


def _download_s3_threads(
    fs: Any, client: Any, remote: str, out_fd: int, size: int, concurrency: int, part_size: int, progress: Progress | None
) -> tuple[str, int]:
    """The ranged reads run on ``concurrency`` threads with a botocore client (as boto3's
    ``download_file`` does), each streamed into a reused part buffer and written to its place by
    its thread; this thread hashes them in file order as they complete."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    bucket, key, version = fs.split_path(remote)
    extra: dict[str, Any] = {"VersionId": version} if version else {}
    extra.update(fs.req_kw)
    ranges = [(offset, min(part_size, size - offset)) for offset in range(0, size, part_size)]
    done: queue.Queue[tuple[int, mmap.mmap, int] | BaseException] = queue.Queue()
    failed = threading.Event()

    def fetch(index: int, buf: mmap.mmap) -> None:
        offset, n = ranges[index]
        try:
            if failed.is_set():
                raise StoreError(f"the download of {remote} failed")
            reply = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + n - 1}", **extra)
            body = reply["Body"]
            try:
                with memoryview(buf) as view:
                    got = _read_body(body, view[:n])
            finally:
                body.close()
            if got != n:
                raise StoreError(f"a ranged read of {remote} at {offset} returned {got} bytes, not {n}: the object changed")
            if _WRITE_ON_FETCH:
                with memoryview(buf) as view, view[:n] as part:
                    _write_all(out_fd, part, offset)
        except BaseException as exc:
            failed.set()
            # As s3fs raises it (FileNotFoundError for a missing object, ...), the ClientError as cause.
            done.put(translate_boto_error(exc) if isinstance(exc, ClientError) else exc)
            return
        done.put((index, buf, n))

    with ThreadPoolExecutor(concurrency, thread_name_prefix="trainctl-download-range") as pool:
        following = iter(range(len(ranges)))

        def give_back(buf: mmap.mmap) -> None:  # a range is written: its buffer takes the next one
            index = next(following, None)
            if index is not None and not failed.is_set():
                pool.submit(fetch, index, buf)

        try:
            for _ in range(min(concurrency + _SPARE_RANGES, len(ranges))):
                give_back(mmap.mmap(-1, part_size))  # bounded memory: these buffers take turns
            return _write_in_order(ranges, done, give_back, None if _WRITE_ON_FETCH else out_fd, progress)
        except BaseException:
            failed.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _download_s3(
    fs: Any, remote: str, out_fd: int, size: int, concurrency: int, part_size: int, progress: Progress | None
) -> tuple[str, int]:
    """The ranged reads run as tasks on s3fs's event loop (``concurrency`` at once), each streamed
    into a reused part buffer; this thread writes each range to its place and hashes the ranges in
    file order as they complete, so the network never waits on the disk or the hash."""
    bucket, key, version = fs.split_path(remote)
    ranges = [(offset, min(part_size, size - offset)) for offset in range(0, size, part_size)]
    free = [mmap.mmap(-1, part_size) for _ in range(min(concurrency + 2, len(ranges)))]  # bounded memory
    done: queue.Queue[tuple[int, mmap.mmap, int] | BaseException] = queue.Queue()
    room: asyncio.Semaphore | None = None

    def give_back(buf: mmap.mmap) -> None:  # on the loop
        free.append(buf)
        assert room is not None
        room.release()

    async def fetch(index: int, buf: mmap.mmap) -> None:
        offset, n = ranges[index]
        try:
            extra = {"VersionId": version} if version else {}
            reply = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + n - 1}", **extra)
            body = reply["Body"]
            try:
                got = 0
                with memoryview(buf) as view:
                    while got < n:
                        k = await body.readinto(view[got:n])  # straight into the buffer: no bytes per range
                        if k == 0:
                            break
                        got += k
            finally:
                body.close()
            if got != n:
                raise StoreError(f"a ranged read of {remote} at {offset} returned {got} bytes, not {n}: the object changed")
        except BaseException as exc:
            done.put(exc)
            raise
        done.put((index, buf, n))

    async def run_all() -> None:
        nonlocal room
        room = asyncio.Semaphore(len(free))
        tasks: list[asyncio.Task[None]] = []
        try:
            for index in range(len(ranges)):
                await room.acquire()
                tasks.append(asyncio.ensure_future(fetch(index, free.pop())))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    runner = asyncio.run_coroutine_threadsafe(run_all(), fs.loop)
    try:
        result = _write_in_order(ranges, done, lambda buf: fs.loop.call_soon_threadsafe(give_back, buf), out_fd, progress)
        runner.result()
    finally:
        if not runner.done():
            runner.cancel()
            with contextlib.suppress(BaseException):  # the error being raised is the one that counts
                runner.result(timeout=30)
    return result


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view[:WRITE_CHUNK], offset)
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
