"""The checkpoint manifest: the small JSON object that makes a published checkpoint exist.

A checkpoint in the run store is a folder of data objects plus ``MANIFEST.json``
(:data:`~trainctl_lightning.store.layout.CHECKPOINT_MANIFEST`), which is
written last (create-only where the backend allows). Readers only ever look at manifests, so
a checkpoint whose upload was cut short, whose manifest is missing, is invisible to them.
The format is documented in ``docs/run-store.md``; readers accept any ``format`` with the same
major version and ignore fields they do not know.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from trainctl_lightning.errors import IntegrityError
from trainctl_lightning.store.fields import opt_float, opt_int
from trainctl_lightning.store.files import safe_name, safe_relpath
from trainctl_lightning.timeutil import parse_time

__all__ = ["MANIFEST_FORMAT", "CheckpointManifest", "FileEntry"]

MANIFEST_FORMAT = "trainctl.checkpoint/1"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FileEntry:
    """One data object of a checkpoint."""

    path: str
    """Object path relative to the checkpoint's folder (usually the checkpoint's file name)."""
    size: int
    """Size in bytes."""
    sha256: str
    """Hex SHA-256 of the object's content, checked on every download and verify."""
    rank: int | None = None
    """Global rank that wrote and uploaded this object (sharded checkpoints only; omitted otherwise)."""


@dataclass(frozen=True)
class CheckpointManifest:
    """What the run store knows about one published, complete checkpoint."""

    id: str
    """Unique, never-reused key of this checkpoint in the store (its folder under ``checkpoints/``)."""
    name: str
    """The name Lightning gave the checkpoint, e.g. ``epoch=3-step=400.ckpt`` or ``last.ckpt``.
    Several published checkpoints can share a name (``last.ckpt`` is saved over and over); the
    newest one wins when a name is looked up."""
    epoch: int | None
    """Training epoch stored in the checkpoint, when known."""
    global_step: int | None
    """Optimizer step stored in the checkpoint, when known; a resume continues from here."""
    created_at: str
    """UTC ISO-8601 time at which the checkpoint was taken (not when its upload finished)."""
    files: tuple[FileEntry, ...]
    """Every data object, with size and checksum."""
    package_version: str
    """Version of trainctl-lightning that published it."""
    monitor: str | None = None
    """Metric that ``ModelCheckpoint`` ranks by, if any."""
    monitor_value: float | None = None
    """Value of ``monitor`` when the checkpoint was taken."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Scalar ``trainer.callback_metrics`` at save time (for listings; not used for decisions)."""
    source: dict[str, Any] = field(default_factory=dict)
    """Where it came from: host, pid, local path, writer session. Informational only."""
    format: str = MANIFEST_FORMAT
    """Manifest schema identifier."""
    sharded: dict[str, Any] | None = None
    """Set for a checkpoint saved as a folder by several ranks (``docs/sharded-checkpoints.md``):
    ``{"format": "torch.distributed.checkpoint", "folder": <folder name>, "world_size": N}``.
    Every file is then ``<folder>/<relative path>`` and carries the ``rank`` that wrote it.
    Omitted (None) for a one-file checkpoint; readers that predate it ignore it."""

    @property
    def size(self) -> int:
        """Total bytes over all data objects."""
        return sum(f.size for f in self.files)

    @property
    def created(self) -> datetime:
        return parse_time(self.created_at)

    def sort_key(self) -> tuple[datetime, int, str]:
        """Order used to pick "latest": creation time, then global step, then id."""
        return (self.created, self.global_step if self.global_step is not None else -1, self.id)

    def to_json(self) -> bytes:
        data = asdict(self)
        # Fields added later are omitted when unset, so a one-file manifest reads as it always did.
        data["files"] = [{k: v for k, v in asdict(f).items() if not (k == "rank" and v is None)} for f in self.files]
        if self.sharded is None:
            del data["sharded"]
        return json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.to_json())

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> CheckpointManifest:
        """Parse a manifest, checking every field a reader acts on.

        Paths and the id must be safe (:func:`~trainctl_lightning.store.files.safe_relpath`, the
        rule code manifests use too), so nothing parsed from the store can name a file outside a
        checkpoint's folder; ``created_at`` must be a time, sizes whole and checksums hex.

        Raises:
            IntegrityError: not a trainctl checkpoint manifest of a format we can read, or unsafe.
        """
        what = f"checkpoint manifest {where}"
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
            fmt = str(data.get("format", ""))
            if fmt.split("/")[0] != MANIFEST_FORMAT.split("/")[0] or fmt.split("/")[-1][:1] != "1":
                raise ValueError(f"unsupported format {fmt!r}")
            if not isinstance(data["files"], list):
                raise ValueError("'files' is not a list")
            files = tuple(_file_entry(f, what) for f in data["files"])
            if not files:
                raise ValueError("lists no files")
            _check_tree([f.path for f in files])
            created_at = str(data["created_at"])
            parse_time(created_at)  # a listing sorts by it: refuse it here, not in every sort
            metrics = data.get("metrics") or {}
            monitor = data.get("monitor")
            manifest = cls(
                id=safe_name(data["id"], what),
                name=_text(data["name"], "name"),
                epoch=opt_int(data.get("epoch")),
                global_step=opt_int(data.get("global_step")),
                created_at=created_at,
                files=files,
                package_version=str(data.get("package_version", "unknown")),
                monitor=None if monitor is None else _text(monitor, "monitor"),
                monitor_value=opt_float(data.get("monitor_value")),
                metrics={str(k): float(v) for k, v in dict(metrics).items()},
                source=dict(data.get("source") or {}),
                format=fmt,
                sharded=_sharded(data.get("sharded"), files, what),
            )
        except IntegrityError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise IntegrityError(
                f"{where} is not a readable trainctl checkpoint manifest ({type(exc).__name__}: {exc}); "
                "delete it or fix it by hand"
            ) from None
        return manifest


def _file_entry(item: Any, what: str) -> FileEntry:
    if not isinstance(item, dict):
        raise ValueError(f"a 'files' entry is {item!r}, not an object")
    sha, size = item["sha256"], item["size"]
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise ValueError(f"entry {item.get('path')!r} has sha256 {sha!r}, not 64 hex digits")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"entry {item.get('path')!r} has size {size!r}")
    rank = item.get("rank")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 0):
        raise ValueError(f"entry {item.get('path')!r} has rank {rank!r}")
    return FileEntry(path=safe_relpath(item["path"], what), size=size, sha256=sha, rank=rank)


def _sharded(value: Any, files: tuple[FileEntry, ...], what: str) -> dict[str, Any] | None:
    """The ``sharded`` field, checked: a safe folder name that holds every file, and a world size."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"'sharded' is {value!r}, not an object")
    folder = safe_name(value.get("folder"), what)
    world_size = value.get("world_size")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"'sharded' has world_size {world_size!r}")
    for f in files:
        if not f.path.startswith(folder + "/"):
            raise ValueError(f"sharded checkpoint file {f.path!r} is not inside its folder {folder!r}")
        if f.rank is None or f.rank >= world_size:
            raise ValueError(f"sharded checkpoint file {f.path!r} has rank {f.rank!r} (world size {world_size})")
    return dict(value)


def _check_tree(paths: list[str]) -> None:
    """No path twice, and none both a file and a folder of another."""
    seen = set(paths)
    if len(seen) != len(paths):
        raise ValueError("lists a file twice")
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in seen:
                raise ValueError(f"lists {'/'.join(parts[:i])!r} both as a file and as a folder")


def _text(value: Any, field_name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field_name} is {value!r}, not a string")
    return value
