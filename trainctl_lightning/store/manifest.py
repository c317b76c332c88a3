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
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from trainctl_lightning.errors import IntegrityError
from trainctl_lightning.timeutil import parse_time

__all__ = ["MANIFEST_FORMAT", "CheckpointManifest", "FileEntry"]

MANIFEST_FORMAT = "trainctl.checkpoint/1"


@dataclass(frozen=True)
class FileEntry:
    """One data object of a checkpoint."""

    path: str
    """Object path relative to the checkpoint's folder (usually the checkpoint's file name)."""
    size: int
    """Size in bytes."""
    sha256: str
    """Hex SHA-256 of the object's content, checked on every download and verify."""


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
        data["files"] = [asdict(f) for f in self.files]
        return json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.to_json())

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> CheckpointManifest:
        """Parse a manifest.

        Raises:
            IntegrityError: not a trainctl checkpoint manifest of a format we can read.
        """
        try:
            data = json.loads(raw)
            fmt = str(data.get("format", ""))
            if fmt.split("/")[0] != MANIFEST_FORMAT.split("/")[0] or fmt.split("/")[-1][:1] != "1":
                raise ValueError(f"unsupported format {fmt!r}")
            files = tuple(FileEntry(path=str(f["path"]), size=int(f["size"]), sha256=str(f["sha256"])) for f in data["files"])
            if not files:
                raise ValueError("lists no files")
            return cls(
                id=str(data["id"]),
                name=str(data["name"]),
                epoch=_opt_int(data.get("epoch")),
                global_step=_opt_int(data.get("global_step")),
                created_at=str(data["created_at"]),
                files=files,
                package_version=str(data.get("package_version", "unknown")),
                monitor=data.get("monitor"),
                monitor_value=_opt_float(data.get("monitor_value")),
                metrics={str(k): float(v) for k, v in (data.get("metrics") or {}).items()},
                source=dict(data.get("source") or {}),
                format=fmt,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(
                f"{where} is not a readable trainctl checkpoint manifest ({exc}); delete it or fix it by hand"
            ) from exc


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
