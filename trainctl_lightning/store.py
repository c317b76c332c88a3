"""The run store: one object-store prefix that holds everything about one training run.

It is the contract between the machine that launches and the machine that trains, and between
a run and its later restarts. Any fsspec URL works (``s3://bucket/prefix``, ``file:///path``,
``memory://name``, ...). The layout, documented in ``docs/run-store.md``::

    <run url>/
      checkpoints/
        <checkpoint id>/          one published checkpoint, immutable once its manifest exists
          <file name>             data object(s), uploaded first
          MANIFEST.json           written last, create-only; without it the checkpoint does not exist
      metrics/<start>-<session>-<seq>.jsonl   immutable metric segments (MetricsReporter)
      status.json                 live status, rewritten every few seconds

Checkpoint ids are ``<global step, 10 digits>-<name stem>-<8 hex>``: they sort by step, say what
they hold, and are never reused, so a restarted run writing to the same URL can never overwrite
what an earlier attempt published.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Union

import fsspec
from fsspec.callbacks import Callback, NoOpCallback

from trainctl_lightning.errors import (
    CheckpointNotFoundError,
    ConfigError,
    ConflictError,
    IntegrityError,
    StoreError,
)
from trainctl_lightning.manifest import MANIFEST_NAME, CheckpointManifest, FileEntry, utc_now
from trainctl_lightning.retry import RetryPolicy, exception_chain

log = logging.getLogger(__name__)

#: Set by the trainctl agent on an instance: the run's store URL, used when none is given.
RUN_URL_ENV = "TRAINCTL_RUN_URL"
CHECKPOINTS_DIR = "checkpoints"
METRICS_DIR = "metrics"
STATUS_NAME = "status.json"
#: Written by ``trainctl launch`` (trainctl_lightning.jobs); listed here so runs without metrics show up.
JOB_NAME = "job.json"
LocalFile = Union[str, "os.PathLike[str]", tuple[str, str]]
_HASH_CHUNK = 8 * 2**20
_ID_SAFE = re.compile(r"[^A-Za-z0-9=._+-]+")


def package_version() -> str:
    from trainctl_lightning import __version__

    return __version__


def sha256_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """Hex SHA-256 and size of a local file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


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


class RunStore:
    """One run's place in object storage.

    Args:
        url: fsspec URL of the run, e.g. ``s3://bucket/runs/exp1`` or ``file:///data/runs/exp1``.
            A plain path is taken as a local directory.
        storage_options: passed to the fsspec filesystem (credentials, ``endpoint_url``, ...);
            never logged or written anywhere.
        retry: how long to ride out transient errors on each object operation.
        max_concurrency: concurrent multipart parts per file on backends that support it (S3).
        part_size: multipart part size in bytes on S3.

    Raises:
        ConfigError: the URL's protocol is unknown or its package is missing.

    Example::

        store = RunStore("s3://my-bucket/runs/exp1")
        latest = store.latest_checkpoint()
        if latest:
            path = store.download_checkpoint(latest, "/tmp/ckpts")
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
        self.fs, root = fsspec.core.url_to_fs(url, **self._storage_options)
        self.root = root.rstrip("/") or "/"
        self.url = self.fs.unstrip_protocol(self.root) if self.protocol != "file" else f"file://{self.root}"
        self.retry = retry or RetryPolicy()
        self.max_concurrency = max_concurrency
        self.part_size = part_size
        self._is_local = "file" in _protocols(self.fs) or "local" in _protocols(self.fs)
        self._is_s3 = bool({"s3", "s3a"} & set(_protocols(self.fs)))

    def __repr__(self) -> str:  # storage_options may hold secrets: never shown
        return f"RunStore({self.url!r})"

    def forget_listings(self, path: str) -> None:
        """Drop what the filesystem cached about ``path`` and everything below it.

        fsspec's ``invalidate_cache(path)`` drops ``path`` and its parents only (s3fs), so a
        folder listed while an upload was under way (data there, manifest not yet) would be read
        from the cache forever by a long-lived reader; listing code calls this instead.
        """
        self.fs.invalidate_cache(path)
        cache = getattr(self.fs, "dircache", None)
        if cache:
            prefix = path.rstrip("/") + "/"
            for key in [k for k in list(cache) if isinstance(k, str) and k.startswith(prefix)]:
                cache.pop(key, None)

    # ----------------------------------------------------------------- layout
    def path(self, *parts: str) -> str:
        """Backend path of an object inside this run (never outside it)."""
        rel = "/".join(p.strip("/") for p in parts if p)
        if ".." in rel.split("/"):
            raise ConfigError(f"refusing a store path that leaves the run: {rel!r}")
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, *parts: str) -> str:
        p = self.path(*parts)
        return f"file://{p}" if self._is_local else self.fs.unstrip_protocol(p)

    @staticmethod
    def new_checkpoint_id(name: str, global_step: int | None) -> str:
        """A fresh, never-reused checkpoint id that sorts by step and says what it holds."""
        stem = _ID_SAFE.sub("_", Path(name).name.removesuffix(".ckpt")) or "checkpoint"
        step = global_step if global_step is not None and global_step >= 0 else 0
        return f"{step:010d}-{stem[:80]}-{uuid.uuid4().hex[:8]}"

    # ------------------------------------------------------------ preflight
    def check_writable(self) -> None:
        """Write and delete a small probe object, turning every failure into one clear line.

        Raises:
            StoreError: missing bucket or directory, no credentials, no permission, unreachable.
        """
        probe = self.path(f".trainctl-probe-{uuid.uuid4().hex[:12]}")
        try:
            self._write_bytes(probe, b"trainctl write probe\n")
            self.fs.rm_file(probe)
        except Exception as exc:
            raise explain_store_error(exc, self.url, "write to") from exc

    # ------------------------------------------------------------ publishing
    def publish_checkpoint(
        self,
        files: Iterable[LocalFile],
        *,
        name: str | None = None,
        epoch: int | None = None,
        global_step: int | None = None,
        created_at: str | None = None,
        monitor: str | None = None,
        monitor_value: float | None = None,
        metrics: dict[str, float] | None = None,
        source: dict[str, Any] | None = None,
        checkpoint_id: str | None = None,
        callback: Callback | None = None,
        stop: Any = None,
        verify_unchanged: bool = True,
    ) -> CheckpointManifest:
        """Upload local checkpoint files as one checkpoint: data objects first, manifest last.

        Args:
            files: local files that make up the checkpoint (usually one ``.ckpt``); a directory
                is published with every file below it; a ``(local path, name in store)`` pair
                uploads a file under another name.
            name: checkpoint name; defaults to the first file's name.
            epoch, global_step, monitor, monitor_value, metrics: recorded in the manifest.
            created_at: when the checkpoint was taken (defaults to now).
            source: informational fields (host, pid, local path).
            checkpoint_id: publish under this id instead of a fresh one; it must not exist yet.
            callback: fsspec callback told about bytes as they go up (progress display).
            stop: a ``threading.Event`` that aborts retries when set.
            verify_unchanged: hash each local file again after its upload and refuse to publish
                if it changed meanwhile (skip only for files nothing else can write).

        Returns:
            The manifest as written.

        Raises:
            StoreError: the upload failed for good (after retries for transient errors).
            IntegrityError: a local file changed while it was being uploaded.
        """
        entries = _expand_local(files)
        if not entries:
            raise ConfigError("publish_checkpoint needs at least one local file")
        name = name or Path(entries[0][1]).name
        ckpt_id = checkpoint_id or self.new_checkpoint_id(name, global_step)
        base = self.path(CHECKPOINTS_DIR, ckpt_id)
        if checkpoint_id is not None and self.fs.exists(f"{base}/{MANIFEST_NAME}"):
            # Generated ids are never reused; a caller-chosen one must not clobber data either.
            raise ConflictError(
                f"checkpoint {ckpt_id} already exists in {self.url}; it was not overwritten (use a new id)"
            )
        try:
            manifest_files = self._upload_entries(entries, base, ckpt_id, callback, stop, verify_unchanged)
            manifest = CheckpointManifest(
                id=ckpt_id,
                name=name,
                epoch=epoch,
                global_step=global_step,
                created_at=created_at or utc_now(),
                files=tuple(manifest_files),
                package_version=package_version(),
                monitor=monitor,
                monitor_value=monitor_value,
                metrics=dict(metrics or {}),
                source={"host": socket.gethostname(), "pid": os.getpid(), **(source or {})},
            )
            self._write_manifest(manifest, stop)
        except ConflictError:
            raise  # the objects there belong to the manifest that won; leave them alone
        except BaseException:
            self._discard_unpublished(base, [rel for _, rel in entries])
            raise
        return manifest

    def _upload_entries(
        self,
        entries: list[tuple[str, str]],
        base: str,
        ckpt_id: str,
        callback: Callback | None,
        stop: Any,
        verify_unchanged: bool,
    ) -> list[FileEntry]:
        manifest_files: list[FileEntry] = []
        for local, rel in entries:
            digest, size = sha256_file(local)
            remote = f"{base}/{rel}"
            self.retry.call(
                lambda: self._upload_file(local, remote, callback),
                what=f"upload {self.fs.unstrip_protocol(remote)}",
                stop=stop,
            )
            remote_size = self.retry.call(lambda: self._remote_size(remote), what=f"stat {remote}", stop=stop)
            if remote_size != size:
                raise IntegrityError(
                    f"uploaded {self.fs.unstrip_protocol(remote)} has {remote_size} bytes, expected {size}; "
                    "the upload was cut short, it will not be published"
                )
            if verify_unchanged and sha256_file(local)[0] != digest:
                raise IntegrityError(
                    f"local file {local} changed while it was uploaded; not publishing {ckpt_id}. "
                    "Checkpoint files must not be modified in place while CheckpointSync uploads them"
                )
            manifest_files.append(FileEntry(path=rel, size=size, sha256=digest))
        return manifest_files

    def _discard_unpublished(self, base: str, rels: list[str]) -> None:
        """Best effort: remove data objects of a checkpoint whose manifest was never written.

        They are invisible to readers either way; this only saves space.
        """
        for rel in rels:
            try:
                self.fs.rm_file(f"{base}/{rel}")
            except Exception as exc:  # the store may be the very thing that is failing
                log.debug("could not remove unpublished object %s/%s: %s", base, rel, exc)

    def _write_manifest(self, manifest: CheckpointManifest, stop: Any) -> None:
        path = self.path(CHECKPOINTS_DIR, manifest.id, MANIFEST_NAME)
        data = manifest.to_json()
        attempts = 0

        def write() -> None:
            nonlocal attempts
            attempts += 1
            try:
                self._write_bytes(path, data, create_only=True)
            except FileExistsError:
                # A retried create whose first attempt landed but whose reply was lost.
                if attempts > 1 and self.fs.cat_file(path) == data:
                    return
                raise ConflictError(
                    f"{self.fs.unstrip_protocol(path)} already exists; another writer published "
                    f"checkpoint {manifest.id} and it was not overwritten"
                ) from None

        self.retry.call(write, what=f"write manifest {self.fs.unstrip_protocol(path)}", stop=stop)

    def _upload_file(self, local: str, remote: str, callback: Callback | None) -> None:
        kwargs: dict[str, Any] = {}
        if self._is_s3:
            kwargs = {"max_concurrency": self.max_concurrency, "chunksize": self.part_size}
        if self._is_local:
            self.fs.makedirs(self.fs._parent(remote), exist_ok=True)
        self.fs.put_file(local, remote, callback=callback or NoOpCallback(), **kwargs)

    def _remote_size(self, remote: str) -> int:
        self.fs.invalidate_cache(remote)
        return int(self.fs.info(remote)["size"])

    def _write_bytes(self, path: str, data: bytes, create_only: bool = False) -> None:
        """Write a small object; with ``create_only``, fail with FileExistsError rather than replace.

        On S3 (and S3-compatible stores that honour ``If-None-Match``) the check is done by the
        server; locally by ``link(2)``, which is atomic; elsewhere fsspec checks then writes.
        """
        if self._is_local:
            parent = os.path.dirname(path)
            os.makedirs(parent, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                if create_only:
                    _link_exclusive(tmp, path, data)
                else:
                    os.replace(tmp, path)
                    tmp = ""
            finally:
                if tmp:
                    os.unlink(tmp)
            return
        self.fs.pipe_file(path, data, mode="create" if create_only else "overwrite")
        self.fs.invalidate_cache(path)

    # --------------------------------------------------------------- reading
    def list_checkpoints(self) -> list[CheckpointManifest]:
        """Every complete checkpoint, oldest first (by time taken, then step).

        Raises:
            StoreError: the store cannot be read.
        """
        base = self.path(CHECKPOINTS_DIR)

        def read() -> dict[str, bytes]:
            self.forget_listings(base)
            try:
                paths = self.fs.glob(f"{base}/*/{MANIFEST_NAME}")
            except FileNotFoundError:
                return {}
            if not paths:
                return {}
            return self.fs.cat(paths, on_error="omit")

        try:
            raw = self.retry.call(read, what=f"list {self.url_of(CHECKPOINTS_DIR)}")
        except Exception as exc:
            raise explain_store_error(exc, self.url, "list") from exc
        manifests = []
        for path, data in raw.items():
            try:
                m = CheckpointManifest.from_json(data, self.fs.unstrip_protocol(path))
            except IntegrityError as exc:
                log.warning("skipping unreadable checkpoint: %s", exc)
                continue
            folder = path.rstrip("/").split("/")[-2]
            if m.id != folder:
                log.warning("skipping %s: manifest id %r does not match its folder %r", path, m.id, folder)
                continue
            manifests.append(m)
        return sorted(manifests, key=CheckpointManifest.sort_key)

    def latest_checkpoint(self) -> CheckpointManifest | None:
        """The newest complete checkpoint (taken last; highest step on a tie), or None."""
        found = self.list_checkpoints()
        return found[-1] if found else None

    def get_checkpoint(self, ref: str | None = None) -> CheckpointManifest:
        """Look a checkpoint up by id, by name (newest with that name), or ``None``/"latest".

        Raises:
            CheckpointNotFoundError: nothing matches; the message lists what exists.
        """
        found = self.list_checkpoints()
        if not found:
            raise CheckpointNotFoundError(f"no complete checkpoint in {self.url}")
        if ref is None or ref == "latest":
            return found[-1]
        for m in found:
            if m.id == ref:
                return m
        named = [m for m in found if m.name == ref or m.name.removesuffix(".ckpt") == ref]
        if named:
            return named[-1]
        names = sorted({m.name for m in found})
        raise CheckpointNotFoundError(
            f"no checkpoint named or with id {ref!r} in {self.url}; names there: {', '.join(names[:10])}"
            + (" ..." if len(names) > 10 else "")
        )

    def download_checkpoint(
        self,
        manifest: CheckpointManifest,
        dest: str | os.PathLike[str],
        callback: Callback | None = None,
    ) -> Path:
        """Download a checkpoint into ``dest`` and verify every object against the manifest.

        Files land in ``dest`` under their manifest paths, each written to a temporary name and
        renamed only once its size and checksum match, so a corrupt download leaves nothing
        behind. Files already present with the right checksum are not downloaded again.

        Returns:
            The local path to pass to ``trainer.fit(ckpt_path=...)``: the file for a one-file
            checkpoint, else ``dest``.

        Raises:
            IntegrityError: an object is corrupt or truncated; the message names it.
            StoreError: the store cannot be read.
        """
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        base = self.path(CHECKPOINTS_DIR, manifest.id)
        for entry in manifest.files:
            target = dest / entry.path
            if target.is_file() and target.stat().st_size == entry.size and sha256_file(target)[0] == entry.sha256:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            remote = f"{base}/{entry.path}"
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
            try:
                try:
                    self.retry.call(
                        lambda: self.fs.get_file(remote, str(tmp), callback=callback or NoOpCallback()),
                        what=f"download {self.fs.unstrip_protocol(remote)}",
                    )
                except FileNotFoundError:
                    raise IntegrityError(
                        f"{self.fs.unstrip_protocol(remote)} is listed in checkpoint {manifest.id}'s manifest "
                        "but missing from the store"
                    ) from None
                except Exception as exc:
                    raise explain_store_error(exc, self.fs.unstrip_protocol(remote), "download") from exc
                digest, size = sha256_file(tmp)
                _check_entry(self.fs.unstrip_protocol(remote), entry, digest, size)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        if len(manifest.files) == 1:
            return dest / manifest.files[0].path
        return dest

    def verify_checkpoint(self, manifest: CheckpointManifest, callback: Callback | None = None) -> None:
        """Read every object of a checkpoint from the store and check size and checksum.

        Raises:
            IntegrityError: an object is missing, corrupt or truncated; the message names it.
        """
        base = self.path(CHECKPOINTS_DIR, manifest.id)
        for entry in manifest.files:
            remote = f"{base}/{entry.path}"

            def digest_remote() -> tuple[str, int]:
                digest, size = hashlib.sha256(), 0
                with self.fs.open(remote, "rb", block_size=_HASH_CHUNK) as f:
                    while chunk := f.read(_HASH_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        if callback is not None:
                            callback.relative_update(len(chunk))
                return digest.hexdigest(), size

            try:
                digest, size = self.retry.call(digest_remote, what=f"read {self.fs.unstrip_protocol(remote)}")
            except FileNotFoundError:
                raise IntegrityError(
                    f"{self.fs.unstrip_protocol(remote)} is listed in checkpoint {manifest.id}'s manifest "
                    "but missing from the store"
                ) from None
            _check_entry(self.fs.unstrip_protocol(remote), entry, digest, size)

    def find_orphans(self, older_than_s: float = 3600.0) -> list[str]:
        """Checkpoint folders with data objects but no manifest, untouched for ``older_than_s``.

        A writer killed mid-upload leaves these behind. Readers never see them; they only take
        space. The age limit keeps uploads that are still in flight out of the list.

        Returns:
            Checkpoint ids (folder names under ``checkpoints/``), oldest first.
        """
        base = self.path(CHECKPOINTS_DIR)

        def scan() -> list[tuple[datetime, str]]:
            self.forget_listings(base)
            try:
                files = self.fs.find(base)
            except FileNotFoundError:
                return []
            folders: dict[str, list[str]] = {}
            for f in files:
                rel = f[len(base) + 1 :] if f.startswith(base + "/") else ""
                if "/" in rel:
                    folders.setdefault(rel.split("/", 1)[0], []).append(f)
            now = datetime.now(timezone.utc)
            found = []
            for ckpt_id, members in folders.items():
                if any(m.rsplit("/", 1)[-1] == MANIFEST_NAME for m in members):
                    continue
                newest = max(_modified(self.fs, m) for m in members)
                if (now - newest).total_seconds() >= older_than_s:
                    found.append((newest, ckpt_id))
            return sorted(found)

        try:
            return [ckpt_id for _, ckpt_id in self.retry.call(scan, what=f"scan {self.url_of(CHECKPOINTS_DIR)}")]
        except Exception as exc:
            raise explain_store_error(exc, self.url, "scan") from exc

    def delete_orphan(self, ckpt_id: str) -> int:
        """Delete the data objects of a checkpoint that has no manifest; returns how many.

        Raises:
            ConflictError: the checkpoint has a manifest (it is complete: use delete_checkpoint).
        """
        folder = self.path(CHECKPOINTS_DIR, ckpt_id)
        if not ckpt_id or "/" in ckpt_id:
            raise ConfigError(f"refusing to delete checkpoint folder with unsafe id {ckpt_id!r}")
        if self.fs.exists(f"{folder}/{MANIFEST_NAME}"):
            raise ConflictError(f"checkpoint {ckpt_id} is complete (it has a manifest); not deleting it as an orphan")
        members = self.fs.find(folder)
        for member in members:
            self.retry.call(lambda: self.fs.rm_file(member), what=f"delete {self.fs.unstrip_protocol(member)}")
        if self._is_local:
            shutil.rmtree(folder, ignore_errors=True)
        self.fs.invalidate_cache(folder)
        return len(members)

    # ------------------------------------------------------ metrics and status
    def write_metrics_segment(self, name: str, data: bytes) -> None:
        """Add one immutable metrics segment (JSON Lines) under ``metrics/``, create-only.

        Object stores cannot append, so a writer adds segments; names carry the writer's start
        time and session, so segments list in the order they were written and never collide.

        Raises:
            ConflictError: a segment of that name exists (it is left as it was).
        """
        if "/" in name or not name.endswith(".jsonl"):
            raise ConfigError(f"metrics segment name must be a plain '*.jsonl' file name, got {name!r}")
        path = self.path(METRICS_DIR, name)
        try:
            self.retry.call(lambda: self._write_bytes(path, data, create_only=True), what=f"write {self.url_of(METRICS_DIR, name)}")
        except FileExistsError:
            raise ConflictError(f"metrics segment {self.url_of(METRICS_DIR, name)} already exists; not overwritten") from None

    def read_metrics_segments(self, skip: Iterable[str] = ()) -> list[tuple[str, bytes]]:
        """Metrics segments as (name, content), in name order (= order written).

        Args:
            skip: names already read; segments never change, so a follower fetches only new ones.
        """
        return self.read_new_objects(METRICS_DIR, "*.jsonl", skip, action="read metrics from")

    def write_status(self, data: bytes) -> None:
        """Replace the run's ``status.json`` (the one object a live run keeps rewriting)."""
        path = self.path(STATUS_NAME)
        self.retry.call(lambda: self._write_bytes(path, data), what=f"write {self.url_of(STATUS_NAME)}")

    def read_status(self) -> bytes | None:
        """The run's ``status.json``, or None when the run never reported one."""
        return self.read_object(STATUS_NAME, action="read the status of")

    # ----------------------------------------------------- small named objects
    def write_object(self, rel: str, data: bytes, create_only: bool = False) -> None:
        """Write one small object at ``<run>/<rel>`` (job spec, job state, a log chunk, ...).

        Raises:
            ConflictError: ``create_only`` and the object exists (it is left as it was).
            StoreError: the store cannot be written.
        """
        path = self.path(rel)
        try:
            self.retry.call(lambda: self._write_bytes(path, data, create_only=create_only), what=f"write {self.url_of(rel)}")
        except FileExistsError:
            raise ConflictError(f"{self.url_of(rel)} already exists; not overwritten") from None
        except Exception as exc:
            raise explain_store_error(exc, self.url, "write to") from exc

    def read_object(self, rel: str, action: str = "read") -> bytes | None:
        """The object at ``<run>/<rel>``, or None when there is none (``action`` words the error)."""
        path = self.path(rel)

        def read() -> bytes | None:
            self.fs.invalidate_cache(path)
            try:
                return self.fs.cat_file(path)
            except FileNotFoundError:
                return None

        try:
            return self.retry.call(read, what=f"read {self.url_of(rel)}")
        except Exception as exc:
            raise explain_store_error(exc, self.url, action) from exc

    def exists(self, rel: str) -> bool:
        path = self.path(rel)
        self.fs.invalidate_cache(path)
        try:
            return bool(self.retry.call(lambda: self.fs.exists(path), what=f"check {self.url_of(rel)}"))
        except Exception as exc:
            raise explain_store_error(exc, self.url, "read") from exc

    def read_new_objects(
        self, rel_dir: str, pattern: str = "*", skip: Iterable[str] = (), action: str = "read"
    ) -> list[tuple[str, bytes]]:
        """Objects directly in ``<run>/<rel_dir>`` matching ``pattern``, not named in ``skip``,
        as (name, content) in name order. For immutable, append-only series (log chunks)."""
        base = self.path(rel_dir)
        known = set(skip)

        def read() -> dict[str, bytes]:
            self.forget_listings(base)
            try:
                paths = self.fs.glob(f"{base}/{pattern}")
            except FileNotFoundError:
                return {}
            paths = [p for p in paths if p.rstrip("/").rsplit("/", 1)[-1] not in known]
            return self.fs.cat(paths, on_error="omit") if paths else {}

        try:
            raw = self.retry.call(read, what=f"read {self.url_of(rel_dir)}")
        except Exception as exc:
            raise explain_store_error(exc, self.url, action) from exc
        return sorted(((p.rstrip("/").split("/")[-1], data) for p, data in raw.items()), key=lambda x: x[0])

    def delete_object(self, rel: str) -> None:
        path = self.path(rel)
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(path)

    def child_runs(self) -> list[str]:
        """URLs of runs directly below this prefix (folders with a job, a status or checkpoints)."""
        def find() -> list[str]:
            self.forget_listings(self.root)
            try:
                found = (
                    self.fs.glob(f"{self.root}/*/{STATUS_NAME}")
                    + self.fs.glob(f"{self.root}/*/{CHECKPOINTS_DIR}")
                    + self.fs.glob(f"{self.root}/*/{JOB_NAME}")
                )
            except FileNotFoundError:
                return []
            return sorted({p.rstrip("/").rsplit("/", 2)[-2] for p in found})

        try:
            names = self.retry.call(find, what=f"list runs in {self.url}")
        except Exception as exc:
            raise explain_store_error(exc, self.url, "list runs in") from exc
        return [self.url_of(name) for name in names]

    # --------------------------------------------------------------- deleting
    def delete_checkpoint(self, manifest: CheckpointManifest) -> None:
        """Delete a checkpoint: the manifest first (so it stops existing at once), then its data.

        Only objects inside this run's ``checkpoints/<id>/`` folder are ever touched.
        """
        folder = self.path(CHECKPOINTS_DIR, manifest.id)
        if not manifest.id or "/" in manifest.id or not folder.startswith(self.path(CHECKPOINTS_DIR) + "/"):
            raise ConfigError(f"refusing to delete checkpoint with unsafe id {manifest.id!r}")
        targets = [f"{folder}/{MANIFEST_NAME}"] + [f"{folder}/{e.path}" for e in manifest.files]
        for target in targets:
            try:
                self.retry.call(lambda: self.fs.rm_file(target), what=f"delete {self.fs.unstrip_protocol(target)}")
            except FileNotFoundError:
                pass  # already gone: deleting is idempotent
        if self._is_local:
            shutil.rmtree(folder, ignore_errors=True)
        self.fs.invalidate_cache(folder)


def _modified(fs: fsspec.AbstractFileSystem, path: str) -> datetime:
    when = fs.modified(path)
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _check_entry(where: str, entry: FileEntry, digest: str, size: int) -> None:
    if size != entry.size:
        raise IntegrityError(
            f"{where} is {size} bytes but its manifest says {entry.size}: the object is truncated or "
            "was replaced; refusing it"
        )
    if digest != entry.sha256:
        raise IntegrityError(
            f"{where} fails its checksum (sha256 {digest[:12]}..., manifest says {entry.sha256[:12]}...): "
            "the object is corrupt; refusing it"
        )


def _link_exclusive(tmp: str, path: str, data: bytes) -> None:
    """Create ``path`` with ``tmp``'s content, failing with FileExistsError if it exists.

    link(2) is atomic and never exposes a half-written file; filesystems without hard links
    fall back to O_EXCL, which is still create-only.
    """
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        with open(path, "xb") as f:
            f.write(data)


def _expand_local(files: Iterable[LocalFile]) -> list[tuple[str, str]]:
    """(local path, path relative to the checkpoint folder) for files and directories."""
    out: list[tuple[str, str]] = []
    for item in files:
        if isinstance(item, tuple):
            local, rel = item
            if not Path(local).is_file():
                raise ConfigError(f"checkpoint file {str(local)!r} does not exist")
            out.append((str(local), rel))
            continue
        p = Path(item)
        if p.is_dir():
            for sub in sorted(q for q in p.rglob("*") if q.is_file()):
                out.append((str(sub), f"{p.name}/{sub.relative_to(p).as_posix()}"))
        elif p.is_file():
            out.append((str(p), p.name))
        else:
            raise ConfigError(f"checkpoint file {str(p)!r} does not exist")
    return out


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


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
