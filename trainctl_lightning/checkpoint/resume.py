"""``resume_path``: the newest complete checkpoint of a run, downloaded and verified."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from trainctl_lightning.errors import ConfigError, IntegrityError
from trainctl_lightning.store import RunStore
from trainctl_lightning.store.layout import RUN_URL_ENV

__all__ = ["CACHE_ENV", "default_cache_dir", "resume_path"]

CACHE_ENV = "TRAINCTL_CACHE_DIR"
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
) -> str | None:
    """Download the run's newest complete checkpoint (verified) and return its local path.

    Pass the result straight to ``trainer.fit(model, ckpt_path=...)``: ``None`` (no checkpoint
    published yet) makes Lightning start from scratch, so the same script works for the first
    run and for every restart.

    Args:
        url: the run's store URL, as given to ``CheckpointSync``; defaults to ``$TRAINCTL_RUN_URL``.
        storage_options: fsspec options (credentials, endpoint).
        cache_dir: where downloads are kept (default: ``~/.cache/trainctl``); a checkpoint
            already there with the right checksum is not downloaded again.
        fallback: when the newest checkpoint fails verification, log an error naming it and
            use the next older one that verifies (an unattended restart should not die on one
            bad object); with ``False``, raise instead.

    Raises:
        IntegrityError: no published checkpoint verifies (or the newest does not, without
            ``fallback``).
        StoreError: the store cannot be read.

    Example::

        trainer.fit(model, ckpt_path=resume_path("s3://bucket/runs/exp1"))
    """
    url = url if url is not None else os.environ.get(RUN_URL_ENV)
    if not url:
        raise ConfigError(f"resume_path() needs the run's store URL, or ${RUN_URL_ENV} set")
    store = RunStore(url, storage_options)
    candidates = store.list_checkpoints()[::-1]
    if not candidates:
        return None
    run_key = hashlib.sha256(store.url.encode()).hexdigest()[:16]
    dest = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "checkpoints" / run_key
    for manifest in candidates:
        try:
            return str(store.download_checkpoint(manifest, dest / manifest.id))
        except IntegrityError as exc:
            if not fallback or manifest is candidates[-1]:
                raise
            log.error("trainctl: not resuming from %s: %s; trying the next older checkpoint", manifest.id, exc)
    raise AssertionError("unreachable")  # the loop returns or raises
