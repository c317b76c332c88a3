"""``resume_path``: the newest complete checkpoint of a run, downloaded and verified."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from trainctl_lightning.errors import ConfigError
from trainctl_lightning.store import RUN_URL_ENV, RunStore

CACHE_ENV = "TRAINCTL_CACHE_DIR"


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

    Raises:
        IntegrityError: the newest checkpoint's objects do not match its manifest.
        StoreError: the store cannot be read.

    Example::

        trainer.fit(model, ckpt_path=resume_path("s3://bucket/runs/exp1"))
    """
    url = url if url is not None else os.environ.get(RUN_URL_ENV)
    if not url:
        raise ConfigError(f"resume_path() needs the run's store URL, or ${RUN_URL_ENV} set")
    store = RunStore(url, storage_options)
    latest = store.latest_checkpoint()
    if latest is None:
        return None
    run_key = hashlib.sha256(store.url.encode()).hexdigest()[:16]
    dest = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return str(store.download_checkpoint(latest, dest / "checkpoints" / run_key / latest.id))
