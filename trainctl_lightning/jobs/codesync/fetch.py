"""Fetching a bundle on the instance: manifest checked against the job, every blob verified."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainctl_lightning.checkpoint.resume import default_cache_dir
from trainctl_lightning.errors import ConfigError, IntegrityError
from trainctl_lightning.humanize import human_size
from trainctl_lightning.jobs.codesync.bundle import (
    BundleFile,
    parse_manifest,
    run_parallel,
)
from trainctl_lightning.jobs.spec import CodeRef
from trainctl_lightning.paths import PRIVATE_FILE_MODE, make_private_dir
from trainctl_lightning.store import ObjectStore
from trainctl_lightning.store.files import copy_verified, sha256_file

__all__ = ["FetchStats", "default_blob_cache", "fetch_bundle"]

log = logging.getLogger(__name__)


@dataclass
class FetchStats:
    """What one :func:`fetch_bundle` did."""

    files: int
    """Files in the bundle (all of them are in ``dest`` afterwards)."""
    bytes_downloaded: int
    """Bytes read from the store."""
    bytes_reused: int
    """Bytes of files taken from the local blob cache or already in ``dest``."""
    seconds: float


def default_blob_cache() -> Path:
    """``$TRAINCTL_CACHE_DIR/blobs``, else ``~/.cache/trainctl/blobs``."""
    return default_cache_dir() / "blobs"


def fetch_bundle(
    code: CodeRef,
    dest: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int = 8,
) -> FetchStats:
    """Rebuild a code bundle under ``dest``, every file verified against its checksum.

    Files already in ``dest`` with the right content are kept (their mode is fixed); other
    files in ``dest`` are left alone. Every file gets the permission bits the manifest records
    (a ``0600`` file stays private); the blob cache is private to the user (``0700``/``0600``). Each file is written under a temporary name and renamed
    once verified, so a failed fetch never leaves a corrupt file behind.

    Args:
        code: from the job spec.
        dest: folder to rebuild the project in (created if missing).
        storage_options: passed to fsspec.
        cache_dir: local blob cache (default :func:`default_blob_cache`).
        workers: blobs downloaded in parallel.

    Raises:
        IntegrityError: the manifest does not match ``code.manifest_sha256``, lists an unsafe
            path, or a blob is missing or fails its checksum (the message names the file).
        StoreError: the store cannot be read.
    """
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    started = time.monotonic()
    opts = dict(storage_options or {})
    raw = _read_manifest(code.manifest_url, opts)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != code.manifest_sha256:
        raise IntegrityError(
            f"code manifest {code.manifest_url} has sha256 {digest[:12]}..., the job expects "
            f"{code.manifest_sha256[:12]}...: it was replaced or corrupted; refusing to run that code"
        )
    files = parse_manifest(raw, code.manifest_url)
    dest_path = Path(dest).expanduser().absolute()
    try:
        dest_path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the code folder {dest_path}: {exc}") from None
    real_dest = os.path.realpath(dest_path)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_blob_cache()
    try:
        make_private_dir(cache)
    except OSError as exc:
        raise ConfigError(f"cannot use blob cache {cache}: {exc}; set TRAINCTL_CACHE_DIR to a writable folder") from None
    blobs = ObjectStore(code.blobs_url, opts)

    by_sha: dict[str, list[BundleFile]] = {}
    reused = 0
    checked: set[str] = set()
    for f in files:
        target = dest_path / f.path
        parent = os.path.dirname(f.path)
        if parent not in checked:
            # a symlink already in dest must not take a write outside it
            if os.path.commonpath([real_dest, os.path.realpath(target.parent)]) != real_dest:
                raise IntegrityError(
                    f"code file {f.path} of {code.manifest_url} would be written outside {dest_path} "
                    "(through a symlink there); refusing it"
                )
            checked.add(parent)
        if _has_content(target, f):
            if stat.S_IMODE(target.stat().st_mode) != f.mode:
                os.chmod(target, f.mode)
            reused += f.size
        else:
            by_sha.setdefault(f.sha256, []).append(f)

    def fetch_one(sha: str, wanted: list[BundleFile]) -> tuple[int, int]:
        cached = cache / sha[:2] / sha
        downloaded = 0
        if not cached.is_file():
            downloaded = _download_blob(blobs, sha, cached, wanted)
        try:
            for f in wanted:
                _materialise(cached, dest_path / f.path, f)
        except IntegrityError:
            # a damaged cache entry (it no longer matches its name): drop it, download again once
            cached.unlink(missing_ok=True)
            downloaded = _download_blob(blobs, sha, cached, wanted)
            for f in wanted:
                _materialise(cached, dest_path / f.path, f)
        size = wanted[0].size
        return downloaded, size * len(wanted) - downloaded

    results: list[tuple[int, int]] = []
    if by_sha:
        results = run_parallel(
            ThreadPoolExecutor(max_workers=min(workers, len(by_sha)), thread_name_prefix="trainctl-code-down"),
            [functools.partial(fetch_one, s, w) for s, w in by_sha.items()],
        )
    stats = FetchStats(
        files=len(files),
        bytes_downloaded=sum(d for d, _ in results),
        bytes_reused=reused + sum(r for _, r in results),
        seconds=time.monotonic() - started,
    )
    log.info(
        "code: %d files in %s, downloaded %s, reused %s in %.1fs",
        stats.files,
        dest_path,
        human_size(stats.bytes_downloaded),
        human_size(stats.bytes_reused),
        stats.seconds,
    )
    return stats


def _read_manifest(url: str, opts: dict[str, Any]) -> bytes:
    folder, _, name = url.rstrip("/").rpartition("/")  # an object's URL: its folder and its name
    raw = ObjectStore(folder, opts).read(name, action="read the code manifest")
    if raw is None:
        raise IntegrityError(f"code manifest {url} is missing from the store; the run's code cannot be rebuilt")
    return raw


def _has_content(target: Path, f: BundleFile) -> bool:
    try:
        st = os.lstat(target)
        return stat.S_ISREG(st.st_mode) and st.st_size == f.size and sha256_file(target)[0] == f.sha256
    except OSError:  # gone, or not readable (a mode without owner read): written again
        return False


def _download_blob(blobs: ObjectStore, sha: str, cached: Path, wanted: list[BundleFile]) -> int:
    """Download one blob into the cache, verified; returns its size."""
    names = ", ".join(f.path for f in wanted[:3]) + (" ..." if len(wanted) > 3 else "")
    return blobs.download(sha, cached, size=wanted[0].size, sha256=sha, label=f"code file {names}", mode=PRIVATE_FILE_MODE)


def _materialise(cached: Path, target: Path, f: BundleFile) -> None:
    """Copy a cached blob to ``target`` with ``f.mode``, verifying while copying, then rename.

    Raises:
        IntegrityError: the cached blob does not match its checksum (nothing was written).
        ConfigError: ``target`` cannot be written.
    """
    if target.is_dir() and not target.is_symlink():
        raise ConfigError(f"cannot write code file {target}: a folder is in the way; fetch into an empty folder")
    try:
        copy_verified(cached, target, f.sha256, mode=f.mode)
    except OSError as exc:
        raise ConfigError(f"cannot write code file {target}: {exc}") from None
