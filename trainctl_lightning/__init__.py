"""trainctl-lightning: train PyTorch Lightning models on remote GPUs from your own script.

Never lose a checkpoint (:class:`CheckpointSync`, :func:`resume_path`), never leak an instance.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("trainctl-lightning")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from typing import TYPE_CHECKING, Any

from trainctl_lightning.checkpoint.resume import resume_path
from trainctl_lightning.errors import (
    AuthenticationError,
    CheckpointNotFoundError,
    ConfigError,
    ConflictError,
    InstanceNotFoundError,
    IntegrityError,
    JobError,
    ProviderError,
    RemoteError,
    RunFailedError,
    RunNotFoundError,
    StoreError,
    TrainctlError,
    UploadError,
)
from trainctl_lightning.store import RunStore
from trainctl_lightning.store.manifest import CheckpointManifest, FileEntry

if TYPE_CHECKING:
    from trainctl_lightning.checkpoint.sync import CheckpointSync
    from trainctl_lightning.metrics.reporter import MetricsReporter
    from trainctl_lightning.remote.function import remote_function
    from trainctl_lightning.remote.strategy import RemoteStrategy


def __getattr__(name: str) -> Any:
    # Lightning takes seconds to import; the CLI and store tools should not pay for it.
    if name == "CheckpointSync":
        from trainctl_lightning.checkpoint.sync import CheckpointSync

        return CheckpointSync
    if name == "MetricsReporter":
        from trainctl_lightning.metrics.reporter import MetricsReporter

        return MetricsReporter
    if name == "RemoteStrategy":
        from trainctl_lightning.remote.strategy import RemoteStrategy

        return RemoteStrategy
    if name in ("remote", "remote_function"):
        # The `remote` package is callable as remote(fn, *args, **options): see remote/__init__.py.
        import trainctl_lightning.remote as remote

        return remote if name == "remote" else remote.remote_function
    raise AttributeError(f"module 'trainctl_lightning' has no attribute {name!r}")


__all__ = [
    "AuthenticationError",
    "CheckpointManifest",
    "CheckpointNotFoundError",
    "CheckpointSync",
    "ConfigError",
    "ConflictError",
    "FileEntry",
    "InstanceNotFoundError",
    "IntegrityError",
    "JobError",
    "MetricsReporter",
    "ProviderError",
    "RemoteError",
    "RemoteStrategy",
    "RunFailedError",
    "RunNotFoundError",
    "RunStore",
    "StoreError",
    "TrainctlError",
    "UploadError",
    "__version__",
    "remote",
    "remote_function",
    "resume_path",
]
