"""Plain functions over a run's checkpoints: what ``trainctl ckpt ...`` calls.

Example::

    from trainctl_lightning.checkpoint import api
    for m in api.list_checkpoints("s3://bucket/runs/exp1"):
        print(m.name, m.global_step)
    path = api.download_checkpoint("s3://bucket/runs/exp1", dest="ckpts")  # latest, verified
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fsspec.callbacks import Callback

from trainctl_lightning.errors import ConfigError
from trainctl_lightning.store import RunStore
from trainctl_lightning.store.manifest import CheckpointManifest

__all__ = [
    "collect_orphans",
    "download_checkpoint",
    "list_checkpoints",
    "read_progress",
    "upload_checkpoint",
    "verify_checkpoint",
]

log = logging.getLogger(__name__)


def list_checkpoints(url: str, storage_options: dict[str, Any] | None = None) -> list[CheckpointManifest]:
    """Every complete checkpoint of the run, oldest first."""
    return RunStore(url, storage_options).list_checkpoints()


def download_checkpoint(
    url: str,
    ref: str | None = None,
    dest: str | os.PathLike[str] = ".",
    storage_options: dict[str, Any] | None = None,
    callback: Callback | None = None,
) -> tuple[CheckpointManifest, Path]:
    """Download one checkpoint (``ref``: id or name; default the latest), verified.

    Returns:
        The manifest and the local path (the file for a one-file checkpoint).

    Raises:
        CheckpointNotFoundError: nothing matches ``ref``.
        IntegrityError: an object fails its checksum; nothing is left in ``dest``.
    """
    store = RunStore(url, storage_options)
    manifest = store.get_checkpoint(ref)
    return manifest, store.download_checkpoint(manifest, dest, callback=callback)


def verify_checkpoint(
    url: str,
    ref: str | None = None,
    storage_options: dict[str, Any] | None = None,
    callback: Callback | None = None,
) -> CheckpointManifest:
    """Re-read a stored checkpoint and check every object's size and checksum.

    Raises:
        IntegrityError: an object is missing, truncated or corrupt; names it.
    """
    store = RunStore(url, storage_options)
    manifest = store.get_checkpoint(ref)
    store.verify_checkpoint(manifest, callback=callback)
    return manifest


def upload_checkpoint(
    path: str | os.PathLike[str],
    url: str,
    *,
    name: str | None = None,
    epoch: int | None = None,
    global_step: int | None = None,
    storage_options: dict[str, Any] | None = None,
    callback: Callback | None = None,
) -> CheckpointManifest:
    """Publish a local checkpoint file (or folder) to the run, as ``CheckpointSync`` would.

    Epoch and global step are read from a Lightning ``.ckpt`` file when not given (the file is
    memory-mapped with ``weights_only=True``; nothing in it is executed).

    Raises:
        ConfigError: the file does not exist.
    """
    local = Path(path)
    if not local.exists():
        raise ConfigError(f"checkpoint {str(local)!r} does not exist")
    if local.is_file() and (epoch is None or global_step is None):
        found = read_progress(local)
        epoch = epoch if epoch is not None else found.get("epoch")
        global_step = global_step if global_step is not None else found.get("global_step")
    store = RunStore(url, storage_options)
    store.check_writable()
    return store.publish_checkpoint(
        [local],
        name=name or local.name,
        epoch=epoch,
        global_step=global_step,
        source={"local_path": str(local.resolve()), "uploaded_by": "trainctl ckpt upload"},
        callback=callback,
    )


def read_progress(path: Path) -> dict[str, int]:
    """``epoch`` and ``global_step`` of a Lightning checkpoint, if it can be read safely."""
    import torch

    try:
        data = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # not a torch file, or holds objects weights_only refuses
        log.info("could not read epoch/step from %s (%s); pass them explicitly", path, exc)
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: int(data[k]) for k in ("epoch", "global_step") if isinstance(data.get(k), int)}


def collect_orphans(
    url: str,
    *,
    older_than_s: float = 3600.0,
    delete: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Find (and with ``delete=True`` remove) data a killed upload left without a manifest.

    Returns:
        One ``{"id", "deleted_objects"}`` per orphaned checkpoint folder (``deleted_objects`` is 0
        when only listing).
    """
    store = RunStore(url, storage_options)
    found = store.find_orphans(older_than_s)
    return [{"id": ckpt_id, "deleted_objects": store.delete_orphan(ckpt_id) if delete else 0} for ckpt_id in found]
