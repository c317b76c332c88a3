"""The run store: the contract between the machine that launches and the machine that trains.

Any fsspec URL works (``s3://bucket/prefix``, ``file:///path``, ``memory://name``, ...). Layers,
from the bottom (``docs/run-store.md`` documents the format):

- :mod:`~trainctl_lightning.store.layout`: every object name, run URLs and tag names;
- :mod:`~trainctl_lightning.store.files`: local files written atomically and verified;
- :mod:`~trainctl_lightning.store.objects`: :class:`ObjectStore`, the one layer that talks to
  fsspec: atomic and create-only writes, reads, listings, deletes, verified transfers, retries
  and one-line errors;
- :mod:`~trainctl_lightning.store.manifest`: the checkpoint manifest format;
- :mod:`~trainctl_lightning.store.run`: :class:`RunStore`, one run's checkpoints, metrics and
  status, built on :class:`ObjectStore`.

Nothing in this package imports the jobs, providers, launching or Lightning code.
"""

from __future__ import annotations

from trainctl_lightning.store import layout
from trainctl_lightning.store.files import sha256_file
from trainctl_lightning.store.manifest import CheckpointManifest, FileEntry
from trainctl_lightning.store.objects import (
    ObjectStore,
    explain_store_error,
    validate_url,
)
from trainctl_lightning.store.run import (
    LocalFile,
    RunStore,
    package_version,
    run_urls_in,
)

__all__ = [
    "CheckpointManifest",
    "FileEntry",
    "LocalFile",
    "ObjectStore",
    "RunStore",
    "explain_store_error",
    "layout",
    "package_version",
    "run_urls_in",
    "sha256_file",
    "validate_url",
]
