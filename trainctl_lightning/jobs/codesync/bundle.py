"""The code bundle and its manifest format (``<run>/code.json``): what every step shares."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainctl_lightning.errors import IntegrityError
from trainctl_lightning.store.files import safe_relpath

__all__ = ["CODE_FORMAT", "BundleFile", "CodeBundle", "parse_manifest", "run_parallel"]

CODE_FORMAT = "trainctl.code/1"
"""The manifest format this trainctl writes and reads."""
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
PLAIN = 0o644
"""The mode of an entry that has none (no manifest this trainctl writes lacks one)."""


@dataclass(frozen=True)
class BundleFile:
    """One file of a code bundle."""

    path: str
    """Relative POSIX path below the project root (never absolute, never with ``..``)."""
    size: int
    sha256: str
    """Hex SHA-256 of the content; also the blob's name in the store."""
    mode: int
    """The local file's permission bits (``st_mode & 0o777``): a private ``0o600`` file stays
    private on the instance, an executable stays executable. Never setuid, setgid or sticky."""


@dataclass
class CodeBundle:
    """A scanned project: which files to upload, with their checksums."""

    root: Path
    """The project directory (absolute)."""
    files: list[BundleFile]
    """Sorted by path."""
    skipped_secrets: list[str] = field(default_factory=list)
    """Paths left out because they look like credentials (folders end with ``/``)."""

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def manifest_bytes(self) -> bytes:
        """The manifest as canonical JSON: equal trees give equal bytes (and the same SHA-256)."""
        files = {f.path: {"sha256": f.sha256, "size": f.size, "mode": f.mode} for f in self.files}
        return json.dumps({"format": CODE_FORMAT, "files": files}, sort_keys=True, separators=(",", ":")).encode()

    def manifest_sha256(self) -> str:
        return hashlib.sha256(self.manifest_bytes()).hexdigest()


def parse_manifest(raw: bytes, where: str = "code manifest") -> list[BundleFile]:
    """The files of a code manifest, every entry checked (safe path, checksum form, mode).

    Raises:
        IntegrityError: not a code manifest, or an entry is malformed or unsafe.
    """
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise IntegrityError(f"{where} is not valid JSON ({exc}); refusing it") from None
    if not isinstance(data, dict) or data.get("format") != CODE_FORMAT:
        fmt = data.get("format") if isinstance(data, dict) else None
        raise IntegrityError(f"{where} has format {fmt!r}, this trainctl reads {CODE_FORMAT!r}: upgrade trainctl on the instance")
    entries = data.get("files")
    if not isinstance(entries, dict):
        raise IntegrityError(f"{where} has no 'files' table; refusing it")
    files = []
    for path, entry in entries.items():
        _check_rel_path(path, where)
        if not isinstance(entry, dict):
            raise IntegrityError(f"{where}: entry {path!r} is not an object; refusing it")
        sha, size, mode = entry.get("sha256"), entry.get("size"), entry.get("mode", PLAIN)
        if not isinstance(sha, str) or not SHA_RE.match(sha):
            raise IntegrityError(f"{where}: entry {path!r} has sha256 {sha!r}, not 64 hex digits; refusing it")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise IntegrityError(f"{where}: entry {path!r} has size {size!r}; refusing it")
        if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o777:
            raise IntegrityError(
                f"{where}: entry {path!r} has mode {mode!r}, expected permission bits from 0 to 0o777; refusing it"
            )
        files.append(BundleFile(path=path, size=size, sha256=sha, mode=mode))
    files.sort(key=lambda f: f.path)
    names = {f.path for f in files}
    for f in files:
        parts = f.path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in names:
                folder = "/".join(parts[:i])
                raise IntegrityError(f"{where} lists {folder!r} both as a file and as a folder; refusing it")
    return files


def _check_rel_path(path: Any, where: str) -> None:
    safe_relpath(path, where)  # the rule checkpoint manifests share


def run_parallel(pool: ThreadPoolExecutor, tasks: Iterable[Callable[[], Any]]) -> list[Any]:
    """Run tasks on ``pool``; on the first failure cancel what has not started and raise it."""
    with pool:
        futures: list[Future[Any]] = [pool.submit(t) for t in tasks]
        _, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((fut for fut in futures if fut.done() and fut.exception() is not None), None)
        if failed is not None:
            for fut in pending:
                fut.cancel()
            exc = failed.exception()
            assert exc is not None
            raise exc
    return [fut.result() for fut in futures]
