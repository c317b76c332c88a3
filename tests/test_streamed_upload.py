"""A checkpoint's upload runs alongside its write: parts go up as the file grows past them.

The checkpoint is safe when the slower of the write and the upload ends, not when both have run
one after the other (issue 15's time to safe). These tests write a file step by step, as
``torch.save`` does (append-only), and look at the store while the write is still under way.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.helpers import wait_until
from tests.helpers.faults import FailingDisk, HeldDisk
from tests.helpers.models import TinyRegressor, trainer_kwargs
from trainctl_lightning import CheckpointSync
from trainctl_lightning.checkpoint.uploader import UploaderProcess
from trainctl_lightning.errors import StoreError, UploadError
from trainctl_lightning.store import RunStore
from trainctl_lightning.store.transfer import Growing

PART = 5 * 2**20  # S3's smallest part


class _Upload(threading.Thread):
    """``upload_hashed`` of a growing file on a thread of its own; its result or error kept."""

    def __init__(self, store: RunStore, path: Path, rel: str, growth: Growing) -> None:
        super().__init__(daemon=True)
        self.store, self.path, self.rel, self.growth = store, path, rel, growth
        self.result: tuple[str, int] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.store.objects.upload_hashed(str(self.path), self.rel, size=None, growth=self.growth)
        except BaseException as exc:
            self.error = exc


def _parts_up(s3: Any) -> int:
    client = s3.server.client()
    uploads = client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])
    return sum(len(client.list_parts(Bucket=s3.bucket, Key=u["Key"], UploadId=u["UploadId"]).get("Parts", [])) for u in uploads)


@pytest.fixture(params=["threads", "uploader-process"])
def streaming_store(request: pytest.FixtureRequest, s3: Any) -> Any:
    store = RunStore(s3.url("grow"), s3.server.storage_options(), max_concurrency=2, part_size=PART)
    uploader = UploaderProcess() if request.param == "uploader-process" else None
    store.objects.uploader = uploader
    yield store
    if uploader is not None:
        uploader.close()
        assert uploader.pid is None


def test_parts_go_up_while_the_file_is_still_being_written(tmp_path: Path, s3: Any, streaming_store: RunStore) -> None:
    data = os.urandom(3 * PART + 4321)
    path = tmp_path / "growing.ckpt"
    with open(path, "wb", buffering=0) as out:
        growth = Growing(os.dup(out.fileno()), expected=len(data))
        upload = _Upload(streaming_store, path, "objs/grown", growth)
        upload.start()
        try:
            out.write(data[: 2 * PART + 10])  # two whole parts and a bit: two can go
            wait_until(lambda: _parts_up(s3) == 2, timeout=30, what="two parts uploaded while the file is being written")
            assert upload.is_alive() and upload.result is None, "the upload waits for the rest of the file"
            out.write(data[2 * PART + 10 :])
            growth.end(len(data))
            upload.join(60)
        finally:
            growth.fail("the test ended")  # a no-op once the upload has ended; frees it otherwise
            upload.join(60)
            os.close(growth.fd)
    assert upload.error is None, upload.error
    assert upload.result == (hashlib.sha256(data).hexdigest(), len(data))
    assert _parts_up(s3) == 0, "the multipart upload was completed"
    assert streaming_store.objects.read("objs/grown") == data


def test_a_write_that_fails_midway_aborts_its_upload(tmp_path: Path, s3: Any, streaming_store: RunStore) -> None:
    path = tmp_path / "growing.ckpt"
    with open(path, "wb", buffering=0) as out:
        growth = Growing(os.dup(out.fileno()), expected=4 * PART)
        upload = _Upload(streaming_store, path, "objs/broken", growth)
        upload.start()
        try:
            out.write(os.urandom(2 * PART + 10))
            wait_until(lambda: _parts_up(s3) == 2, timeout=30, what="two parts uploaded while the file is being written")
            growth.fail("not written to /ckpts: No space left on device ([Errno 28])")
            upload.join(60)
        finally:
            os.close(growth.fd)
    assert isinstance(upload.error, StoreError) and "No space left on device" in str(upload.error)
    assert "\n" not in str(upload.error)
    client = s3.server.client()
    assert client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == [], "the parts sent were removed"
    assert not streaming_store.objects.exists("objs/broken")


def test_a_small_growing_file_goes_up_in_one_request(tmp_path: Path, s3: Any, streaming_store: RunStore) -> None:
    data = os.urandom(PART // 2)
    path = tmp_path / "small.ckpt"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    growth = Growing(fd, expected=2 * PART)  # smaller than expected: known only at its end
    try:
        upload = _Upload(streaming_store, path, "objs/small", growth)
        upload.start()
        growth.end(len(data))
        upload.join(60)
    finally:
        os.close(fd)
    assert upload.error is None and upload.result == (hashlib.sha256(data).hexdigest(), len(data))
    assert streaming_store.objects.read("objs/small") == data


def test_the_manifest_waits_for_the_write_to_succeed_as_a_whole(tmp_path: Path, s3: Any) -> None:
    """The data can be up before the file is safely in place (its fsync and rename): the
    manifest is written only after :meth:`Growing.commit`, and not at all after a failure then."""
    store = RunStore(s3.url("commit"), s3.server.storage_options(), max_concurrency=2, part_size=PART)
    data = os.urandom(PART + 5)
    results: dict[str, Any] = {}
    for outcome in ("committed", "failed"):
        path = tmp_path / f"{outcome}.ckpt"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        growth = Growing(fd, expected=len(data))
        growth.end(len(data))

        def publish(name: str = outcome, growth: Growing = growth, fd: int = fd) -> None:
            try:
                results[name] = store.publish_checkpoint(
                    [(f"/proc/self/fd/{fd}", "last.ckpt")], name="last.ckpt", verify_unchanged=False, growth=growth
                )
            except BaseException as exc:
                results[name] = exc

        thread = threading.Thread(target=publish)
        thread.start()
        try:
            wait_until(lambda: _data_objects(s3) >= 1, timeout=30, what="the data object uploaded")
            assert store.list_checkpoints() == [] and thread.is_alive(), "no manifest before the write has succeeded"
            if outcome == "committed":
                growth.commit()
            else:
                growth.fail("not written to /ckpts: Input/output error ([Errno 5])")
            thread.join(60)
        finally:
            growth.fail("the test ended")
            thread.join(60)
            os.close(fd)
        if outcome == "committed":
            assert [m.name for m in store.list_checkpoints()] == ["last.ckpt"]
            assert store.latest_checkpoint().files[0].sha256 == hashlib.sha256(data).hexdigest()
            _remove_all(s3)
        else:
            assert isinstance(results[outcome], StoreError) and "Input/output error" in str(results[outcome])
            assert store.list_checkpoints() == [] and _data_objects(s3) == 0, "the data sent is removed"


def _data_objects(s3: Any) -> int:
    listing = s3.server.client().list_objects_v2(Bucket=s3.bucket)
    return sum(1 for o in listing.get("Contents", []) if o["Key"].endswith(".ckpt"))


def _remove_all(s3: Any) -> None:
    client = s3.server.client()
    for o in client.list_objects_v2(Bucket=s3.bucket).get("Contents", []):
        client.delete_object(Bucket=s3.bucket, Key=o["Key"])


def test_a_disk_that_fills_up_mid_checkpoint_publishes_nothing_of_it(tmp_path: Path, s3: Any) -> None:
    """A fit whose second checkpoint's write fails after several parts went up alongside it: that
    checkpoint is reported once, as not written; nothing of it is left in the store (no object,
    no multipart upload); the first checkpoint stays the newest complete one."""
    ckpts = tmp_path / "c"
    width = 120_000  # ~9.6 MB per checkpoint: more than one part
    sync = CheckpointSync(s3.url("full"), storage_options=s3.server.storage_options(), part_size_mb=5)
    trainer = Trainer(
        **trainer_kwargs(max_steps=4, limit_val_batches=0),
        callbacks=[ModelCheckpoint(dirpath=ckpts, every_n_train_steps=2, save_top_k=-1), sync],
    )
    with FailingDisk(ckpts, errno.ENOSPC, nth=2, after_bytes=PART + PART // 2), pytest.raises(UploadError) as raised:
        trainer.fit(TinyRegressor(width=width))
    assert [f.split(" (")[0] for f in raised.value.failed] == ["epoch=0-step=4.ckpt"], str(raised.value)
    assert "No space left on device" in str(raised.value) and "\n" not in str(raised.value)
    store = RunStore(s3.url("full"), s3.server.storage_options())
    assert [m.global_step for m in store.list_checkpoints()] == [2]
    client = s3.server.client()
    assert client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket).get("Contents", [])]
    assert not [k for k in keys if "step=4" in k], keys


def test_a_write_that_outlasts_the_flush_is_named_and_its_upload_removed(tmp_path: Path, s3: Any) -> None:
    """A write that stalls after its first parts went up: the flush names the save as still being
    written, the upload that ran alongside it stops and removes its parts, nothing is published;
    the write completing later leaves its file, unpublished."""
    ckpts = tmp_path / "c"
    url = s3.url("held")
    sync = CheckpointSync(url, storage_options=s3.server.storage_options(), part_size_mb=5, flush_timeout=3)
    trainer = Trainer(
        **trainer_kwargs(max_steps=2, limit_val_batches=0),
        callbacks=[ModelCheckpoint(dirpath=ckpts, every_n_train_steps=2, save_top_k=-1), sync],
    )
    disk = HeldDisk(ckpts, after_bytes=PART + PART // 2)  # the checkpoint is ~9.6 MB
    try:
        with disk, pytest.raises(UploadError, match=r"still being written to local disk .*: epoch=0-step=2\.ckpt"):
            trainer.fit(TinyRegressor(width=120_000))
        assert disk.held.is_set()
        result = sync.last_flush
        assert result is not None and result.unwritten == ["epoch=0-step=2.ckpt"] and result.failed == []
        client = s3.server.client()
        assert client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == [], "the parts sent were removed"
    finally:
        disk.release()
    wait_until(lambda: (ckpts / "epoch=0-step=2.ckpt").stat().st_size > PART * 3 // 2, timeout=30, what="the held write to end")
    assert RunStore(url, s3.server.storage_options()).list_checkpoints() == []
    assert [o["Key"] for o in s3.server.client().list_objects_v2(Bucket=s3.bucket).get("Contents", [])] == []


def test_torch_save_only_appends_which_is_what_the_upload_relies_on(tmp_path: Path) -> None:
    """The upload reads a checkpoint while ``torch.save`` writes it, trusting every byte below the
    file's size to be final. ``torch.save`` writes through ``_AppendOnly``, which notes any seek:
    none in a checkpoint's save (if a torch release starts seeking, this fails and says so); under
    ``skip_data`` it does seek, is noted, and the upload then waits for the whole file."""
    import torch

    from trainctl_lightning.checkpoint.io import _AppendOnly

    state = {"state_dict": {"w": torch.randn(256, 256), "b": torch.zeros(3, dtype=torch.int64)}, "epoch": 1}
    with open(tmp_path / "a.ckpt", "wb") as out:
        appended = _AppendOnly(out)
        torch.save(state, appended)
    assert not appended.moved, "torch.save moved in the file: uploading while it writes is no longer safe"
    loaded = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"])
    with open(tmp_path / "b.ckpt", "wb") as out, torch.serialization.skip_data():
        appended = _AppendOnly(out)
        torch.save(state, appended)
    assert appended.moved


def test_checkpoints_and_downloads_reach_the_disk_in_writes_of_at_most_one_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One write of a whole tensor (or a whole 16 MiB range) was at times several times as costly in
    kernel time as the same bytes in WRITE_CHUNK pieces (see ``transfer.WRITE_CHUNK``)."""
    import torch

    from trainctl_lightning.checkpoint.io import _AppendOnly
    from trainctl_lightning.store.transfer import WRITE_CHUNK, _write_all

    sizes: list[int] = []

    class Recorded:
        def __init__(self, out: Any) -> None:
            self.out = out

        def write(self, data: Any) -> int:
            sizes.append(len(memoryview(data).cast("B")))
            return int(self.out.write(data))

        def flush(self) -> None:
            self.out.flush()

    weights = torch.randn(3 * WRITE_CHUNK // 4 + 1000)  # one storage of about 3 chunks
    with open(tmp_path / "a.ckpt", "wb") as out:
        torch.save({"w": weights}, _AppendOnly(Recorded(out)))
    assert max(sizes) <= WRITE_CHUNK and sum(sizes) == (tmp_path / "a.ckpt").stat().st_size
    assert sum(1 for n in sizes if n == WRITE_CHUNK) >= 3, sizes
    assert torch.equal(torch.load(tmp_path / "a.ckpt", weights_only=True)["w"], weights)

    data = os.urandom(2 * WRITE_CHUNK + 17)
    fd = os.open(tmp_path / "range", os.O_RDWR | os.O_CREAT, 0o600)
    written: list[int] = []
    real = os.pwrite

    def pwrite(fd_: int, buf: Any, offset: int) -> int:
        written.append(len(buf))
        return real(fd_, buf, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    try:
        _write_all(fd, data, 5)
    finally:
        os.close(fd)
    monkeypatch.undo()
    assert written == [WRITE_CHUNK, WRITE_CHUNK, 17]
    assert (tmp_path / "range").read_bytes() == b"\0" * 5 + data
