"""The one exception hierarchy of trainctl-lightning.

Every error we raise on purpose derives from :class:`TrainctlError`, so a caller can catch
everything of ours in one place. Each message says what was wrong, with the value, and what
to do next, in one line.
"""

from __future__ import annotations

__all__ = [
    "AgentFailure",
    "AuthenticationError",
    "CheckpointNotFoundError",
    "ConfigError",
    "ConflictError",
    "InstanceNotFoundError",
    "IntegrityError",
    "JobError",
    "ProviderError",
    "RemoteError",
    "RemoteTraceback",
    "RunFailedError",
    "RunNotFoundError",
    "SetupError",
    "SetupStopped",
    "StoreError",
    "TrainctlError",
    "UploadError",
]


class TrainctlError(Exception):
    """Root of every error raised by trainctl-lightning."""


class ConfigError(TrainctlError, ValueError):
    """An argument or setting is invalid; nothing was created or changed."""


class StoreError(TrainctlError):
    """The run store cannot be reached or used (missing bucket, credentials, permissions)."""


class CheckpointNotFoundError(StoreError, LookupError):
    """No complete checkpoint matches what was asked for."""


class IntegrityError(StoreError):
    """A stored object does not match its manifest (corrupt, truncated or replaced)."""


class AuthenticationError(StoreError):
    """An object in the store is not signed with its run's key (planted, tampered, or from another run); nothing in it was loaded."""


class ConflictError(StoreError):
    """A create-only write found the object already there; nothing was overwritten."""


class UploadError(TrainctlError):
    """Checkpoints could not be published; the message names every one that did not make it."""

    def __init__(self, message: str, failed: list[str] | None = None) -> None:
        super().__init__(message)
        self.failed: list[str] = list(failed or [])


class ProviderError(TrainctlError):
    """A provider could not create, find or control an instance."""


class InstanceNotFoundError(ProviderError, LookupError):
    """No instance created by trainctl has this id (with this provider)."""


class JobError(TrainctlError):
    """A job could not be started, found or followed (not: the job's own script failed)."""


class RunNotFoundError(JobError, LookupError):
    """No run with this id or URL exists in the store."""


class SetupError(JobError):
    """The job's environment could not be prepared on the instance (a setup command or an install failed)."""


class SetupStopped(JobError):
    """The job's setup was interrupted because the job was asked to stop."""


class AgentFailure(JobError):
    """Something the agent itself could not do; the message becomes the job state's ``error``."""


class RemoteTraceback(TrainctlError):
    """The traceback of an exception raised on the instance; set as the local exception's cause."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0]) if self.args else ""


class RunFailedError(JobError):
    """The job ran and ended without success; carries its exit code and the tail of its output."""

    def __init__(self, message: str, exit_code: int | None = None, error_tail: str = "", run_id: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.error_tail = error_tail
        self.run_id = run_id


class RemoteError(RunFailedError):
    """A remote exception whose type cannot be rebuilt here safely: it carries the type's name and the remote text.

    ``type_name`` is ``module.QualName`` of the remote exception, ``remote_message`` its message,
    ``remote_traceback`` the formatted remote traceback.
    """

    def __init__(
        self, message: str, *, type_name: str = "", remote_message: str = "", remote_traceback: str = "", run_id: str = ""
    ) -> None:
        super().__init__(message, exit_code=1, error_tail=remote_traceback, run_id=run_id)
        self.type_name = type_name
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
