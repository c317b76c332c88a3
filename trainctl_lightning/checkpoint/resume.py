"""``resume_path``: the newest complete checkpoint of a run, downloaded and verified."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from trainctl_lightning.errors import ConfigError, IntegrityError
from trainctl_lightning.paths import make_private_dir
from trainctl_lightning.store import RunStore
from trainctl_lightning.store.layout import RUN_URL_ENV
from trainctl_lightning.store.manifest import CheckpointManifest

__all__ = [
    "CACHE_ENV",
    "DEFAULT_CACHE_KEEP",
    "default_cache_dir",
    "prune_cache",
    "resume_checkpoint",
    "resume_path",
    "run_cache_dir",
]

CACHE_ENV = "TRAINCTL_CACHE_DIR"
DEFAULT_CACHE_KEEP = 3
"""Checkpoints of one run that ``resume_path`` keeps in its cache (the most recently used)."""
log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$TRAINCTL_CACHE_DIR``, else ``$XDG_CACHE_HOME/trainctl``, else ``~/.cache/trainctl``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "trainctl"


def resume_path(
    url: str | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    fallback: bool = True,
    cache_keep: int = DEFAULT_CACHE_KEEP,
) -> str | None:
    """Download the run's newest complete checkpoint (verified) and return its local path.

    Pass the result straight to ``trainer.fit(model, ckpt_path=...)``: ``None`` (no checkpoint
    published yet) makes Lightning start from scratch, so the same script works for the first
    run and for every restart. For a sharded (folder) checkpoint, call it on every rank: each
    downloads only the shards it reads (its rank from torch.distributed, else torchrun's
    ``$RANK``/``$WORLD_SIZE``; a single process gets every file), see ``docs/sharded-checkpoints.md``.

    Args:
        url: the run's store URL, as given to ``CheckpointSync``; defaults to ``$TRAINCTL_RUN_URL``.
        storage_options: fsspec options (credentials, endpoint).
        cache_dir: where downloads are kept (default: ``~/.cache/trainctl``); a checkpoint
            already there with the right checksum is not downloaded again.
        fallback: when the newest checkpoint fails verification, log an error naming it and
            use the next older one that verifies (an unattended restart should not die on one
            bad object); with ``False``, raise instead.
        cache_keep: how many checkpoints of this run to keep in the cache (the most recently
            used; the one returned is always kept); older downloads are deleted.

    Raises:
        IntegrityError: no published checkpoint verifies (or the newest does not, without
            ``fallback``).
        StoreError: the store cannot be read.

    Example::

        trainer.fit(model, ckpt_path=resume_path("s3://bucket/runs/exp1"))
    """
    found = resume_checkpoint(url, storage_options=storage_options, cache_dir=cache_dir, fallback=fallback, cache_keep=cache_keep)
    return found[1] if found is not None else None


def resume_checkpoint(
    url: str | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    fallback: bool = True,
    cache_keep: int = DEFAULT_CACHE_KEEP,
) -> tuple[CheckpointManifest, str] | None:
    """:func:`resume_path`, also returning the manifest of the checkpoint it chose.

    Returns:
        ``(manifest, local path)``, or None when the run has no checkpoint yet.

    Raises:
        IntegrityError, StoreError: as :func:`resume_path`.
    """
    url = url if url is not None else os.environ.get(RUN_URL_ENV)
    if isinstance(cache_keep, bool) or not isinstance(cache_keep, int) or cache_keep < 1:
        raise ConfigError(f"resume_path(cache_keep={cache_keep!r}): keep at least 1 checkpoint in the cache")
    if not url:
        raise ConfigError(f"resume_path() needs the run's store URL, or ${RUN_URL_ENV} set")
    store = RunStore(url, storage_options)
    candidates = store.list_checkpoints()[::-1]
    if not candidates:
        return None
    dest = run_cache_dir(store.url, cache_dir)
    make_private_dir(dest)  # checkpoints are the user's data: the cache is theirs only (0700)
    for manifest in candidates:
        try:
            if manifest.sharded is not None:  # only the shards this rank reads (sharded-checkpoints.md)
                from trainctl_lightning.checkpoint.sharded import fetch_for_rank

                rank, world_size = _rank_and_world()
                path = fetch_for_rank(store, manifest, dest / manifest.id, rank, world_size)
            else:
                path = store.download_checkpoint(manifest, dest / manifest.id)
        except IntegrityError as exc:
            if not fallback or manifest is candidates[-1]:
                raise
            log.error("trainctl: not resuming from %s: %s; trying the next older checkpoint", manifest.id, exc)
            continue
        os.utime(dest / manifest.id)  # "most recently used", for the pruning below
        prune_cache(dest, keep=cache_keep, protect=manifest.id)
        return manifest, str(path)
    raise AssertionError("unreachable")  # the loop returns or raises


def _rank_and_world() -> tuple[int | None, int | None]:
    """This process's global rank and the world size: from torch.distributed once initialized,
    else from torchrun's ``$RANK``/``$WORLD_SIZE``; (None, None) in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is not None and world is not None and rank.isdigit() and world.isdigit():
        return int(rank), int(world)
    return None, None


def run_cache_dir(run_url: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder of ``resume_path``'s cache that holds one run's checkpoints (one sub-folder per id)."""
    run_key = hashlib.sha256(run_url.encode()).hexdigest()[:16]
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "checkpoints" / run_key


def prune_cache(folder: str | os.PathLike[str], *, keep: int = DEFAULT_CACHE_KEEP, protect: str = "") -> list[str]:
    """Delete all but the ``keep`` most recently used checkpoint folders directly in ``folder``.

    Only real folders are removed (a symlink there is left alone); ``protect`` is never removed.

    Returns:
        The names of the folders deleted.
    """
    root = Path(folder)
    entries = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink()] if root.is_dir() else []
    entries.sort(key=lambda p: (p.name == protect, p.stat().st_mtime), reverse=True)
    removed = []
    for old in entries[keep:]:
        if old.name == protect:
            continue
        shutil.rmtree(old)
        removed.append(old.name)
        log.info("trainctl: pruned %s from the resume cache (keeping the %d most recent)", old.name, keep)
    return removed
