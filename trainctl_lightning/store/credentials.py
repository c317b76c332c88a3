"""Credentials in fsspec ``storage_options`` never leave the process they were given in.

``CheckpointSync`` and ``MetricsReporter`` built on the launching machine travel to the instance
inside ``remote/payload.pkl``, which lives in the store. Before they are pickled, every entry of
their ``storage_options`` whose name looks like a credential (``key``, ``secret``, ``token``,
``password``, ``session``, ``credential``, at any depth, e.g. ``client_kwargs.aws_secret_access_key``)
is dropped, and the names (never the values) are logged. The rest (``endpoint_url``,
``client_kwargs.region_name``, ...) travels. On the instance the store client resolves its own
credentials from its environment or role, the way boto3 and fsspec always do.

The one pickle that keeps them is a child process this machine starts with ``multiprocessing``
(``strategy="ddp_spawn"``): its arguments go through a pipe to it, never into a file or the store
(:func:`pickled_options`).
"""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = ["is_credential_name", "pickled_options", "without_credentials"]

log = logging.getLogger(__name__)

_CREDENTIAL = re.compile(r"key|secret|token|passw|session|credential|auth", re.IGNORECASE)


def is_credential_name(name: str) -> bool:
    """Whether a storage option named ``name`` may hold a credential."""
    return bool(_CREDENTIAL.search(name))


def without_credentials(options: dict[str, Any], owner: str) -> dict[str, Any]:
    """A copy of ``options`` without credential-like entries; logs what was dropped (names only).

    Args:
        options: fsspec storage options.
        owner: who is being pickled, for the log line (``CheckpointSync('s3://b/r')``).
    """
    dropped: list[str] = []
    kept = _strip(options, "", dropped)
    if dropped:
        log.info(
            "trainctl: %s travels without its storage_options %s (credentials are never serialized); the instance "
            "uses its own credentials (environment or role)",
            owner,
            ", ".join(dropped),
        )
    return kept


def pickled_options(options: dict[str, Any], owner: str) -> dict[str, Any]:
    """What of ``options`` an object's pickle may hold: all of them when the pickle starts a child
    process of this machine, otherwise :func:`without_credentials`.

    ``multiprocessing`` (spawn, forkserver; Lightning's ``ddp_spawn``) pickles a new process's
    arguments into a pipe to it, never to a file or the store; the child needs the same
    credentials as its parent to write where its parent would. Every other pickle (the remote
    payload, a user's ``pickle.dumps``) goes without them.
    """
    from multiprocessing import context

    if context.get_spawning_popen() is not None:
        return dict(options)
    return without_credentials(options, owner)


def _strip(options: dict[str, Any], prefix: str, dropped: list[str]) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for name, value in options.items():
        label = f"{prefix}{name}"
        if is_credential_name(str(name)):
            dropped.append(label)
        elif isinstance(value, dict):
            kept[name] = _strip(value, label + ".", dropped)
        else:
            kept[name] = value
    return kept
