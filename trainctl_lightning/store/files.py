"""Local files written the safe way: under a temporary name, verified, then renamed.

Every place that writes a file that something else may read (a downloaded checkpoint, a fetched
code file, a cached blob, a local store object) goes through :func:`atomic_file`, so a reader
never sees a half-written or unverified file, and a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from trainctl_lightning.errors import IntegrityError

__all__ = [
    "HASH_CHUNK",
    "atomic_file",
    "check_content",
    "copy_verified",
    "create_exclusive",
    "inside",
    "safe_name",
    "safe_relpath",
    "sha256_file",
    "write_atomic",
]

HASH_CHUNK = 8 * 2**20
"""Bytes read at a time when hashing or copying."""


_DRIVE = re.compile(r"^[A-Za-z]:")


def safe_relpath(path: object, what: str) -> str:
    """Check a relative path that came from the store (a manifest entry) before it names a local file.

    The one rule every manifest kind shares (checkpoint and code manifests): a non-empty POSIX
    path relative to its folder, with no absolute start, drive letter, backslash, NUL or other
    control character, and no empty, ``.`` or ``..`` part. Such a path cannot leave its folder
    by itself (a symlink already on the disk can; :func:`inside` checks that).

    Args:
        path: the value as read from the store.
        what: the object it came from, for the message (``checkpoint manifest s3://b/r/...``).

    Returns:
        ``path``, unchanged.

    Raises:
        IntegrityError: one line naming the object and the path.
    """
    if (
        not isinstance(path, str)
        or not path
        or path.startswith("/")
        or "\\" in path
        or _DRIVE.match(path)
        or any(ord(c) < 32 or ord(c) == 127 for c in path)
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        raise IntegrityError(
            f"{what} lists the unsafe path {path!r} (absolute, or leaving its folder); refusing it: "
            "whoever can write to the store wrote it, so check who can"
        )
    return path


def safe_name(name: object, what: str) -> str:
    """Check a single path component from the store (a checkpoint id, a folder name).

    Raises:
        IntegrityError: not one safe path part (see :func:`safe_relpath`), with the value.
    """
    if not isinstance(name, str) or "/" in name:
        raise IntegrityError(f"{what} has the unsafe name {name!r} (not one plain file name); refusing it")
    return safe_relpath(name, what)


def inside(root: str | os.PathLike[str], rel: str, what: str = "a store path") -> Path:
    """``root / rel``, checked to stay inside ``root`` once symlinks already on disk are resolved.

    Args:
        root: the destination folder (need not exist yet).
        rel: a path from the store; checked with :func:`safe_relpath` first.
        what: the object ``rel`` came from, for the message.

    Returns:
        ``Path(root) / rel`` (not resolved: the caller writes where it asked).

    Raises:
        IntegrityError: ``rel`` is unsafe, or resolves outside ``root`` (through a symlink there).
    """
    safe_relpath(rel, what)
    target = Path(root) / rel
    base = os.path.realpath(root)
    resolved = os.path.realpath(target)
    if os.path.commonpath([base, resolved]) != base:
        raise IntegrityError(
            f"{what}: {rel!r} would be written to {resolved}, outside {root} (through a symlink there); refusing it"
        )
    return target


def sha256_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """Hex SHA-256 and size of a local file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def check_content(label: str, where: str, size: int, digest: str, expected_size: int, expected_sha256: str) -> None:
    """Refuse content whose size or SHA-256 differs from what its manifest says.

    Args:
        label: what the content is, for the message (``code file a.py``, a checkpoint object URL).
        where: the object it came from, when that is not already the label ("" otherwise).

    Raises:
        IntegrityError: one line naming the object, what it is and what was expected.
    """
    source = f" ({where})" if where and where != label else ""
    if size != expected_size:
        raise IntegrityError(
            f"{label} is {size} bytes but its manifest says {expected_size}{source}: the object is truncated or "
            "was replaced; refusing it"
        )
    if digest != expected_sha256:
        raise IntegrityError(
            f"{label} fails its checksum (sha256 {digest[:12]}..., its manifest says {expected_sha256[:12]}...)"
            f"{source}: the object is corrupt; refusing it"
        )


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str], mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` when the block succeeds.

    The caller writes (and verifies) the temporary file inside the block; an exception removes
    it and leaves ``target`` as it was. ``mode`` sets the file's permission bits before the rename.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_atomic(target: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``target`` with ``data`` in one rename (readers see the old or the new file)."""
    with atomic_file(target) as tmp:
        tmp.write_bytes(data)


def copy_verified(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    sha256: str,
    mode: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Copy ``source`` to ``target`` (atomically), hashing on the way; returns the bytes copied.

    ``progress`` is told the size of each chunk as it is copied.

    Raises:
        IntegrityError: the copied content does not have ``sha256``; ``target`` is left as it was.
    """
    digest = hashlib.sha256()
    size = 0
    with atomic_file(target, mode) as tmp:
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(HASH_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
                size += len(chunk)
                if progress is not None:
                    progress(len(chunk))
        if digest.hexdigest() != sha256:
            raise IntegrityError(f"{source} does not have the content expected for {target} (sha256 {sha256[:12]}...)")
    return size


def create_exclusive(path: str | os.PathLike[str], data: bytes) -> None:
    """Create ``path`` with ``data``, atomically, failing with FileExistsError if it exists.

    The data goes to a temporary file first and is then hard-linked into place: link(2) is
    atomic and never exposes a half-written file. Filesystems without hard links fall back to
    O_EXCL, which is still create-only.
    """
    parent = os.path.dirname(os.fspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            with open(path, "xb") as f:
                f.write(data)
    finally:
        os.unlink(tmp)
