"""Objects under one storage prefix: the only layer that talks to fsspec.

:class:`ObjectStore` owns the few primitives everything else is built from: atomic writes,
create-only writes, reads, listings, deletes, verified uploads and downloads. Every one of them
retries transient errors the same way (:class:`~trainctl_lightning.retry.RetryPolicy`) and turns
a backend error into one :class:`~trainctl_lightning.errors.StoreError` line that says what to
do (:func:`explain_store_error`). Checkpoints, metrics, jobs, code sync, ``_dist`` and gc all go
through it; none of them opens fsspec itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, TypeVar

import fsspec
from fsspec.callbacks import Callback, NoOpCallback

from trainctl_lightning.errors import (
    ConfigError,
    ConflictError,
    IntegrityError,
    StoreError,
    TrainctlError,
)
from trainctl_lightning.paths import PRIVATE_FILE_MODE, make_private_dir
from trainctl_lightning.retry import RetryPolicy, exception_chain
from trainctl_lightning.store.files import (
    HASH_CHUNK,
    atomic_file,
    check_content,
    create_exclusive,
    sha256_file,
)
from trainctl_lightning.store.transfer import Growing, can_transfer, download_verified, upload_hashed

__all__ = ["ObjectStore", "Uploader", "explain_store_error", "validate_url"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class Uploader(Protocol):
    """Runs :func:`~trainctl_lightning.store.transfer.upload_hashed` elsewhere (another process)."""

    def upload(
        self,
        store: dict[str, Any],
        fd: int,
        remote: str,
        size: int | None,
        *,
        stop: threading.Event | None = None,
        growth: Growing | None = None,
    ) -> tuple[str, int]: ...


def validate_url(url: str) -> str:
    """Check that ``url`` names a storage backend fsspec can load, without touching the network.

    Returns the protocol. Raises:
        ConfigError: empty URL, unknown protocol, or the backend's package is not installed.
    """
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"store URL must be a non-empty string like 's3://bucket/run' or 'file:///path', got {url!r}")
    protocol, _ = fsspec.core.split_protocol(url)
    protocol = protocol or "file"
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ConfigError(
            f"unknown storage protocol {protocol!r} in {url!r}: use s3://, file://, memory:// "
            "or another protocol fsspec knows (fsspec.available_protocols())"
        ) from None
    except ImportError as exc:
        raise ConfigError(f"cannot use {url!r}: {exc}") from None
    return protocol


class ObjectStore:
    """The objects below one fsspec URL, addressed by paths relative to it.

    Args:
        url: fsspec URL of the prefix, e.g. ``s3://bucket/runs/exp1`` or ``file:///data/runs``.
            A plain path is taken as a local directory.
        storage_options: passed to the fsspec filesystem (credentials, ``endpoint_url``, ...);
            never logged or written anywhere.
        retry: how long to ride out transient errors on each operation.
        max_concurrency: concurrent multipart parts per file on backends that support it (S3).
        part_size: multipart part size in bytes on S3.

    Raises:
        ConfigError: the URL's protocol is unknown or its package is missing.

    Relative paths never leave the prefix: one with a ``..`` part is refused.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        retry: RetryPolicy | None = None,
        max_concurrency: int = 8,
        part_size: int = 16 * 2**20,
    ) -> None:
        self.protocol = validate_url(url)
        if max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if part_size < 5 * 2**20:
            raise ConfigError(f"part_size must be at least 5 MiB (S3's minimum part), got {part_size}")
        self._storage_options = dict(storage_options or {})
        fs, root = fsspec.core.url_to_fs(url, **self._storage_options)
        self.fs: fsspec.AbstractFileSystem = fs
        """The fsspec filesystem; for tests and tools only (package code uses the methods)."""
        self.root: str = root.rstrip("/") or "/"
        self.retry: RetryPolicy = retry or RetryPolicy()
        """How transient errors are ridden out; callers may swap it (the agent's short ticks)."""
        self.max_concurrency = max_concurrency
        self.part_size = part_size
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        self.is_local = bool({"file", "local"} & protocols)
        """Whether objects are plain files (atomic renames and hard links are available)."""
        self._is_s3 = bool({"s3", "s3a"} & protocols)
        self.url = self.url_of()
        self._bucket_seen = False  # an empty listing on S3 checks once that the bucket exists
        self.uploader: Uploader | None = None
        """Where :meth:`upload_hashed` runs S3 uploads: None here, on threads of this process;
        CheckpointSync sets an uploader process (``trainctl_lightning.checkpoint.uploader``)."""

    def __repr__(self) -> str:  # storage_options may hold secrets: never shown
        return f"{type(self).__name__}({self.url!r})"

    # ----------------------------------------------------------------- addressing
    def path(self, *parts: str) -> str:
        """Backend path of an object below this prefix (never outside it).

        Raises:
            ConfigError: the relative path has a ``..`` part.
        """
        rel = "/".join(p.strip("/") for p in parts if p)
        if ".." in rel.split("/"):
            raise ConfigError(f"refusing a store path that leaves {self.root}: {rel!r}")
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, *parts: str) -> str:
        """The URL of an object below this prefix."""
        p = self.path(*parts)
        return f"file://{p}" if self.is_local else self.fs.unstrip_protocol(p)

    def forget_listings(self, rel: str = "") -> None:
        """Drop what the filesystem cached about ``rel`` and everything below it.

        fsspec's ``invalidate_cache(path)`` drops ``path`` and its parents only (s3fs), so a
        folder listed while an upload was under way (data there, manifest not yet) would be read
        from the cache forever by a long-lived reader; every listing here calls this first.
        """
        path = self.path(rel)
        self.fs.invalidate_cache(path)
        cache = getattr(self.fs, "dircache", None)
        if cache:
            prefix = path.rstrip("/") + "/"
            for key in [k for k in list(cache) if isinstance(k, str) and k.startswith(prefix)]:
                cache.pop(key, None)

    # ----------------------------------------------------------------- the one way to call
    def call(self, fn: Callable[[], T], *, what: str, action: str, stop: threading.Event | None = None) -> T:
        """Run one storage operation: retried while transient, then translated.

        Args:
            fn: the operation.
            what: what it does, for retry log lines (``"write s3://b/run/job.json"``).
            action: the verb for the error line (``"write to"``, ``"read"``, ``"list"``).
            stop: when set, retries stop at once.

        Raises:
            TrainctlError: raised by ``fn`` itself, unchanged.
            StoreError: anything else, as one line saying what to do.
        """
        try:
            return self.retry.call(fn, what=what, stop=stop)
        except TrainctlError:
            raise
        except Exception as exc:
            raise explain_store_error(exc, self.url, action) from exc

    # ----------------------------------------------------------------- small objects
    def write(self, rel: str, data: bytes, *, create_only: bool = False, stop: threading.Event | None = None) -> None:
        """Write one object atomically: readers see the old content or the new, never a mix.

        With ``create_only`` the write fails rather than replace an existing object (S3 checks
        this on the server with ``If-None-Match``; local files with link(2)). An object already
        there with exactly ``data`` counts as success: a create whose reply was lost (within this
        call's retries or in an earlier call that the caller repeats) finds its own content.

        Raises:
            ConflictError: ``create_only`` and another writer's object is there (left as it was).
            StoreError: the store cannot be written.
        """
        path = self.path(rel)

        def write() -> None:
            try:
                self._write_bytes(path, data, create_only)
            except FileExistsError:
                if self._read_bytes(path) == data:
                    return  # our own earlier attempt landed (its reply was lost)
                raise ConflictError(f"{self.url_of(rel)} already exists; not overwritten") from None

        self.call(write, what=f"write {self.url_of(rel)}", action="write to", stop=stop)

    def read(self, rel: str, *, action: str = "read") -> bytes | None:
        """The object's content, or None when there is none (``action`` words the error)."""
        path = self.path(rel)

        def read() -> bytes | None:
            try:
                return self._read_bytes(path)
            except FileNotFoundError:
                return None

        return self.call(read, what=f"read {self.url_of(rel)}", action=action)

    def exists(self, rel: str) -> bool:
        path = self.path(rel)

        def exists() -> bool:
            self.fs.invalidate_cache(path)
            return bool(self.fs.exists(path))

        return self.call(exists, what=f"check {self.url_of(rel)}", action="read")

    def delete(self, rel: str) -> bool:
        """Delete one object; returns whether it was there (deleting is idempotent)."""
        path = self.path(rel)

        def delete() -> bool:
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                return False
            finally:
                self.fs.invalidate_cache(path)
            return True

        return self.call(delete, what=f"delete {self.url_of(rel)}", action="delete from")

    def delete_folder(self, rel: str) -> int:
        """Delete every object below ``rel`` (and, on local disks, the emptied folders)."""
        members = self.find(rel)
        for member in members:
            self.delete(f"{rel}/{member}")
        if self.is_local:
            folder = Path(self.path(rel))
            for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
                _rmdir_if_empty(sub)
            _rmdir_if_empty(folder)
        self.forget_listings(rel)
        return len(members)

    # ----------------------------------------------------------------- listings
    def list_sizes(self, rel_dir: str = "", pattern: str = "*") -> dict[str, int]:
        """Name -> size of the objects directly in ``rel_dir`` whose name matches ``pattern``."""
        base = self.path(rel_dir)

        def listing() -> dict[str, int]:
            self.forget_listings(rel_dir)
            try:
                found = self.fs.glob(f"{base}/{pattern}", detail=True)
            except FileNotFoundError:
                found = {}
            if not found:
                self._check_bucket()
            return {
                _name(p): int(info.get("size") or 0)
                for p, info in found.items()
                if info.get("type") != "directory" and _parent(p) == base
            }

        return self.call(listing, what=f"list {self.url_of(rel_dir)}", action="list")

    def find(self, rel_dir: str = "") -> list[str]:
        """Every object below ``rel_dir``, as paths relative to it, sorted."""
        base = self.path(rel_dir)

        def find() -> list[str]:
            self.forget_listings(rel_dir)
            try:
                found = self.fs.find(base)
            except FileNotFoundError:
                found = []
            if not found:
                self._check_bucket()
            return sorted(p[len(base) + 1 :] for p in found if p.startswith(base + "/"))

        return self.call(find, what=f"list {self.url_of(rel_dir)}", action="list")

    def glob(self, pattern: str) -> list[str]:
        """Objects whose path relative to this prefix matches ``pattern``, sorted."""
        base = self.path()

        def glob() -> list[str]:
            self.forget_listings()
            try:
                found = self.fs.glob(f"{base}/{pattern}")
            except FileNotFoundError:
                found = []
            if not found:
                self._check_bucket()
            return sorted(p[len(base) + 1 :] for p in found if p.startswith(base + "/"))

        return self.call(glob, what=f"list {self.url_of(pattern)}", action="list")

    def read_many(self, rels: Iterable[str], *, action: str = "read") -> dict[str, bytes]:
        """Several objects at once (rel -> content); those that vanished meanwhile are left out."""
        paths = {self.path(rel): rel for rel in rels}
        if not paths:
            return {}

        def read() -> dict[str, bytes]:
            for p in paths:
                self.fs.invalidate_cache(p)
            raw = self.fs.cat(list(paths), on_error="omit")
            return {paths[p]: data for p, data in raw.items() if p in paths}

        return self.call(read, what=f"read {len(paths)} objects in {self.url}", action=action)

    def read_new(
        self, rel_dir: str, pattern: str = "*", skip: Iterable[str] = (), action: str = "read"
    ) -> list[tuple[str, bytes]]:
        """Objects directly in ``rel_dir`` matching ``pattern``, not named in ``skip``, as
        (name, content) in name order. For immutable, append-only series (log chunks, metrics)."""
        known = set(skip)
        names = [n for n in sorted(self.list_sizes(rel_dir, pattern)) if n not in known]
        raw = self.read_many([f"{rel_dir}/{n}" if rel_dir else n for n in names], action=action)
        return [(_name(rel), raw[rel]) for rel in sorted(raw, key=_name)]

    def modified(self, rel: str) -> datetime:
        """When the object was last written (UTC)."""
        path = self.path(rel)

        def modified() -> datetime:
            self.fs.invalidate_cache(path)  # an object rewritten since it was listed: not the listed time
            when = self.fs.modified(path)
            return when if when.tzinfo else when.replace(tzinfo=timezone.utc)

        return self.call(modified, what=f"stat {self.url_of(rel)}", action="read")

    # ----------------------------------------------------------------- files
    def upload(
        self,
        local: str | os.PathLike[str],
        rel: str,
        *,
        size: int | None = None,
        callback: Callback | None = None,
        stop: threading.Event | None = None,
    ) -> int:
        """Upload a local file to ``rel`` (multipart on S3) and check the stored size.

        For data objects that a later create-only write commits (a checkpoint's manifest): on a
        local disk the file is copied in place, so readers must go by the commit object.

        Returns the stored size. Raises:
            IntegrityError: the stored object's size differs from ``size`` (or the file's).
            StoreError: the upload failed for good.
        """
        remote = self.path(rel)
        expected = os.path.getsize(local) if size is None else size
        kwargs: dict[str, Any] = {}
        if self._is_s3:
            kwargs = {"max_concurrency": self.max_concurrency, "chunksize": self.part_size}

        def put() -> None:
            if self.is_local:
                make_private_dir(os.path.dirname(remote))
            self.fs.put_file(os.fspath(local), remote, callback=callback or NoOpCallback(), **kwargs)
            if self.is_local:
                os.chmod(remote, PRIVATE_FILE_MODE)

        self.call(put, what=f"upload {self.url_of(rel)}", action="write to", stop=stop)

        def stat() -> int:
            self.fs.invalidate_cache(remote)
            return int(self.fs.info(remote)["size"])

        stored = self.call(stat, what=f"stat {self.url_of(rel)}", action="read", stop=stop)
        if stored != expected:
            raise IntegrityError(f"uploaded {self.url_of(rel)} has {stored} bytes, expected {expected}; the upload was cut short")
        return stored

    def uploader_spec(self) -> dict[str, Any]:
        """What an uploader process needs to open this store (credentials included: for its socket only)."""
        return {
            "url": self.url,
            "storage_options": self._storage_options,
            "max_concurrency": self.max_concurrency,
            "part_size": self.part_size,
        }

    def upload_hashed(
        self,
        local: str | os.PathLike[str],
        rel: str,
        *,
        size: int | None,
        callback: Callback | None = None,
        stop: threading.Event | None = None,
        growth: Growing | None = None,
    ) -> tuple[str, int]:
        """Upload a local file to ``rel``, hashing its bytes as they are read, in one pass.

        For files nothing else writes (a checkpoint's private handle, ``/proc/self/fd/N``): the
        SHA-256 returned is over exactly the bytes sent. On S3 the parts go up in parallel
        (``max_concurrency`` at once, ``part_size`` each); other backends, and wrapped
        filesystems, upload with fsspec and hash in a separate pass.

        Args:
            size: the file's size; None with ``growth``.
            growth: the file is still being written (append-only): on S3 and local disks it is
                uploaded as it grows, elsewhere once written. Its size is known when it ends.

        Returns:
            (SHA-256, size). Raises:
            IntegrityError: the stored object's size differs from the file's.
            StoreError: the upload failed for good, or the write that ``growth`` follows failed.
        """
        if can_transfer(self.fs) is None:
            if growth is not None:
                growth.wait_committed()
                size = os.path.getsize(local)
            assert size is not None
            digest, _ = sha256_file(local)
            self.upload(local, rel, size=size, callback=callback, stop=stop)
            return digest, size
        remote = self.path(rel)
        expected = size if size is not None else growth.expected if growth is not None else 0
        if size is None and growth is None:
            raise ValueError("upload_hashed needs size or growth")

        def put() -> tuple[str, int]:
            if callback is not None:
                callback.set_size(expected)
            if self.is_local:
                make_private_dir(os.path.dirname(remote))
            fd = os.open(local, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if self.uploader is not None and can_transfer(self.fs) == "s3":
                    result = self.uploader.upload(self.uploader_spec(), fd, remote, size, stop=stop, growth=growth)
                    self.fs.invalidate_cache(remote)
                    if callback is not None:
                        callback.relative_update(result[1])
                    return result
                return upload_hashed(
                    self.fs,
                    fd,
                    remote,
                    size,
                    concurrency=self.max_concurrency,
                    part_size=self.part_size,
                    progress=None if callback is None else callback.relative_update,
                    stop=stop,
                    growth=growth,
                )
            finally:
                os.close(fd)

        digest, sent = self.call(put, what=f"upload {self.url_of(rel)}", action="write to", stop=stop)
        if size is not None and sent != size:
            raise IntegrityError(f"read {sent} bytes of {local} to upload to {self.url_of(rel)}, expected {size}")

        def stat() -> int:
            self.fs.invalidate_cache(remote)
            return int(self.fs.info(remote)["size"])

        stored = self.call(stat, what=f"stat {self.url_of(rel)}", action="read", stop=stop)
        if stored != sent:
            raise IntegrityError(f"uploaded {self.url_of(rel)} has {stored} bytes, expected {sent}; the upload was cut short")
        return digest, sent

    def download(
        self,
        rel: str,
        target: str | os.PathLike[str],
        *,
        size: int,
        sha256: str,
        label: str = "",
        callback: Callback | None = None,
        mode: int | None = None,
    ) -> int:
        """Download ``rel`` to ``target``, verified against ``size`` and ``sha256`` before it is
        renamed into place: a corrupt or cut-short download leaves nothing behind.

        Args:
            label: what the object is, for error lines (default: its URL).
            mode: permission bits for the file.

        Returns the bytes downloaded. Raises:
            IntegrityError: the object is missing, truncated or corrupt; the message names it.
            StoreError: the store cannot be read.
        """
        remote = self.path(rel)
        url = self.url_of(rel)
        label = label or url
        with atomic_file(target, mode) as tmp:
            if can_transfer(self.fs) is None:  # another backend (or a wrapped one): fsspec, then a hashing pass

                def get() -> None:
                    try:
                        self.fs.get_file(remote, str(tmp), callback=callback or NoOpCallback())
                    except FileNotFoundError:
                        raise IntegrityError(f"{label}: {url} is missing from the store") from None

                self.call(get, what=f"download {url}", action="download")
                digest, got = sha256_file(tmp)
            else:
                digest, got = self.call(
                    lambda: self._download_verified(remote, tmp, size, label, url, callback),
                    what=f"download {url}",
                    action="download",
                )
            check_content(label, url, got, digest, size, sha256)
        return got

    def _download_verified(
        self, remote: str, tmp: Path, size: int, label: str, url: str, callback: Callback | None
    ) -> tuple[str, int]:
        """One attempt of a parallel ranged download into ``tmp``, hashed in order as ranges arrive."""
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            return download_verified(
                self.fs,
                remote,
                fd,
                size,
                concurrency=self.max_concurrency,
                part_size=self.part_size,
                progress=None if callback is None else callback.relative_update,
            )
        except FileNotFoundError:
            raise IntegrityError(f"{label}: {url} is missing from the store") from None
        finally:
            os.close(fd)

    def digest(self, rel: str, *, label: str = "", callback: Callback | None = None) -> tuple[str, int]:
        """SHA-256 and size of an object, read through from the store (nothing kept locally).

        Raises:
            IntegrityError: the object is missing.
        """
        remote = self.path(rel)
        url = self.url_of(rel)

        def digest_remote() -> tuple[str, int]:
            digest, size = hashlib.sha256(), 0
            try:
                with self.fs.open(remote, "rb", block_size=HASH_CHUNK) as f:
                    while chunk := f.read(HASH_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        if callback is not None:
                            callback.relative_update(len(chunk))
            except FileNotFoundError:
                raise IntegrityError(f"{label or url}: {url} is missing from the store") from None
            return digest.hexdigest(), size

        return self.call(digest_remote, what=f"read {url}", action="read")

    # ----------------------------------------------------------------- preflight
    def check_writable(self) -> None:
        """Write and delete a small probe object, turning every failure into one clear line.

        Raises:
            StoreError: missing bucket or directory, no credentials, no permission, unreachable.
        """
        probe = f".trainctl-probe-{uuid.uuid4().hex[:12]}"
        self.write(probe, b"trainctl write probe\n")
        self.delete(probe)

    def _check_bucket(self) -> None:
        """An empty listing is an empty run, unless the bucket itself is missing: S3 answers both with
        nothing, so ask once per store whether the bucket exists (a typo must not read as "no checkpoints")."""
        if not self._is_s3 or self._bucket_seen:
            return
        bucket = self.root.split("/", 1)[0]
        self.fs.invalidate_cache(bucket)
        if not self.fs.exists(bucket):
            raise StoreError(
                f"bucket {bucket!r} of {self.url} does not exist (or these credentials cannot see it): fix the store URL, "
                f"or create the bucket first"
            )
        self._bucket_seen = True

    # ----------------------------------------------------------------- backend primitives
    def _read_bytes(self, path: str) -> bytes:
        self.fs.invalidate_cache(path)
        return bytes(self.fs.cat_file(path))

    def _write_bytes(self, path: str, data: bytes, create_only: bool) -> None:
        """Write a small object; with ``create_only``, fail with FileExistsError rather than replace.

        On S3 (and S3-compatible stores that honour ``If-None-Match``) the check is done by the
        server; locally by link(2), which is atomic; elsewhere fsspec checks then writes.
        """
        if self.is_local:  # private to the user: folders 0700, files 0600 (create_exclusive's are)
            make_private_dir(os.path.dirname(path))
            if create_only:
                create_exclusive(path, data)
            else:
                with atomic_file(path, PRIVATE_FILE_MODE) as tmp:
                    tmp.write_bytes(data)
            return
        self.fs.pipe_file(path, data, mode="create" if create_only else "overwrite")
        self.fs.invalidate_cache(path)


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0]


def _rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty (something new arrived) or already gone: both fine


def explain_store_error(exc: BaseException, url: str, action: str) -> StoreError:
    """Turn a backend exception into a one-line StoreError that says what to do."""
    if isinstance(exc, StoreError):
        return exc
    chain = exception_chain(exc)
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain)
    if names & {"NoCredentialsError", "PartialCredentialsError"}:
        return StoreError(
            f"no credentials to {action} {url}: set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "(or pass storage_options)"
        )
    if "NoSuchBucket" in text or ("bucket" in text.lower() and any(isinstance(e, FileNotFoundError) for e in chain)):
        return StoreError(f"bucket of {url} does not exist: create it first or fix the URL")
    if any(isinstance(e, PermissionError) for e in chain):
        return StoreError(f"permission denied to {action} {url}: check the credentials' access or the path's permissions")
    if any(isinstance(e, FileNotFoundError) for e in chain):
        return StoreError(f"cannot {action} {url}: the location does not exist ({exc}); create it or fix the URL")
    if names & {"EndpointConnectionError", "ClientConnectorError", "ConnectTimeoutError"} or any(
        isinstance(e, ConnectionError) for e in chain
    ):
        return StoreError(f"cannot reach the storage endpoint to {action} {url}: {exc}")
    return StoreError(f"cannot {action} {url}: {type(exc).__name__}: {exc}")
