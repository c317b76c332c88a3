"""CheckpointSync's tuning options on real fits: flush_timeout, retry_timeout,
max_pending_snapshots, and max_concurrency / part_size_mb reaching S3's multipart upload.

A slow or failing store is a real one whose filesystem is wrapped (tests/helpers/stores.py):
its checkpoint data uploads can be delayed, held or made to fail; everything else is real."""

from __future__ import annotations

import os
import threading
import time

import lightning.pytorch as pl
import pytest
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tests.helpers import wait_until
from tests.helpers.models import TinyRegressor, trainer_kwargs
from tests.helpers.stores import WrapSyncStore
from trainctl_lightning import CheckpointSync, RunStore, UploadError
from trainctl_lightning.checkpoint.io import PENDING_MARKER, SnapshotCheckpointIO

STEP2 = "epoch=0-step=2.ckpt"


def _every_step(folder, n: int = 1) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=folder, every_n_train_steps=n, save_top_k=-1)


def test_an_upload_that_outlasts_flush_timeout_is_named_as_unfinished(file_url, tmp_path):
    sync = CheckpointSync(file_url, flush_timeout=0.3)
    slow = WrapSyncStore(sync)

    class SlowStore(Callback):
        def on_train_start(self, trainer, pl_module):
            slow.fs.delay_s = 2.5  # each checkpoint upload takes far longer than flush_timeout

    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=2, limit_val_batches=0),
        callbacks=[sync, slow, SlowStore(), _every_step(tmp_path / "c", n=2)],
    )
    started = time.monotonic()
    with pytest.raises(UploadError, match="still uploading when the wait ended: epoch=0-step=2.ckpt") as raised:
        trainer.fit(TinyRegressor())

    assert raised.value.failed == [STEP2]
    result = sync.last_flush
    assert result is not None and not result.ok
    assert result.unfinished == [STEP2] and result.published == [] and result.failed == []
    assert [name for name, _ in slow.fs.attempts] == [STEP2], "the upload had started"
    assert time.monotonic() - started < 15, "the flush did not wait for the upload to end"
    wait_until(lambda: slow.fs.in_flight == 0, timeout=15, what="the abandoned upload to end")


def test_a_write_that_outlasts_flush_timeout_is_named_as_unfinished(file_url, tmp_path):
    disk_back = threading.Event()

    class StuckDisk(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            disk_back.wait(30)  # the local write hangs until the test lets it go
            super().save_checkpoint(checkpoint, path, storage_options)

    sync = CheckpointSync(file_url, flush_timeout=0.3)
    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=2, limit_val_batches=0),
        plugins=[StuckDisk()],
        callbacks=[sync, _every_step(tmp_path / "c", n=2)],
    )
    try:
        with pytest.raises(UploadError, match=r"still being written to local disk .*: epoch=0-step=2\.ckpt"):
            trainer.fit(TinyRegressor())
        result = sync.last_flush
        assert result is not None and not result.ok
        assert STEP2 in result.unfinished + [entry.split(" (")[0] for entry in result.failed]
        assert result.unwritten == [STEP2] and result.published == []
    finally:
        disk_back.set()
        # The name was reserved (a placeholder) from the save on, and holds the checkpoint once written.
        wait_until(lambda: (tmp_path / "c" / STEP2).read_bytes() != PENDING_MARKER, timeout=15, what="the held write to end")
    # The write that completed after the flush left its file, and nothing else.
    assert os.listdir(tmp_path / "c") == [STEP2]
    assert RunStore(file_url).list_checkpoints() == [], "nothing was published after the flush ended"


def test_a_store_down_longer_than_retry_timeout_fails_the_checkpoint_by_name(file_url, tmp_path):
    sync = CheckpointSync(file_url, retry_timeout=1.0, flush_timeout=30)
    down = WrapSyncStore(sync)

    class StoreDown(Callback):
        def on_train_start(self, trainer, pl_module):
            down.fs.failure = ConnectionRefusedError(111, "Connection refused: the store is down")

    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=2, limit_val_batches=0),
        callbacks=[sync, down, StoreDown(), _every_step(tmp_path / "c", n=2)],
    )
    started = time.monotonic()
    with pytest.raises(
        UploadError, match=r"failed: epoch=0-step=2\.ckpt \(StoreError: cannot reach the storage endpoint .*the store is down"
    ) as raised:
        trainer.fit(TinyRegressor())
    took = time.monotonic() - started

    assert trainer.global_step == 2, "training ran to the end"
    assert [entry.split(" (")[0] for entry in raised.value.failed] == [STEP2]
    result = sync.last_flush
    assert result.unfinished == [], "it gave up after retry_timeout, before the flush stopped waiting"
    assert [entry.split(" (")[0] for entry in result.failed] == [STEP2]
    attempts = [name for name, _ in down.fs.attempts]
    assert len(attempts) >= 2 and set(attempts) == {STEP2}, f"a transient error is retried: {attempts}"
    assert took < 15, f"gave up after {took:.1f}s, not after retry_timeout=1s"
    assert RunStore(file_url).list_checkpoints() == []
    assert (tmp_path / "c" / STEP2).is_file(), "the local copy is kept"


def test_max_pending_snapshots_lets_saves_queue_while_uploads_are_slow_and_all_publish_in_order(file_url, tmp_path):
    class SlowDisk(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            time.sleep(0.3)  # the local write of each checkpoint is slow
            super().save_checkpoint(checkpoint, path, storage_options)

    sync = CheckpointSync(file_url, max_pending_snapshots=4, upload_workers=1)
    gated = WrapSyncStore(sync)
    seen = {}

    class HoldUploadsUntilTrainingEnds(Callback):
        def on_train_start(self, trainer, pl_module):
            gated.fs.gate.clear()

        def on_train_end(self, trainer, pl_module):
            io = trainer.strategy.checkpoint_io
            seen.update(wait_s=io.snapshot_wait_s, finished=list(gated.fs.finished))
            gated.fs.gate.set()

    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=4, limit_val_batches=0),
        plugins=[SlowDisk()],
        callbacks=[sync, gated, HoldUploadsUntilTrainingEnds(), _every_step(tmp_path / "c")],
    )
    trainer.fit(TinyRegressor())

    assert isinstance(sync._io, SnapshotCheckpointIO)
    # four saves, each slow to reach disk, and not one of them waited for a free snapshot
    assert seen["wait_s"] == 0.0, f"saves waited {seen['wait_s']:.2f}s for a snapshot slot"
    assert seen["finished"] == [], "no upload could finish while training ran"
    names = [f"epoch=0-step={s}.ckpt" for s in (1, 2, 3, 4)]
    assert gated.fs.finished == names, "uploaded in the order they were saved"
    published = RunStore(file_url).list_checkpoints()
    assert [(m.name, m.global_step) for m in published] == list(zip(names, (1, 2, 3, 4)))
    assert sync.last_flush.ok and sync.last_flush.published == names
    assert sync.last_published.global_step == 4


def test_max_concurrency_and_part_size_reach_the_s3_multipart_upload(s3, tmp_path):
    url = s3.url()
    part = 5 * 2**20
    sync = CheckpointSync(url, max_concurrency=3, part_size_mb=5)
    recorder = WrapSyncStore(sync)
    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=1, limit_val_batches=0),
        callbacks=[sync, recorder, _every_step(tmp_path / "c")],
    )
    trainer.fit(TinyRegressor(width=150_000))  # an ~11.5 MiB checkpoint: three 5 MiB parts

    [manifest] = RunStore(url).list_checkpoints()
    [entry] = manifest.files
    assert 2 * part < entry.size < 3 * part
    [(name, kwargs)] = recorder.fs.attempts
    assert name == entry.path and kwargs["max_concurrency"] == 3 and kwargs["chunksize"] == part

    # what S3 holds was uploaded in 5 MiB parts (a default 16 MiB part would be one plain PUT)
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    key = f"{prefix}/checkpoints/{manifest.id}/{entry.path}"
    client = s3.server.client()
    head = client.head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == entry.size
    assert head["ETag"].strip('"').endswith("-3"), f"not a three-part multipart upload: ETag {head['ETag']}"
    first = client.head_object(Bucket=bucket, Key=key, PartNumber=1)
    assert first["ContentLength"] == part


@pytest.mark.parametrize("zip_crc32", [False, True])
def test_zip_crc32_decides_whether_checkpoint_files_carry_zip_checksums_and_both_resume(file_url, tmp_path, zip_crc32):
    import zipfile

    import torch

    from trainctl_lightning import resume_path

    folder = tmp_path / "c"
    kwargs = {} if not zip_crc32 else {"zip_crc32": True}
    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=2, limit_val_batches=0),
        callbacks=[CheckpointSync(file_url, **kwargs), _every_step(folder, n=2)],
    )
    trainer.fit(TinyRegressor())

    local = folder / STEP2
    with zipfile.ZipFile(local) as archive:
        bad = archive.testzip()  # the first record whose CRC-32 does not match (None: all do)
    if zip_crc32:
        assert bad is None
    else:
        assert bad is not None and bad.endswith("data.pkl"), "torch.save wrote each record's CRC-32 anyway"
    assert torch.serialization.get_crc32_options() is True, "the process-wide option was not put back"

    path = resume_path(file_url, cache_dir=tmp_path / "cache")  # downloaded and verified by its SHA-256
    assert path is not None and os.path.basename(path) == STEP2
    resumed = pl.Trainer(**trainer_kwargs(max_steps=3, limit_val_batches=0))
    resumed.fit(TinyRegressor(), ckpt_path=path)
    assert resumed.global_step == 3


def test_zip_crc32_is_checked_before_training():
    from trainctl_lightning import ConfigError

    with pytest.raises(ConfigError, match=r"CheckpointSync\(zip_crc32='no'\): must be True or False"):
        CheckpointSync("file:///tmp/x", zip_crc32="no")  # type: ignore[arg-type]


def test_the_zip_crc32_option_is_put_back_once_torch_save_has_opened_its_writer():
    """The option is read once, when torch.save opens its zip writer. In torch releases where it is
    process-wide (not per thread, as in newer ones), another thread's torch.save sees ours only
    until the checkpoint's first byte is written: by then it is back to what it was."""
    import io
    import zipfile

    import torch

    from trainctl_lightning.checkpoint.io import _ZipCrc32

    seen: list[bool] = []

    class File(io.BytesIO):
        def write(self, data):  # type: ignore[override]
            seen.append(torch.serialization.get_crc32_options())
            return super().write(data)

    ours = File()
    with _ZipCrc32(False) as crc:
        assert torch.serialization.get_crc32_options() is False
        torch.save({"w": torch.ones(1000)}, crc.writer(ours))
    assert seen and all(seen), "the option was still ours while the file was written"
    with zipfile.ZipFile(io.BytesIO(ours.getvalue())) as archive:
        assert archive.testzip() is not None, "written with the CRC-32s after all"
    assert torch.serialization.get_crc32_options() is True
