"""One run's checkpoints, metrics and status, built on the object layer.

A checkpoint is a folder of data objects plus ``MANIFEST.json``, written last and create-only:
without its manifest a checkpoint does not exist for any reader. Checkpoint ids are
``<global step, 10 digits>-<name stem>-<8 hex>``: they sort by step, say what they hold, and are
never reused, so a restarted run writing to the same URL can never overwrite what an earlier
attempt published. The layout is in :mod:`trainctl_lightning.store.layout` and
``docs/run-store.md``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import uuid
from collections.abc import Callable, Collection, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Union

from fsspec.callbacks import Callback

from trainctl_lightning.errors import (
    CheckpointNotFoundError,
    ConfigError,
    ConflictError,
    IntegrityError,
    StoreError,
)
from trainctl_lightning.retry import RetryPolicy
from trainctl_lightning.store import layout
from trainctl_lightning.store.files import check_content, inside, safe_name, safe_relpath, sha256_file
from trainctl_lightning.store.manifest import CheckpointManifest, FileEntry
from trainctl_lightning.store.objects import ObjectStore
from trainctl_lightning.store.transfer import Growing
from trainctl_lightning.timeutil import utc_now

__all__ = ["LocalFile", "RunStore", "package_version", "run_urls_in"]

log = logging.getLogger(__name__)

LocalFile = Union[str, "os.PathLike[str]", tuple[str, str]]
"""A local checkpoint file, folder, or ``(local path, name in the store)`` pair."""
_ID_SAFE = re.compile(r"[^A-Za-z0-9=._+-]+")


def package_version() -> str:
    """The version of trainctl-lightning that writes (recorded in manifests and job specs)."""
    from trainctl_lightning import __version__

    return __version__


class RunStore:
    """One run's place in object storage: its checkpoints, metrics segments and live status.

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
        self.objects = ObjectStore(url, storage_options, retry=retry, max_concurrency=max_concurrency, part_size=part_size)
        """The run's objects (the primitives every method here is built on)."""
        self.url = self.objects.url

    def __repr__(self) -> str:  # storage_options may hold secrets: never shown
        return f"RunStore({self.url!r})"

    def url_of(self, *parts: str) -> str:
        """The URL of an object of this run."""
        return self.objects.url_of(*parts)

    def checkpoint_url(self, manifest: CheckpointManifest) -> str:
        """What to pass to ``ckpt_path``: the object of a one-file checkpoint, else its folder."""
        if manifest.sharded is not None:
            return self.url_of(layout.checkpoint_object(manifest.id, manifest.sharded["folder"]))
        if len(manifest.files) == 1:
            return self.url_of(layout.checkpoint_object(manifest.id, manifest.files[0].path))
        return self.url_of(layout.checkpoint_object(manifest.id))

    @staticmethod
    def new_checkpoint_id(name: str, global_step: int | None) -> str:
        """A fresh, never-reused checkpoint id that sorts by step and says what it holds."""
        stem = _ID_SAFE.sub("_", Path(name).name.removesuffix(".ckpt")) or "checkpoint"
        step = global_step if global_step is not None and global_step >= 0 else 0
        return f"{step:010d}-{stem[:80]}-{uuid.uuid4().hex[:8]}"

    def check_writable(self) -> None:
        """Write and delete a probe object. Raises StoreError saying what to do."""
        self.objects.check_writable()

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
        stop: threading.Event | None = None,
        verify_unchanged: bool = True,
        before_manifest: Callable[[], None] | None = None,
        growth: Growing | None = None,
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
            stop: aborts retries when set.
            verify_unchanged: hash each local file again after its upload and refuse to publish
                if it changed meanwhile (skip only for files nothing else can write).
            before_manifest: called once the data is up, just before the manifest is written
                (CheckpointSync waits there until the metrics the checkpoint covers are stored).
            growth: the one file is still being written (append-only, private: needs
                ``verify_unchanged=False``); it is uploaded as it grows, and the manifest is
                written only once the write has succeeded as a whole (:meth:`Growing.commit`).

        Returns:
            The manifest as written.

        Raises:
            StoreError: the upload failed for good (after retries for transient errors).
            IntegrityError: a local file changed while it was being uploaded.
            ConflictError: ``checkpoint_id`` exists already (nothing was overwritten).
        """
        entries = _expand_local(files)
        if not entries:
            raise ConfigError("publish_checkpoint needs at least one local file")
        if growth is not None and (verify_unchanged or len(entries) != 1):
            raise ConfigError("publish_checkpoint: a growing file is published alone, as a private file (verify_unchanged=False)")
        name = name or Path(entries[0][1]).name
        ckpt_id = checkpoint_id or self.new_checkpoint_id(name, global_step)
        folder = layout.checkpoint_object(ckpt_id)
        manifest_rel = layout.checkpoint_object(ckpt_id, layout.CHECKPOINT_MANIFEST)
        if checkpoint_id is not None and self.objects.exists(manifest_rel):
            # Generated ids are never reused; a caller-chosen one must not clobber data either.
            raise ConflictError(f"checkpoint {ckpt_id} already exists in {self.url}; it was not overwritten (use a new id)")
        manifest_maybe_written = False  # then the data must stay: a manifest may point at it
        try:
            manifest_files = []
            for local, rel in entries:
                if not verify_unchanged:  # a private file: hashed as it is read for the upload, one pass
                    digest, size = self.objects.upload_hashed(
                        local,
                        f"{folder}/{rel}",
                        size=None if growth is not None else os.path.getsize(local),
                        callback=callback,
                        stop=stop,
                        growth=growth,
                    )
                    manifest_files.append(FileEntry(path=rel, size=size, sha256=digest))
                    continue
                digest, size = sha256_file(local)
                self.objects.upload(local, f"{folder}/{rel}", size=size, callback=callback, stop=stop)
                if sha256_file(local)[0] != digest:
                    raise IntegrityError(
                        f"local file {local} changed while it was uploaded; not publishing {ckpt_id}. "
                        "Checkpoint files must not be modified in place while CheckpointSync uploads them"
                    )
                manifest_files.append(FileEntry(path=rel, size=size, sha256=digest))
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
            body = manifest.to_json()
            if growth is not None:
                growth.wait_committed()  # the data is up; the save itself must have succeeded too
            if before_manifest is not None:
                before_manifest()
            try:
                self.objects.write(manifest_rel, body, create_only=True, stop=stop)
            except ConflictError:
                raise ConflictError(
                    f"{self.url_of(manifest_rel)} already exists; another writer published checkpoint "
                    f"{ckpt_id} and it was not overwritten"
                ) from None
            except BaseException:
                manifest_maybe_written = True
                if self._manifest_landed(manifest_rel, body):
                    log.warning("checkpoint %s was published although the store's reply was lost", ckpt_id)
                    return manifest
                manifest_maybe_written = False  # read back: it is not there
                raise
        except ConflictError:
            raise  # the objects there belong to the manifest that won; leave them alone
        except BaseException:
            if not manifest_maybe_written:
                self._discard_unpublished(folder, [rel for _, rel in entries])
            raise
        return manifest

    def commit_manifest(self, manifest: CheckpointManifest, stop: threading.Event | None = None) -> None:
        """Write ``manifest`` create-only: the last step of publishing data objects that are
        already in the store (a sharded checkpoint, whose ranks upload their own files).

        Raises:
            ConflictError: a manifest of that id exists already (it was not overwritten).
            StoreError: the write failed and did not land; the data objects stay invisible.
        """
        rel = layout.checkpoint_object(manifest.id, layout.CHECKPOINT_MANIFEST)
        body = manifest.to_json()
        try:
            self.objects.write(rel, body, create_only=True, stop=stop)
        except ConflictError:
            raise ConflictError(
                f"{self.url_of(rel)} already exists; another writer published checkpoint {manifest.id} and it was not overwritten"
            ) from None
        except BaseException:
            if self._manifest_landed(rel, body):
                log.warning("checkpoint %s was published although the store's reply was lost", manifest.id)
                return
            raise

    def discard_unpublished(self, ckpt_id: str) -> int:
        """Best effort: delete every data object of checkpoint ``ckpt_id``, which has no manifest
        (a sharded save that failed on some rank). Returns how many objects went; never raises."""
        try:
            return self.delete_orphan(ckpt_id)
        except Exception as exc:  # the store may be the very thing that is failing; the objects are invisible
            log.debug("could not remove the unpublished objects of %s: %s", ckpt_id, exc)
            return 0

    def _manifest_landed(self, manifest_rel: str, body: bytes) -> bool:
        """After a failed manifest write: whether it landed after all (its reply was lost).

        Raises:
            StoreError: the store cannot tell; the data objects are then left in place (a
                manifest may be pointing at them), never deleted.
        """
        try:
            return self.objects.read(manifest_rel) == body
        except Exception as exc:
            raise StoreError(
                f"the manifest write of {self.url_of(manifest_rel)} failed and the store cannot say whether it "
                f"landed ({exc}); its data objects were left in place: `trainctl ckpt gc` removes them if it did not"
            ) from exc

    def _discard_unpublished(self, folder: str, rels: list[str]) -> None:
        """Best effort: remove data objects of a checkpoint whose manifest was never written.

        They are invisible to readers either way; this only saves space.
        """
        for rel in rels:
            try:
                self.objects.delete(f"{folder}/{rel}")
            except Exception as exc:  # the store may be the very thing that is failing
                log.debug("could not remove unpublished object %s/%s: %s", folder, rel, exc)

    # --------------------------------------------------------------- reading
    def list_checkpoints(self) -> list[CheckpointManifest]:
        """Every complete checkpoint, oldest first (by time taken, then step).

        A manifest that does not parse, or is unsafe (a path leaving its folder), is skipped with
        a warning naming it: one damaged object never hides the others.

        Raises:
            StoreError: the store cannot be read.
        """
        return self._scan_checkpoints()[0]

    def _scan_checkpoints(self, asked: str | None = None) -> tuple[list[CheckpointManifest], dict[str, IntegrityError]]:
        """The readable manifests, sorted, and why each damaged one (by folder name) was skipped.

        Each damaged one is logged as a warning, except ``asked`` (the caller reports that one).
        """
        rels = self.objects.glob(layout.checkpoint_object("*", layout.CHECKPOINT_MANIFEST))
        raw = self.objects.read_many(rels, action="list")
        manifests = []
        damaged: dict[str, IntegrityError] = {}
        for rel, data in raw.items():
            where = self.url_of(rel)
            folder = rel.split("/")[-2]
            try:
                m = CheckpointManifest.from_json(data, where)
                if m.id != folder:
                    raise IntegrityError(f"{where} says its id is {m.id!r} but it is in folder {folder!r}; refusing it")
            except IntegrityError as exc:
                if folder != asked:
                    log.warning("skipping unreadable checkpoint: %s", exc)
                damaged[folder] = exc
                continue
            manifests.append(m)
        return sorted(manifests, key=CheckpointManifest.sort_key), damaged

    def latest_checkpoint(self) -> CheckpointManifest | None:
        """The newest complete checkpoint (taken last; highest step on a tie), or None."""
        found = self.list_checkpoints()
        return found[-1] if found else None

    def get_checkpoint(self, ref: str | None = None) -> CheckpointManifest:
        """Look a checkpoint up by id, by name (newest with that name), or ``None``/"latest".

        Raises:
            CheckpointNotFoundError: nothing matches; the message lists what exists.
            IntegrityError: ``ref`` is the id of a checkpoint whose manifest is damaged.
        """
        found, damaged = self._scan_checkpoints(asked=ref)
        if ref is not None and ref in damaged:
            raise damaged[ref]  # asked for by id: say what is wrong with it, in one line
        if not found:
            raise CheckpointNotFoundError(
                f"no complete checkpoint in {self.url}" + (f" ({len(damaged)} damaged manifest(s) skipped)" if damaged else "")
            )
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
        only: Collection[str] | None = None,
    ) -> Path:
        """Download a checkpoint into ``dest`` and verify every object against the manifest.

        Files land in ``dest`` under their manifest paths, each written to a temporary name and
        renamed only once its size and checksum match, so a corrupt download leaves nothing
        behind. Files already present with the right checksum are not downloaded again.

        Every target is checked to resolve inside ``dest`` (a manifest path cannot leave it,
        nor can a symlink already in ``dest``) before anything is written.

        Args:
            only: download just these manifest paths (the shards one rank of a sharded
                checkpoint needs); every other file is left out.

        Returns:
            The local path to pass to ``trainer.fit(ckpt_path=...)``: the file for a one-file
            checkpoint, ``dest/<folder>`` for a sharded one, else ``dest``.

        Raises:
            IntegrityError: an object is corrupt or truncated, or a path would leave ``dest``;
                the message names it.
            StoreError: the store cannot be read.
        """
        dest = Path(dest)
        what = f"checkpoint {manifest.id} in {self.url}"
        safe_name(manifest.id, what)
        targets = [inside(dest, entry.path, what) for entry in manifest.files]
        dest.mkdir(parents=True, exist_ok=True)
        for entry, target in zip(manifest.files, targets):
            if only is not None and entry.path not in only:
                continue
            inside(dest, entry.path, what)  # again now that dest exists: a symlink in it must not lead out
            if target.is_file() and target.stat().st_size == entry.size and sha256_file(target)[0] == entry.sha256:
                continue
            self.objects.download(
                layout.checkpoint_object(manifest.id, entry.path),
                target,
                size=entry.size,
                sha256=entry.sha256,
                callback=callback,
            )
        if manifest.sharded is not None:
            return dest / manifest.sharded["folder"]
        if len(manifest.files) == 1:
            return targets[0]
        return dest

    def verify_checkpoint(self, manifest: CheckpointManifest, callback: Callback | None = None) -> None:
        """Read every object of a checkpoint from the store and check size and checksum.

        Raises:
            IntegrityError: an object is missing, corrupt or truncated; the message names it.
        """
        for entry in manifest.files:
            rel = layout.checkpoint_object(manifest.id, entry.path)
            digest, size = self.objects.digest(rel, callback=callback)
            check_content(self.url_of(rel), "", size, digest, entry.size, entry.sha256)

    def find_orphans(self, older_than_s: float = 3600.0) -> list[str]:
        """Checkpoint folders with data objects but no manifest, untouched for ``older_than_s``.

        A writer killed mid-upload leaves these behind. Readers never see them; they only take
        space. The age limit keeps uploads that are still in flight out of the list.

        Returns:
            Checkpoint ids (folder names under ``checkpoints/``), oldest first.
        """
        folders: dict[str, list[str]] = {}
        for rel in self.objects.find(layout.CHECKPOINTS):
            if "/" in rel:
                folder = rel.split("/", 1)[0]
                try:
                    safe_name(folder, f"checkpoint folder in {self.url}")
                except IntegrityError as exc:
                    log.warning("skipping %s", exc)
                    continue
                folders.setdefault(folder, []).append(rel)
        now = datetime.now(timezone.utc)
        found = []
        for ckpt_id, members in folders.items():
            if any(m.rsplit("/", 1)[-1] == layout.CHECKPOINT_MANIFEST for m in members):
                continue
            newest = max(self.objects.modified(f"{layout.CHECKPOINTS}/{m}") for m in members)
            if (now - newest).total_seconds() >= older_than_s:
                found.append((newest, ckpt_id))
        return [ckpt_id for _, ckpt_id in sorted(found)]

    # --------------------------------------------------------------- deleting
    def delete_orphan(self, ckpt_id: str) -> int:
        """Delete the data objects of a checkpoint that has no manifest; returns how many.

        Raises:
            ConflictError: the checkpoint has a manifest (it is complete: use delete_checkpoint).
        """
        _check_checkpoint_id(ckpt_id)
        if self.objects.exists(layout.checkpoint_object(ckpt_id, layout.CHECKPOINT_MANIFEST)):
            raise ConflictError(f"checkpoint {ckpt_id} is complete (it has a manifest); not deleting it as an orphan")
        return self.objects.delete_folder(layout.checkpoint_object(ckpt_id))

    def delete_checkpoint(self, manifest: CheckpointManifest) -> None:
        """Delete a checkpoint: the manifest first (so it stops existing at once), then its data.

        Only objects inside this run's ``checkpoints/<id>/`` folder are ever touched.

        Raises:
            ConfigError: the id or a file path would leave that folder (nothing is deleted).
        """
        _check_checkpoint_id(manifest.id)
        # every object is checked before the first delete: a bad path deletes nothing at all
        members = [_member(manifest.id, entry.path) for entry in manifest.files]
        self.objects.delete(layout.checkpoint_object(manifest.id, layout.CHECKPOINT_MANIFEST))
        for rel in members:
            self.objects.delete(rel)
        self.objects.delete_folder(layout.checkpoint_object(manifest.id))

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
        self.objects.write(f"{layout.METRICS}/{name}", data, create_only=True)

    def read_metrics_segments(self, skip: Iterable[str] = ()) -> list[tuple[str, bytes]]:
        """Metrics segments as (name, content), in name order (= order written).

        Args:
            skip: names already read; segments never change, so a follower fetches only new ones.
        """
        return self.objects.read_new(layout.METRICS, "*.jsonl", skip, action="read metrics from")

    def write_status(self, data: bytes) -> None:
        """Replace the run's ``status.json`` (the one object a live run keeps rewriting)."""
        self.objects.write(layout.STATUS, data)

    def read_status(self) -> bytes | None:
        """The run's ``status.json``, or None when the run never reported one."""
        return self.objects.read(layout.STATUS, action="read the status of")


def run_urls_in(store_url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """URLs of the runs directly below a store (folders with a job, a status or checkpoints)."""
    store = ObjectStore(store_url, storage_options)
    found: set[str] = set()
    for marker in layout.RUN_MARKERS:
        found.update(rel.split("/", 1)[0] for rel in store.glob(f"*/{marker}"))
    return [store.url_of(name) for name in sorted(found)]


def _check_checkpoint_id(ckpt_id: str) -> None:
    try:
        safe_name(ckpt_id, "checkpoint to delete")
    except IntegrityError as exc:
        raise ConfigError(f"refusing to delete: {exc}") from None


def _member(ckpt_id: str, path: str) -> str:
    """The store path of one object of a checkpoint, asserted to be inside its folder."""
    try:
        safe_relpath(path, f"checkpoint {ckpt_id}")
    except IntegrityError as exc:
        raise ConfigError(f"refusing to delete: {exc}") from None
    rel = layout.checkpoint_object(ckpt_id, path)
    folder = layout.checkpoint_object(ckpt_id) + "/"
    if not rel.startswith(folder) or ".." in rel.split("/"):
        raise ConfigError(f"refusing to delete {rel!r}: not inside {folder}")
    return rel


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
