"""Real stores that misbehave on purpose: a filesystem whose data uploads can be held, or fail."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from lightning.pytorch.callbacks import Callback


class GatedFS:
    """Wraps a real fsspec filesystem; its ``put_file`` (how a store uploads checkpoint data)
    can be held at a gate or made to fail, and every call is recorded. Everything else, small
    objects and manifests included, passes straight through.

    Attributes:
        gate: uploads wait here while it is clear; set (open) at the start.
        delay_s: every upload takes this much longer (a slow store).
        failure: when set, every upload raises it instead (a store that is down).
        attempts: ``(file name, put_file keyword arguments)`` of every upload attempted, in order.
        finished: file names whose upload completed, in order.
        in_flight: uploads under way now (waiting at the gate included).
    """

    def __init__(self, fs: Any) -> None:
        self._fs = fs
        self.gate = threading.Event()
        self.gate.set()
        self.delay_s = 0.0
        self.failure: BaseException | None = None
        self.attempts: list[tuple[str, dict[str, Any]]] = []
        self.finished: list[str] = []
        self.in_flight = 0
        self._lock = threading.Lock()

    def put_file(self, lpath: Any, rpath: str, *args: Any, **kwargs: Any) -> Any:
        name = str(rpath).rsplit("/", 1)[-1]
        with self._lock:
            self.attempts.append((name, {k: v for k, v in kwargs.items() if k != "callback"}))
            self.in_flight += 1
        try:
            if self.failure is not None:
                raise self.failure
            assert self.gate.wait(60), "the test never opened the upload gate"
            time.sleep(self.delay_s)
            result = self._fs.put_file(lpath, rpath, *args, **kwargs)
            with self._lock:
                self.finished.append(name)
            return result
        finally:
            with self._lock:
                self.in_flight -= 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)


class WrapSyncStore(Callback):
    """Puts a :class:`GatedFS` under the store a ``CheckpointSync`` builds in its ``setup``.

    List it after the ``CheckpointSync`` (Lightning runs ``setup`` in list order), so the
    store exists when this runs. ``fs`` is the wrapper, ready before the fit starts.
    """

    def __init__(self, sync: Any) -> None:
        self.sync = sync
        self.fs: GatedFS | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        store = self.sync.store
        assert store is not None, "WrapSyncStore must come after its CheckpointSync in callbacks"
        if self.fs is None:
            self.fs = GatedFS(store.objects.fs)
        store.objects.fs = self.fs


@contextlib.contextmanager
def s3_in_subprocess() -> Iterator[dict[str, Any]]:
    """moto's S3 server in its own process (``python -m trainctl_lightning.testing serve``), with
    bucket ``trainctl-sub``; yields storage options. For measurements of this process only."""
    import subprocess
    import sys

    import boto3

    from trainctl_lightning.testing import DUMMY_ENV

    proc = subprocess.Popen(
        [sys.executable, "-m", "trainctl_lightning.testing", "serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **DUMMY_ENV},
    )
    try:
        assert proc.stdout is not None
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("http"), f"the S3 server printed {endpoint!r}"
        key, secret = DUMMY_ENV["AWS_ACCESS_KEY_ID"], DUMMY_ENV["AWS_SECRET_ACCESS_KEY"]
        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key, aws_secret_access_key=secret
        )
        client.create_bucket(Bucket="trainctl-sub")
        yield {"key": key, "secret": secret, "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # the server stops when its stdin closes
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
