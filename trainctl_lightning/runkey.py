"""Per-run keys: how the launcher and its run prove to each other that an object came from them.

Anyone who can write to the store can put objects into a run, so nothing read from the store is
unpickled on trust. Each launch gets a fresh random key (:func:`new_key`). The key never passes
through the store: the launcher keeps it in a private file under ``trainctl_home()/keys``
(:func:`save_key`, mode 0600 in a 0700 folder) and hands it to the agent out of band
(``AgentLaunch.run_key``; the local provider passes it in the agent's environment), and the agent
passes it to the job as ``$TRAINCTL_RUN_KEY``. Whoever holds the key can sign; whoever can only
write to the store cannot.

Objects that carry Python objects are wrapped in a signed envelope (:func:`sign`), checked
before anything in them is read (:func:`verify`)::

    trainctl-signed/1 <purpose> <hex HMAC-SHA256>\\n<body bytes>

The MAC covers the envelope version, the purpose (``payload``: launcher to instance;
``result``: instance to launcher; ``job``: the spec; ``rendezvous``: a multi-node run's
meeting point, node 0 to the other nodes), the run id and the body, so a payload cannot be replayed as
a result, nor an object of one run in another.

What the key does not protect against: anything that can read the agent's or the job's
environment on the instance (the job's own code and its dependencies, or another process of the
same user there), and anyone who can read the launcher's ``trainctl_home()``.

Example::

    key = new_key()
    blob = sign(key, data, purpose="payload", run_id="train-20250101-000000-ab12")
    data == verify(key, blob, purpose="payload", name="<run>/remote/payload.pkl", run_id="train-20250101-000000-ab12")
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path

from trainctl_lightning.errors import AuthenticationError, ConfigError
from trainctl_lightning.paths import trainctl_home

__all__ = [
    "RUN_KEY_ENV",
    "detached_signature",
    "forget_key",
    "is_signed",
    "keys_dir",
    "load_key",
    "new_key",
    "save_key",
    "sign",
    "verify",
    "verify_detached",
]

#: The environment variable through which the agent and the job receive the run's key.
RUN_KEY_ENV = "TRAINCTL_RUN_KEY"

_MAGIC = b"trainctl-signed/1"
_PURPOSES = frozenset({"payload", "result", "job", "rendezvous"})
#: The longest header we read: magic, a purpose, 64 hex digits and separators.
_MAX_HEADER = 128


def new_key() -> str:
    """A fresh key: 32 random bytes as hex."""
    return secrets.token_hex(32)


def _mac(key: str, purpose: str, run_id: str, data: bytes) -> str:
    if not key:
        raise ConfigError("an empty run key cannot sign or verify anything; the launcher makes one per run (runkey.new_key)")
    mac = hmac.new(key.encode(), digestmod=hashlib.sha256)
    for part in (_MAGIC, purpose.encode(), run_id.encode()):
        mac.update(len(part).to_bytes(4, "big") + part)  # length-prefixed: no two inputs collide
    mac.update(data)
    return mac.hexdigest()


def _check_purpose(purpose: str) -> None:
    if purpose not in _PURPOSES:
        raise ConfigError(f"signing purpose {purpose!r} is not one of {', '.join(sorted(_PURPOSES))}")


def sign(key: str, data: bytes, *, purpose: str, run_id: str = "") -> bytes:
    """``data`` in a signed envelope for ``purpose`` (``payload`` or ``result``) of run ``run_id``."""
    _check_purpose(purpose)
    tag = _mac(key, purpose, run_id, data)
    return b"%s %s %s\n" % (_MAGIC, purpose.encode(), tag.encode()) + data


def is_signed(blob: bytes) -> bool:
    """Whether ``blob`` looks like an envelope (says nothing about whether its tag is right)."""
    return blob.startswith(_MAGIC + b" ")


def verify(key: str | None, blob: bytes, *, purpose: str, name: str, run_id: str = "") -> bytes:
    """The body of an envelope written by :func:`sign` with ``key``, ``purpose`` and ``run_id``.

    Args:
        key: the run's key; None or empty when this side has none (refused).
        blob: the bytes as read from the store; nothing in them is interpreted before the check.
        purpose: ``payload`` or ``result``: what the object must have been signed as.
        name: the object, for the error message (``<run url>/remote/result.pkl``).
        run_id: the run the object must belong to.

    Raises:
        AuthenticationError: no key here, not an envelope, signed for another purpose or run, or
            the bytes were changed after signing. One line naming the object; nothing was unpickled.
    """
    _check_purpose(purpose)
    advice = (
        "something other than this run wrote it (anyone who can write to the store can plant objects); nothing in it "
        "was loaded. Check who can write to the store, then run again"
    )
    if not key:
        raise AuthenticationError(
            f"refusing {name}: this process has no key for run {run_id or '?'} (${RUN_KEY_ENV} is not set), so it cannot "
            "tell whether the run wrote it; start remote calls through trainctl (RemoteStrategy, remote()), which passes the key"
        )
    newline = blob.find(b"\n", 0, _MAX_HEADER)
    header = blob[:newline].split(b" ") if newline > 0 and is_signed(blob) else []
    if len(header) != 3:
        raise AuthenticationError(f"refusing {name}: it is not signed with run {run_id or '?'}'s key; {advice}")
    found_purpose, tag = header[1].decode("ascii", "replace"), header[2]
    if found_purpose != purpose:
        raise AuthenticationError(
            f"refusing {name}: it is signed as a {found_purpose!r} object where a {purpose!r} is expected; {advice}"
        )
    body = blob[newline + 1 :]
    if not hmac.compare_digest(tag, _mac(key, purpose, run_id, body).encode()):  # bytes: any input compares
        raise AuthenticationError(
            f"refusing {name}: its signature does not match run {run_id or '?'}'s key (changed after it was signed, or "
            f"signed for another run); {advice}"
        )
    return body


def detached_signature(key: str, data: bytes, *, purpose: str, run_id: str = "") -> bytes:
    """The envelope's header line alone, for an object that must stay plain (``job.json``)."""
    signed = sign(key, data, purpose=purpose, run_id=run_id)
    return signed[: len(signed) - len(data)]


def verify_detached(key: str | None, signature: bytes | None, data: bytes, *, purpose: str, name: str, run_id: str = "") -> None:
    """Check a :func:`detached_signature` of ``data``; raises as :func:`verify` does (a missing
    signature included)."""
    if signature is None or not signature.endswith(b"\n") or b"\n" in signature[:-1]:
        signature = b""
    verify(key, signature + data if signature else data, purpose=purpose, name=name, run_id=run_id)


# ----------------------------------------------------------------------------- launcher-side keys


def keys_dir() -> Path:
    """``trainctl_home()/keys``: one private file per run launched from this machine."""
    return trainctl_home() / "keys"


def _key_file(run_id: str) -> Path:
    from trainctl_lightning.jobs.spec import validate_run_id

    return keys_dir() / f"{validate_run_id(run_id)}.key"


def save_key(run_id: str, key: str) -> Path:
    """Keep ``key`` for ``run_id`` (mode 0600, folder 0700, written atomically). Returns the file."""
    path = _key_file(run_id)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)  # also when it existed with looser modes
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".key")  # mkstemp creates 0600
    try:
        with os.fdopen(fd, "w") as out:
            out.write(key)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_key(run_id: str) -> str | None:
    """The key saved for ``run_id`` on this machine, or None."""
    try:
        return _key_file(run_id).read_text().strip() or None
    except FileNotFoundError:
        return None


def forget_key(run_id: str) -> None:
    """Delete the key saved for ``run_id`` (no-op when there is none)."""
    _key_file(run_id).unlink(missing_ok=True)
