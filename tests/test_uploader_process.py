"""The uploader process: checkpoint uploads to S3 outside the training interpreter."""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.helpers import wait_until
from tests.helpers.models import TinyRegressor, trainer_kwargs
from trainctl_lightning import CheckpointSync
from trainctl_lightning.checkpoint.uploader import UploaderProcess
from trainctl_lightning.errors import ConfigError, StoreError
from trainctl_lightning.store import RunStore

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc: Linux")

PART = 5 * 2**20


def _uploader_children() -> list[int]:
    """Pids of this process's children that run the uploader module."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"trainctl_lightning.checkpoint.uploader" in cmdline:
            pids.append(int(entry))
    return pids


def _spec(store: RunStore) -> dict[str, Any]:
    objects = store.objects
    return {
        "url": objects.url,
        "storage_options": objects._storage_options,
        "max_concurrency": objects.max_concurrency,
        "part_size": objects.part_size,
    }


def _upload(uploader: UploaderProcess, store: RunStore, local: Path, rel: str) -> str:
    fd = os.open(local, os.O_RDONLY)
    try:
        digest, size = uploader.upload(_spec(store), fd, store.objects.path(rel), local.stat().st_size)
    finally:
        os.close(fd)
    assert size == local.stat().st_size
    return digest


def test_checkpoint_sync_uploads_from_a_child_that_ends_with_the_fit(
    tmp_path: Path, s3: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sync = CheckpointSync(s3.url("proc"), storage_options=s3.server.storage_options())
    trainer = Trainer(
        **trainer_kwargs(max_steps=4, limit_val_batches=0),
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2, save_top_k=-1), sync],
        default_root_dir=tmp_path,
    )
    with caplog.at_level(logging.DEBUG, logger="trainctl_lightning.checkpoint.uploader"):
        trainer.fit(TinyRegressor())
    assert sync.last_flush is not None and sync.last_flush.ok and len(sync.last_flush.published) == 2
    assert sum("uploader process" in r.getMessage() and "started" in r.getMessage() for r in caplog.records) == 1
    assert _uploader_children() == [], "the uploader process ends with the fit"
    store = RunStore(s3.url("proc"), s3.server.storage_options())
    for manifest in store.list_checkpoints():
        path = store.download_checkpoint(manifest, tmp_path / "dl" / manifest.id)
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == manifest.files[0].sha256


def test_the_uploader_is_started_and_connected_before_the_first_upload(
    tmp_path: Path, s3: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The publisher starts the child with a run's first save: its imports, its S3 client and a
    request to the bucket are done while that checkpoint is being written, not after."""
    from trainctl_lightning.checkpoint.publisher import Publisher

    store = RunStore(s3.url("warm"), s3.server.storage_options(), part_size=PART)
    caplog.set_level(logging.INFO, logger="werkzeug")  # moto's server: one line per request it serves

    def heads() -> int:
        return sum(f'"HEAD /{s3.bucket} ' in r.getMessage() for r in caplog.records if r.name == "werkzeug")

    assert heads() == 0
    publisher = Publisher(store, upload_process=True)
    try:
        uploader = publisher.uploader
        assert uploader is not None and uploader.started == 1 and uploader.pid is not None
        wait_until(lambda: heads() == 1, timeout=30, what="the uploader's request to the bucket, before any upload")
        local = tmp_path / "big.ckpt"
        local.write_bytes(os.urandom(PART + 1))
        assert _upload(uploader, store, local, "objs/first") == hashlib.sha256(local.read_bytes()).hexdigest()
        assert uploader.started == 1, "the first upload used the child started ahead of it"
    finally:
        publisher.close()
    assert _uploader_children() == []


def test_upload_process_option_is_checked() -> None:
    with pytest.raises(ConfigError, match="upload_process='yes'"):
        CheckpointSync("s3://bucket/run", upload_process="yes")  # type: ignore[arg-type]


def test_a_killed_uploader_fails_that_upload_and_the_next_starts_fresh(tmp_path: Path, s3: Any) -> None:
    store = RunStore(s3.url("killed"), s3.server.storage_options(), max_concurrency=2, part_size=PART)
    local = tmp_path / "big.ckpt"
    data = os.urandom(2 * PART + 99)
    local.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    uploader = UploaderProcess()
    try:
        assert _upload(uploader, store, local, "objs/first") == digest
        pid = uploader.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # the next job waits in the socket until the child is killed
        errors: list[BaseException] = []

        def upload() -> None:
            try:
                _upload(uploader, store, local, "objs/second")
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=upload)
        thread.start()
        wait_until(lambda: uploader.in_flight is not None, what="the job handed to the stopped child")
        os.kill(pid, signal.SIGKILL)
        thread.join(30)
        assert len(errors) == 1 and isinstance(errors[0], StoreError), errors
        message = str(errors[0])
        assert "\n" not in message and "uploader process ended (signal 9)" in message and "objs/second" in message
        assert store.objects.exists("objs/first"), "nothing uploaded before is removed"
        assert _upload(uploader, store, local, "objs/third") == digest
        assert uploader.started == 2 and uploader.pid not in (None, pid)
    finally:
        uploader.close()
    assert uploader.pid is None and _uploader_children() == []


def test_starting_the_uploader_shares_no_memory_with_the_training_process(tmp_path: Path, s3: Any) -> None:
    """The uploader is not a fork of the training process (issue 15's RSS spike of 2.7x the state).

    A fork shares every page of the trainer's memory copy-on-write with the child until it runs
    ``exec``: the child's RSS is the trainer's for that while, and the pages stay write-protected
    in the trainer, so the training loop's next write to each takes a fault (a copy while the
    child still holds it). Measured here: the faults this thread takes rewriting a buffer it had
    already written, after an upload started the uploader process.
    """
    store = RunStore(s3.url("vfork"), s3.server.storage_options(), max_concurrency=2, part_size=PART)
    local = tmp_path / "small.ckpt"
    local.write_bytes(os.urandom(1000))
    size = 32 * 2**20
    pages = size // mmap.PAGESIZE
    state = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # like the trainer's heap: private
    state.madvise(mmap.MADV_NOHUGEPAGE)  # one fault per page, not per 2 MB

    def write_every_page(value: int) -> int:
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for offset in range(0, size, mmap.PAGESIZE):
            state[offset] = value
        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before

    uploader = UploaderProcess()
    try:
        assert write_every_page(1) >= pages  # first touch: one fault per page (the yardstick)
        assert write_every_page(2) < pages // 10  # written pages: no faults
        assert _upload(uploader, store, local, "objs/x") == hashlib.sha256(local.read_bytes()).hexdigest()
        assert uploader.started == 1
        faults = write_every_page(3)
    finally:
        uploader.close()
        state.close()
    assert faults < pages // 10, (
        f"{faults} of {pages} pages written before the uploader started were write-protected by then: "
        "the training process was forked"
    )


def test_the_uploader_dies_with_a_killed_training_process(tmp_path: Path, s3: Any) -> None:
    local = tmp_path / "small.ckpt"
    local.write_bytes(os.urandom(1000))
    script = f"""
import os, sys, time
from trainctl_lightning.checkpoint.uploader import UploaderProcess
from trainctl_lightning.store import RunStore
store = RunStore({s3.url("orphan")!r}, {s3.server.storage_options()!r})
up = UploaderProcess()
fd = os.open({str(local)!r}, os.O_RDONLY)
spec = dict(url=store.objects.url, storage_options=store.objects._storage_options, max_concurrency=2, part_size={PART})
up.upload(spec, fd, store.objects.path("objs/x"), 1000)
print(up.pid, flush=True)
time.sleep(600)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        assert os.path.exists(f"/proc/{child}")
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def gone() -> bool:
        try:
            with open(f"/proc/{child}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # reaped by init soon after
        except FileNotFoundError:
            return True

    wait_until(gone, timeout=30, what=f"the uploader process {child} to end after its parent was SIGKILLed")


def test_an_outage_during_an_upload_in_the_child_is_retried_by_this_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without SDK retries, the child meets the refused connection and replies with it as a
    transient error; this process's retry policy runs the upload again until the endpoint is back."""
    from trainctl_lightning.retry import RetryPolicy
    from trainctl_lightning.testing import LocalS3

    caplog.set_level(logging.WARNING, logger="trainctl_lightning.retry")
    server = LocalS3().start()
    try:
        server.create_bucket("trainctl-outage-child")
        options = {**server.storage_options(), "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 1}}}
        retry = RetryPolicy(deadline_s=60.0, initial_backoff_s=0.1, max_backoff_s=0.5)
        store = RunStore("s3://trainctl-outage-child/run", options, retry=retry, max_concurrency=2, part_size=PART)
        uploader = UploaderProcess()
        store.objects.uploader = uploader
        local = tmp_path / "big.ckpt"
        data = os.urandom(2 * PART + 7)
        local.write_bytes(data)
        result: list[Any] = []
        try:
            uploader.start(store.objects.uploader_spec())
            server.stop()  # the endpoint goes away before the upload begins
            thread = threading.Thread(
                target=lambda: result.append(store.objects.upload_hashed(str(local), "objs/x", size=len(data)))
            )
            thread.start()
            wait_until(
                lambda: any(r.getMessage().startswith("upload s3://trainctl-outage-child") for r in caplog.records),
                timeout=30,
                what="this process's retry layer to see the child's failed attempt",
            )
            server.start()  # same port: the endpoint comes back
            thread.join(60)
        finally:
            uploader.close()
        assert result == [(hashlib.sha256(data).hexdigest(), len(data))]
        assert uploader.started == 1, "the child rode the outage out: its transient error was retried, it was not restarted"
        assert server.client().get_object(Bucket="trainctl-outage-child", Key="run/objs/x")["Body"].read() == data
    finally:
        if server.running:
            server.stop()
    assert _uploader_children() == []
