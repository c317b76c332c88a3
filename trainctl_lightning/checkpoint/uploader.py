"""The uploader process: checkpoint uploads run outside the training interpreter.

An upload's Python work (reading parts, SHA-256, botocore's request signing and checksums,
aiohttp's event loop) competes with the training loop for the GIL and a core when it runs on
threads of the training process. :class:`UploaderProcess` runs it in one long-lived child process
instead, for the same reason torch.distributed.checkpoint's process-based async checkpointer
does:

* started ahead of the first upload (:meth:`UploaderProcess.start`, when the publisher starts with
  a run's first save; ``python -m trainctl_lightning.checkpoint.uploader``, not
  ``multiprocessing``'s spawn, which would import the user's ``__main__`` script again), so that
  its imports and its connection to the store are ready by the time the first part is written;
  started again by an upload that finds it gone; ended by :meth:`UploaderProcess.close`
  (CheckpointSync's teardown); ``PR_SET_PDEATHSIG`` ends it when the training process dies, even
  by SIGKILL;
* started with ``vfork`` (no ``preexec_fn``; the child sets ``PR_SET_PDEATHSIG`` itself), never a
  ``fork`` of the training process: a fork shares the trainer's whole memory copy-on-write with
  the child until ``exec`` (its RSS is the trainer's meanwhile, and pages the training loop writes
  then are copied), which measured as a spike of 2.7x the state on top of the snapshot;
* each job goes over a private socket pair: the checkpoint file as a file descriptor
  (``SCM_RIGHTS``: the child reads the same private inode), the store's URL and
  ``storage_options`` (credentials) pickled on that socket only, never in argv, the environment
  or a log line;
* the child runs :func:`~trainctl_lightning.store.transfer.upload_hashed` (one pass, parts hashed
  as read) and replies with the SHA-256 and size, or with the error as one line;
* a file still being written (a :class:`~trainctl_lightning.store.transfer.Growing`) is read by
  the child as it grows (its size, through the shared descriptor); this process tells it on the
  same socket when the write has ended, with the final size, or failed;
* the training process keeps everything else: retries, the size check, the manifest (last).

A child that dies mid-upload fails that upload with one line naming it; the next upload starts a
fresh child. Nothing is deleted on the way: an incomplete multipart upload it leaves is removed by
the store's lifecycle rules or ``trainctl ckpt gc``.

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from multiprocessing.reduction import recvfds, sendfds
from typing import Any

from trainctl_lightning.errors import StoreError
from trainctl_lightning.store.transfer import Growing, Growth

__all__ = ["UploaderProcess", "supported"]

log = logging.getLogger(__name__)

_POLL_S = 0.2
_GROWTH_POLL_S = 0.01
"""How often a write's end is looked for while the child reads the file as it grows."""


def supported() -> bool:
    """Whether this platform can pass file descriptors to a child (Linux, macOS)."""
    return sys.platform.startswith("linux") or sys.platform == "darwin"


class UploaderProcess:
    """One child process that uploads checkpoint files for this process, one at a time.

    Thread-safe: concurrent :meth:`upload` calls take turns (each upload is itself parallel).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._sock: socket.socket | None = None
        self.started = 0
        """Child processes started so far (tests and benchmarks read it)."""
        self.in_flight: str | None = None
        """The remote path the child is uploading now (handed over), or None."""

    @property
    def pid(self) -> int | None:
        """The running child's pid, or None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self, store: dict[str, Any]) -> None:
        """Start the child now, without waiting for it: it imports what it needs and opens ``store``
        (the argument of :meth:`upload`) while the first checkpoint is being written. A failure
        here is logged; the first upload starts the child again and reports its own error."""
        with self._lock:
            try:
                conn = self._ensure()
                conn.send({"warm": store})
            except (OSError, ValueError) as exc:
                log.warning("trainctl: could not start the uploader process ahead of the first upload: %s", exc)
                self._end("it failed to start")

    def upload(
        self,
        store: dict[str, Any],
        fd: int,
        remote: str,
        size: int | None,
        *,
        stop: threading.Event | None = None,
        growth: Growing | None = None,
    ) -> tuple[str, int]:
        """Upload the bytes of ``fd`` to the backend path ``remote`` in the child; returns (SHA-256, size).

        Args:
            store: ``url``, ``storage_options``, ``max_concurrency`` and ``part_size`` of the store.
            size: the file's size; None with ``growth`` (the file is read as it is written).

        Raises:
            StoreError: the child died, was stopped, or the upload failed there (one line).
        """
        with self._lock:
            conn = self._ensure()
            told = growth is None  # whether the child knows how the write ended
            try:
                expected = growth.expected if growth is not None else size
                conn.send({"store": store, "remote": remote, "size": size, "growing": growth is not None, "expected": expected})
                assert self._sock is not None
                sendfds(self._sock, [fd])
                self.in_flight = remote
                while not conn.poll(_POLL_S if told else _GROWTH_POLL_S):
                    if not told:
                        assert growth is not None
                        final, error = growth.outcome()
                        if error is not None:
                            conn.send(("failed", error))
                            told = True
                        elif final is not None:
                            conn.send(("ended", final))
                            told = True
                    if stop is not None and stop.is_set():
                        self._end("the publisher is closing")
                        raise StoreError("transfer stopped: the publisher is closing (the uploader process was ended)")
                    if self._proc is None or self._proc.poll() is not None:
                        break
                reply = conn.recv()
            except (EOFError, OSError) as exc:
                code = None
                if self._proc is not None:
                    try:
                        code = self._proc.wait(timeout=5)  # its socket closed: it is ending, or ended
                    except subprocess.TimeoutExpired:
                        code = None
                self._end("it failed")
                why = (
                    f"exit code {code}" if code is not None and code >= 0 else f"signal {-code}" if code is not None else str(exc)
                )
                raise StoreError(
                    f"the uploader process ended ({why}) while uploading {remote}; "
                    "this upload failed and the next one starts a fresh process"
                ) from None
            finally:
                self.in_flight = None
        if reply[0] == "ok":
            return str(reply[1]), int(reply[3])
        if reply[2]:  # transient there: the caller's retry policy runs the upload again
            raise ConnectionError(f"upload of {remote} failed in the uploader process: {reply[1]}")
        raise StoreError(f"upload of {remote} failed in the uploader process: {reply[1]}")

    def close(self) -> None:
        """End the child (idempotent); a running upload fails."""
        with self._lock:
            self._end(None)

    # ------------------------------------------------------------------ internals
    def _ensure(self) -> Connection:
        if self._conn is not None and self._proc is not None and self._proc.poll() is None:
            return self._conn
        self._end(None)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            env = dict(os.environ)
            env["TRAINCTL_UPLOADER_FD"] = str(child.fileno())
            env["TRAINCTL_UPLOADER_PARENT"] = str(os.getpid())
            # No preexec_fn: subprocess then starts the child with vfork, not fork. A fork of the
            # training process copies its page tables and shares every page of its (multi-GB)
            # memory copy-on-write with the child until exec: the child's RSS is the trainer's for
            # that while, and each page the training loop writes meanwhile is copied. The child
            # asks for PDEATHSIG itself (die_with_parent_now).
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "trainctl_lightning.checkpoint.uploader"],
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.started += 1
        self._sock = parent
        self._conn = Connection(os.dup(parent.fileno()))
        log.debug("trainctl: uploader process %d started", self._proc.pid)
        return self._conn

    def _end(self, why: str | None) -> None:
        conn, self._conn = self._conn, None
        sock, self._sock = self._sock, None
        proc, self._proc = self._proc, None
        if conn is not None:
            conn.close()  # the child's recv sees EOF and exits
        if sock is not None:
            sock.close()
        if proc is None:
            return
        if why is not None and proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- the child
class _Told(Growth):
    """The child's view of a file the training process is still writing: how the write ended
    comes on the job's socket."""

    def __init__(self, fd: int, expected: int, conn: Connection) -> None:
        super().__init__(fd, expected)
        self._conn = conn
        self._final: int | None = None

    def _ended(self, timeout: float) -> int | None:
        if self._final is None and self._conn.poll(timeout):
            kind, value = self._conn.recv()
            if kind == "failed":
                raise StoreError(str(value))
            self._final = int(value)
        return self._final


def _warm(store: Any) -> None:
    """Make ``store``'s upload client and open a connection to its bucket, as the first upload would."""
    from trainctl_lightning.store.transfer import warm_up

    warm_up(store.fs, store.path(""), store.max_concurrency)


def _serve(fd: int) -> None:
    from trainctl_lightning.retry import is_transient
    from trainctl_lightning.store.objects import ObjectStore
    from trainctl_lightning.store.transfer import upload_hashed

    sock = socket.socket(fileno=fd)
    conn = Connection(os.dup(fd))
    stores: dict[str, ObjectStore] = {}
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return  # the training process closed its end: done
        if not isinstance(job, dict):
            continue  # how an earlier job's write ended, sent after this side had replied: stale

        def open_store(spec: dict[str, Any]) -> ObjectStore:
            key = repr(sorted((k, repr(v)) for k, v in spec.items()))
            store = stores.get(key)
            if store is None:
                store = stores[key] = ObjectStore(
                    spec["url"], spec["storage_options"], max_concurrency=spec["max_concurrency"], part_size=spec["part_size"]
                )
            return store

        if "warm" in job:  # ahead of the first upload: the client and its connection pool, ready
            try:
                _warm(open_store(job["warm"]))
            except Exception:  # the first upload meets the same error and reports it
                pass
            continue
        (data_fd,) = recvfds(sock, 1)
        reply: tuple[str, str, bool, int]
        try:
            store = open_store(job["store"])
            digest, size = upload_hashed(
                store.fs,
                data_fd,
                job["remote"],
                job["size"],
                concurrency=store.max_concurrency,
                part_size=store.part_size,
                growth=_Told(data_fd, int(job["expected"]), conn) if job.get("growing") else None,
            )
            reply = ("ok", digest, False, size)
        except Exception as exc:  # sent back as one line: the training process retries it or reports it
            reply = ("error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", is_transient(exc), 0)
        finally:
            os.close(data_fd)
        conn.send(reply)


if __name__ == "__main__":
    from trainctl_lightning.agent.jobproc import die_with_parent_now

    die_with_parent_now(int(os.environ.pop("TRAINCTL_UPLOADER_PARENT")))
    _serve(int(os.environ.pop("TRAINCTL_UPLOADER_FD")))
