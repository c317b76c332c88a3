"""Sharded (folder) checkpoints: every rank writes and publishes its own shards; rank zero commits.

Strategies that save a checkpoint as a folder (Lightning's ``FSDPStrategy(state_dict_type="sharded")``,
``ModelParallelStrategy``, or any strategy that declares :data:`FOLDER_STATE_KEY`) write it with
``torch.distributed.checkpoint`` (DCP): one or more ``__<rank>_<n>.distcp`` files per rank, DCP's
``.metadata`` and Lightning's ``meta.pt`` from rank zero. With several nodes and no shared file
system each node holds only its own ranks' files, so ``CheckpointSync`` publishes such a
checkpoint from every rank (``docs/sharded-checkpoints.md``):

training thread, every rank (:meth:`ShardedWriter.save`)
    splits the checkpoint as the strategy would (the state under its key and ``optimizer_<i>``
    for DCP, the rest for ``meta.pt``), copies it to host memory with DCP's own stager (the
    staging ``async_save`` does), creates the folder, queues the job and returns.
background thread, every rank, one job at a time in save order
    1. rank zero picks the checkpoint id and broadcasts it;
    2. ``dcp.save`` of the staged state into the folder, and ``meta.pt`` on rank zero;
    3. the rank hashes and uploads the files it wrote itself (:func:`owner_of`) to
       ``checkpoints/<id>/<folder>/``: no data goes through another node;
    4. a ``gather_object`` brings every rank's file list (path, size, sha256) or its error to rank
       zero, which writes the manifest (create-only, last) only when every rank succeeded (after
       the metrics of the steps it covers are stored, when ``CheckpointSync`` gives a gate), and
       otherwise deletes what was uploaded and publishes nothing: the previous checkpoint stays
       the newest complete one;
    5. rank zero broadcasts the outcome; then, as ``Publisher`` does for single files: rank zero
       deletes the remote copy of an older save of the same folder (``mirror_deletes``) and the
       oldest checkpoints beyond ``keep_last``, manifest first; with ``keep_local=False`` every
       rank deletes its local folder.

A removal (``ModelCheckpoint`` rotating a folder away) is queued behind the saves made before
it: every rank deletes its local folder, and rank zero the remote copy, unless a save made
before it failed and nothing published since made up for it.

All of these collectives run on a dedicated gloo process group (as DCP's ``async_save`` does),
so they never interleave with the training loop's collectives. Each rank's thread runs the jobs
in the same order, which is what keeps the collectives matched.

Resume (:func:`needed_files`, :func:`fetch_for_rank`): each rank downloads the rank-zero files
(``.metadata``, ``meta.pt``), reads DCP's metadata, and then only the shard files it will read:
a tensor stored as several chunks (sharded) is read from the files of its own rank, a tensor
stored whole (replicated, deduplicated by DCP onto one rank's file) from the file that holds it.
With a different world size (resharding) every file is fetched. Each file is verified against
the manifest (size, sha256) and its path checked to stay inside the destination.

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from trainctl_lightning.checkpoint.publisher import FlushResult, delete_remote, keep_newest
from trainctl_lightning.checkpoint.snapshot import take_snapshot
from trainctl_lightning.errors import IntegrityError
from trainctl_lightning.store import RunStore, layout
from trainctl_lightning.store.files import inside, safe_relpath, sha256_file
from trainctl_lightning.store.manifest import CheckpointManifest, FileEntry
from trainctl_lightning.timeutil import utc_now

__all__ = [
    "DCP_FORMAT",
    "DCP_METADATA",
    "FOLDER_STATE_KEY",
    "META_FILE",
    "ShardedJob",
    "ShardedWriter",
    "fetch_for_rank",
    "folder_state_key",
    "install",
    "needed_files",
    "new_group",
    "owner_of",
    "read_metadata",
    "verify_code_free",
]

log = logging.getLogger(__name__)

DCP_FORMAT = "torch.distributed.checkpoint"
"""``sharded["format"]`` of the manifests written here."""
DCP_METADATA = ".metadata"
"""The file DCP's coordinator (global rank zero) writes beside the shards."""
META_FILE = "meta.pt"
"""What Lightning's folder-saving strategies ``torch.save`` beside the shards on rank zero (loops, callbacks...)."""
FOLDER_STATE_KEY = "trainctl_folder_state_key"
"""Attribute a custom strategy sets to the DCP key of the model state (e.g. ``"state_dict"``) to
declare that it saves folders the way Lightning's ``ModelParallelStrategy`` does."""
_SHARD = re.compile(r"^__(\d+)_\d+\.distcp$")


def folder_state_key(strategy: Any) -> str | None:
    """The DCP key under which ``strategy`` saves the model state in a folder checkpoint, or None
    when it saves single files (then ``CheckpointSync`` publishes through ``CheckpointIO``)."""
    declared = getattr(strategy, FOLDER_STATE_KEY, None)
    if isinstance(declared, str) and declared:
        return declared
    from trainctl_lightning.remote import _lightning

    return _lightning.dcp_state_key(strategy)


def owner_of(rel: str) -> int:
    """The global rank that writes (and uploads) ``rel`` of a DCP folder: ``__<r>_<n>.distcp`` is
    rank ``r``'s (DCP's own naming); everything else (``.metadata``, ``meta.pt``) rank zero's."""
    match = _SHARD.match(rel.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else 0


@dataclass
class _Remove:
    path: str


@dataclass
class ShardedJob:
    """One save of a folder checkpoint, as this rank's writer tracks it."""

    seq: int
    """Save order on this rank (the same on every rank)."""
    path: str
    """Absolute path of the folder on this rank's disk."""
    state: dict[str, Any]
    """The staged state for DCP (emptied once written)."""
    meta: dict[str, Any] | None
    """Rank zero: what goes into ``meta.pt`` (None once written, and on other ranks)."""
    fields: dict[str, Any]
    """Manifest fields read at save time (epoch, step, monitor, metrics)."""
    done: threading.Event = field(default_factory=threading.Event)
    """Set once every rank knows whether it was published."""
    manifest: CheckpointManifest | None = None
    """Rank zero: the manifest written."""
    error: str | None = None
    """Why it was not published (every rank learns rank zero's verdict)."""

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


class ShardedWriter:
    """One rank's writer and publisher of folder checkpoints (see the module docstring).

    Args:
        store: the run's store (every rank has its own client).
        group: the gloo process group for the background collectives (every rank's).
        rank, world_size: this process's global rank and the world size.
        state_key: DCP key of the model state (:func:`folder_state_key`).
        session: short id of this writer, recorded in manifests.
        max_pending: staged checkpoints held in host memory at once; a save that finds them all
            in use waits until the oldest is written.
        on_published: rank zero: called with each manifest once it is written.
        gate: rank zero: called with each job whose ranks all succeeded, just before its manifest
            is written; it may block (``CheckpointSync``'s metrics gate).
        mirror_deletes: rank zero deletes the remote copy of a folder that ``ModelCheckpoint``
            removes or saves again, once its replacement is published.
        keep_last: rank zero keeps at most this many newest complete checkpoints in the store.
        keep_local: with False, every rank deletes its local folder once it is published.
    """

    def __init__(
        self,
        store: RunStore,
        group: Any,
        *,
        rank: int,
        world_size: int,
        state_key: str,
        session: str,
        max_pending: int = 1,
        on_published: Callable[[CheckpointManifest], None] | None = None,
        gate: Callable[[ShardedJob], None] | None = None,
        mirror_deletes: bool = True,
        keep_last: int | None = None,
        keep_local: bool = True,
    ) -> None:
        self.store = store
        self.gate = gate
        self.mirror_deletes = mirror_deletes
        self.keep_last = keep_last
        self.keep_local = keep_local
        self._lock = threading.Lock()
        self._published: dict[str, tuple[int, CheckpointManifest]] = {}  # rank zero: local path -> newest published
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.state_key = state_key
        self.session = session
        self.on_published = on_published
        self._slots = threading.BoundedSemaphore(max_pending)
        self._queue: queue.Queue[ShardedJob | _Remove | None] = queue.Queue()
        self._jobs: list[ShardedJob] = []
        self._seq = 0
        self._thread = threading.Thread(target=self._loop, name=f"trainctl-sharded-{rank}", daemon=True)
        self._thread.start()
        self.blocking_s: list[float] = []
        """Seconds each :meth:`save` held the training thread (staging included)."""

    # ------------------------------------------------------- training thread
    def save(self, checkpoint: dict[str, Any], path: str, fields: dict[str, Any]) -> None:
        """Stage ``checkpoint`` (Lightning's dict; its state and optimizer entries are popped, as the
        strategies do) and queue its write and publication to ``path`` (a folder)."""
        from torch.distributed.checkpoint.staging import BlockingAsyncStager

        started = time.perf_counter()
        self._slots.acquire()
        try:
            state = {self.state_key: checkpoint.pop("state_dict")}
            state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
            staged = BlockingAsyncStager().stage(state)  # the copy DCP's async_save makes, on this thread
            meta = take_snapshot(checkpoint).checkpoint if self.rank == 0 else None
            if os.path.isfile(path):
                os.unlink(path)  # as Lightning's folder strategies do
            os.makedirs(path, exist_ok=True)  # the name is taken now, as after a synchronous save
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self._seq += 1
            job = ShardedJob(self._seq, os.path.abspath(path), staged, meta, fields)
            self._jobs.append(job)
        self._queue.put(job)
        self.blocking_s.append(time.perf_counter() - started)

    @property
    def saves_queued(self) -> int:
        """How many saves this writer has been given (the sequence number of the latest)."""
        return self._seq

    def wait_published(self, path: str, timeout: float | None) -> ShardedJob | None:
        """Wait (at most ``timeout`` seconds) for the newest save of ``path`` to be published or to
        fail, on every rank alike; returns its job (None: no such save)."""
        target = os.path.abspath(path)
        with self._lock:
            jobs = [j for j in self._jobs if j.path == target]
        if not jobs:
            return None
        jobs[-1].done.wait(timeout)
        return jobs[-1]

    def remove(self, path: str) -> None:
        """Delete this rank's copy of the folder ``path`` once the saves queued before are done
        (``ModelCheckpoint`` rotated it away), and on rank zero its remote copy (``mirror_deletes``)."""
        self._queue.put(_Remove(os.path.abspath(path)))

    def flush(self, timeout: float | None = None) -> FlushResult:
        """Wait for every queued job (at most ``timeout`` seconds) and stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)
        with self._lock:
            jobs, self._jobs = self._jobs, []
        return FlushResult(
            published=[j.name for j in jobs if j.done.is_set() and not j.error],
            failed=[f"{j.name} ({j.error})" for j in jobs if j.done.is_set() and j.error],
            unfinished=[j.name for j in jobs if not j.done.is_set()],
        )

    # -------------------------------------------------------- background
    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if isinstance(job, _Remove):
                self._removed(job.path)
                continue
            try:
                self._run(job)
            except Exception as exc:  # a broken collective: this rank cannot take part any more
                job.error = f"{type(exc).__name__}: {exc}"
                log.error("trainctl: sharded checkpoint %s not published: %s", job.name, job.error)
            finally:
                job.done.set()
            if job.error is None:
                self._after_publish(job)

    def _removed(self, path: str) -> None:
        """``ModelCheckpoint`` removed ``path`` (every save queued before has ended here)."""
        shutil.rmtree(path, ignore_errors=True)
        if self.rank != 0 or not self.mirror_deletes:
            return
        with self._lock:
            jobs = [j for j in self._jobs if j.done.is_set()]
        recovered_at = max((j.seq for j in jobs if j.error is None), default=0)
        failed = [j.name for j in jobs if j.error is not None and j.seq > recovered_at and j.path != path]
        if failed:
            log.warning(
                "trainctl: keeping the remote copy of %s, which ModelCheckpoint rotated away, because %s, saved "
                "before that, was not published",
                os.path.basename(path),
                ", ".join(failed),
            )
            return
        published = self._published.pop(path, None)
        if published is not None:
            self._delete(published[1], why=f"ModelCheckpoint removed {os.path.basename(path)}")

    def _after_publish(self, job: ShardedJob) -> None:
        """A save every rank knows was published: mirror deletes and ``keep_last`` (rank zero), and
        ``keep_local=False`` (every rank)."""
        with self._lock:
            newer = any(j.path == job.path and j.seq > job.seq for j in self._jobs)
        if not self.keep_local and not newer:  # a newer save of the same folder is not ours to delete
            shutil.rmtree(job.path, ignore_errors=True)
        if self.rank != 0 or job.manifest is None:
            return
        stale = self._published.get(job.path)
        self._published[job.path] = (job.seq, job.manifest)
        if self.mirror_deletes and stale is not None:
            self._delete(stale[1], why=f"{job.name} was saved again")
        if self.keep_last:
            keep_newest(self.store, self.keep_last)

    def _delete(self, manifest: CheckpointManifest, why: str) -> None:
        delete_remote(self.store, manifest, why)

    def _run(self, job: ShardedJob) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        box: list[Any] = [RunStore.new_checkpoint_id(job.name, job.fields.get("global_step")) if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        ckpt_id = str(box[0])
        error: str | None = None
        entries: list[FileEntry] = []
        try:
            try:
                dcp.save(job.state, checkpoint_id=job.path, process_group=self.group)
            finally:
                job.state = {}  # free host memory
                self._slots.release()
            if job.meta is not None:
                torch.save(job.meta, os.path.join(job.path, META_FILE))
                job.meta = None
            entries = self._upload_own(job, ckpt_id)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.error("trainctl: rank %d could not write or upload its part of %s: %s", self.rank, job.name, error)
        reports: list[Any] = [None] * self.world_size if self.rank == 0 else []
        mine = (self.rank, [(e.path, e.size, e.sha256) for e in entries], error)
        try:
            dist.gather_object(mine, reports if self.rank == 0 else None, dst=0, group=self.group)
        except Exception:
            # A rank is gone (killed, its node lost): nothing will be published. Rank zero, the
            # only one that could have written the manifest, removes what was uploaded (best
            # effort); if rank zero is the one lost, `trainctl ckpt gc` removes the orphans.
            if self.rank == 0:
                self.store.discard_unpublished(ckpt_id)
            raise
        if self.rank == 0:
            job.error = self._commit(job, ckpt_id, reports)
        outcome: list[Any] = [job.error]
        dist.broadcast_object_list(outcome, src=0, group=self.group)  # every rank learns whether it was published
        job.error = outcome[0]

    def _commit(self, job: ShardedJob, ckpt_id: str, reports: list[Any]) -> str | None:
        """Rank zero: write the manifest when every rank reported its files, else discard; returns the error."""
        failed = [f"rank {r}: {why}" for r, _, why in reports if why]
        if failed:
            log.error(
                "trainctl: sharded checkpoint %s is not published (no manifest; the previous checkpoint stays the newest): %s",
                job.name,
                "; ".join(failed),
            )
            self.store.discard_unpublished(ckpt_id)
            return "; ".join(failed)
        if self.gate is not None:
            self.gate(job)  # e.g. until the metrics of the steps it covers are stored
        files = sorted(
            (FileEntry(path=p, size=s, sha256=h, rank=r) for r, listed, _ in reports for p, s, h in listed),
            key=lambda e: e.path,
        )
        manifest = CheckpointManifest(
            id=ckpt_id,
            name=job.name,
            epoch=job.fields.get("epoch"),
            global_step=job.fields.get("global_step"),
            created_at=job.fields.get("created_at") or utc_now(),
            files=tuple(files),
            package_version=_version(),
            monitor=job.fields.get("monitor"),
            monitor_value=job.fields.get("monitor_value"),
            metrics=dict(job.fields.get("metrics") or {}),
            source={"local_path": job.path, "session": self.session, "pid": os.getpid()},
            sharded={"format": DCP_FORMAT, "folder": job.name, "world_size": self.world_size},
        )
        try:
            self.store.commit_manifest(manifest)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.error("trainctl: the manifest of sharded checkpoint %s was not written: %s", job.name, error)
            return error
        job.manifest = manifest
        log.info("trainctl: published sharded %s (%d files from %d ranks) as %s", job.name, len(files), self.world_size, ckpt_id)
        if self.on_published is not None:
            self.on_published(manifest)
        return None

    def _upload_own(self, job: ShardedJob, ckpt_id: str) -> list[FileEntry]:
        """Hash and upload the files of ``job``'s folder that this rank wrote."""
        folder = Path(job.path)
        entries = []
        for local in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = local.relative_to(folder).as_posix()
            if owner_of(rel) != self.rank or (local.name.startswith(".") and local.name != DCP_METADATA):
                continue
            digest, size = sha256_file(local)
            path = f"{folder.name}/{rel}"
            self.store.objects.upload(local, layout.checkpoint_object(ckpt_id, path), size=size)
            entries.append(FileEntry(path=path, size=size, sha256=digest, rank=self.rank))
        if not entries:
            raise IntegrityError(f"rank {self.rank} found none of its files in {folder} after writing it")
        return entries


def needed_files(manifest: CheckpointManifest, metadata: Any, rank: int) -> set[str]:
    """The manifest paths rank ``rank`` reads to load ``manifest`` with the world size it was saved
    with: its own files, rank zero's, and every file holding a tensor stored whole (DCP's
    ``Metadata``: a tensor with several chunks is sharded, read from the rank's own files)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    assert manifest.sharded is not None
    folder = manifest.sharded["folder"]
    wanted = {e.path for e in manifest.files if not _is_shard(e.path) or owner_of(e.path) == rank}
    for index, info in (metadata.storage_data or {}).items():
        item = metadata.state_dict_metadata.get(index.fqn)
        sharded = isinstance(item, TensorStorageMetadata) and len(item.chunks) > 1
        rel = safe_relpath(str(info.relative_path), f"DCP metadata of checkpoint {manifest.id}")
        if not sharded or owner_of(rel) == rank:
            wanted.add(f"{folder}/{rel}")
    return wanted


def fetch_for_rank(store: RunStore, manifest: CheckpointManifest, dest: Path, rank: int | None, world_size: int | None) -> Path:
    """Download what rank ``rank`` needs of a sharded checkpoint into ``dest`` (verified); returns
    the folder to load. ``rank`` None, or a world size other than the saved one: every file.

    Raises:
        IntegrityError: a file is corrupt or truncated, or a path would leave ``dest``; one line.
        StoreError: the store cannot be read.
    """
    assert manifest.sharded is not None
    folder = manifest.sharded["folder"]
    what = f"checkpoint {manifest.id} in {store.url}"
    for entry in manifest.files:
        inside(dest, entry.path, what)
    if rank is None or world_size != manifest.sharded["world_size"]:
        root = store.download_checkpoint(manifest, dest)
        verify_code_free(dest / folder, read_metadata(dest / folder / DCP_METADATA, what), what)
        return root
    zero = {e.path for e in manifest.files if not _is_shard(e.path)}
    store.download_checkpoint(manifest, dest, only=zero)
    if f"{folder}/{DCP_METADATA}" not in zero:
        raise IntegrityError(f"{what} lists no {folder}/{DCP_METADATA}: not a complete DCP checkpoint; refusing it")
    metadata = read_metadata(dest / folder / DCP_METADATA, what)
    wanted = needed_files(manifest, metadata, rank)
    unknown = wanted - {e.path for e in manifest.files}
    if unknown:
        raise IntegrityError(
            f"{what}: its DCP metadata names {sorted(unknown)[0]!r}, which its manifest does not list; refusing it"
        )
    root = store.download_checkpoint(manifest, dest, only=wanted)
    verify_code_free(dest / folder, metadata, what)
    return root


# DCP's metadata is a pickle: only these classes may appear in it (what torch's own writer puts there).
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.stateful": set(),
    "torch._utils": {"_get_layout"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "Path"},
    "collections": {"OrderedDict"},
}


def read_metadata(path: Path, what: str) -> Any:
    """DCP's ``.metadata`` at ``path``, unpickled with only the classes torch's own writer uses
    (dtypes, ``torch.Size``, DCP's metadata records): a metadata file that names anything else
    (a function, a module, a class of someone's choosing) is refused in one line, unrun.

    Raises:
        IntegrityError: the file names something else, or does not unpickle.
    """
    import io
    import pickle

    class _Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            allowed = _METADATA_CLASSES.get(module)
            if allowed is not None and name in allowed:
                return super().find_class(module, name)
            if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
                return getattr(torch, name)
            raise IntegrityError(
                f"{what}: its DCP metadata names {module}.{name}, which DCP's own writer never puts there; "
                "refusing to load it (it could run code)"
            )

    try:
        return _Restricted(io.BytesIO(path.read_bytes())).load()
    except IntegrityError:
        raise
    except Exception as exc:
        raise IntegrityError(f"{what}: its DCP metadata does not unpickle ({type(exc).__name__}: {exc}); refusing it") from None


def verify_code_free(folder: Path, metadata: Any, what: str) -> None:
    """Prove that loading the downloaded files of a sharded checkpoint runs no code from the store.

    DCP loads the non-tensor items of a checkpoint (``BytesStorageMetadata``: step counters,
    hyper-parameters, ...) with ``torch.load(weights_only=False)``, and Lightning loads ``meta.pt``
    with the Trainer's ``weights_only``. So, before either runs, every such item present in the
    downloaded files and ``meta.pt`` must load with ``torch.load(weights_only=True)``, which builds
    only tensors and plain data.

    Raises:
        IntegrityError: one of them holds anything else (one line naming it).
    """
    import io

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    def check(data: bytes | Path, name: str) -> None:
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        try:
            torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise IntegrityError(
                f"{what}: {name} holds more than tensors and plain data ({first[:200]}); refusing to load it, since "
                "loading it could run code. If you wrote it yourself, download it (`trainctl ckpt download`) and load it "
                "by hand"
            ) from None

    for index, info in (metadata.storage_data or {}).items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        path = inside(folder, safe_relpath(str(info.relative_path), what), what)
        if not path.exists():
            continue  # not downloaded for this rank: never read
        if getattr(info, "transform_descriptors", None):
            raise IntegrityError(f"{what}: item {index.fqn!r} is stored transformed ({info.transform_descriptors}); refusing it")
        with open(path, "rb") as f:
            f.seek(int(info.offset))
            check(f.read(int(info.length)), f"item {index.fqn!r} in {info.relative_path}")
    if (folder / META_FILE).exists():
        check(folder / META_FILE, META_FILE)


def install(strategy: Any, writer: ShardedWriter, fields: Callable[[dict[str, Any], str], dict[str, Any]]) -> Callable[[], None]:
    """Route ``strategy``'s folder saves and removals to ``writer`` for the length of a fit (every
    rank); returns the function that puts the strategy's own methods back."""

    def save_checkpoint(checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:  # what Lightning's folder strategies raise
            raise TypeError(
                f"`{type(strategy).__name__}.save_checkpoint(..., storage_options=...)` is not supported because"
                f" `{type(strategy).__name__}` does not use the `CheckpointIO`."
            )
        # This rank's own path, not rank zero's broadcast: every rank writes and uploads on its own disk.
        path = os.path.abspath(os.fspath(filepath).removeprefix("file://"))
        writer.save(checkpoint, path, fields(checkpoint, path))

    def remove_checkpoint(filepath: Any) -> None:
        writer.remove(os.fspath(filepath).removeprefix("file://"))

    strategy.save_checkpoint = save_checkpoint
    strategy.remove_checkpoint = remove_checkpoint

    def uninstall() -> None:
        for name, ours in (("save_checkpoint", save_checkpoint), ("remove_checkpoint", remove_checkpoint)):
            if vars(strategy).get(name) is ours:
                delattr(strategy, name)  # the class's method again

    return uninstall


def new_group(timeout_s: float) -> Any:
    """A gloo process group over every rank, for the background collectives (call on every rank)."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def _is_shard(rel: str) -> bool:
    return _SHARD.match(rel.rsplit("/", 1)[-1]) is not None


def _version() -> str:
    from trainctl_lightning.store.run import package_version

    return package_version()
