"""Rotation and replacement while uploads are in flight, driven through the publisher directly."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from trainctl_lightning import RunStore
from trainctl_lightning.checkpoint.publisher import Publisher, PublishJob, PublishState
from trainctl_lightning.store import ObjectStore
from trainctl_lightning.timeutil import utc_now


class GatedObjects(ObjectStore):
    """A real object layer whose uploads of chosen files wait for a gate (or fail)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.gates: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}
        self.fail: set[str] = set()

    def _gate(self, rel):
        name = Path(rel).name
        self.started.setdefault(name, threading.Event()).set()
        if name in self.fail:
            raise PermissionError(f"AccessDenied for {name}")
        gate = self.gates.get(name)
        if gate is not None:
            assert gate.wait(30)

    def upload(self, local, rel, **kwargs):
        self._gate(rel)
        return super().upload(local, rel, **kwargs)

    def upload_hashed(self, local, rel, **kwargs):  # the publisher's one-pass path
        self._gate(rel)
        return super().upload_hashed(local, rel, **kwargs)


class GatedStore(RunStore):
    """A real store on :class:`GatedObjects`, which records what it could see whenever it
    deleted something."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.objects = GatedObjects(url)
        self.gates = self.objects.gates
        self.started = self.objects.started
        self.fail = self.objects.fail
        self.seen_at_delete: list[tuple[str, list[str]]] = []

    def delete_checkpoint(self, manifest):
        self.seen_at_delete.append((manifest.name, [m.name for m in self.list_checkpoints()]))
        super().delete_checkpoint(manifest)


_seq = iter(range(1, 10_000))


def _job(tmp_path: Path, name: str, step: int) -> PublishJob:
    visible = tmp_path / name
    visible.write_bytes(os.urandom(4096))
    staged = tmp_path / f".stage-{step}-{name}"
    if staged.exists():
        staged.unlink()
    os.link(visible, staged)
    return PublishJob(
        seq=next(_seq), local_path=str(visible), staged_path=str(staged), meta={"global_step": step, "created_at": utc_now()}
    )


@pytest.fixture
def store(file_url):
    return GatedStore(file_url)


def test_rotated_away_mid_upload_is_published_whole_then_deleted_after_its_replacement(store, tmp_path):
    store.gates["a.ckpt"] = threading.Event()
    pub = Publisher(store, workers=2)
    a, b = _job(tmp_path, "a.ckpt", 1), _job(tmp_path, "b.ckpt", 2)
    pub.submit(a)
    assert store.started.setdefault("a.ckpt", threading.Event()).wait(10)
    pub.submit(b)
    os.unlink(a.local_path)  # ModelCheckpoint rotates a.ckpt away while it is uploading
    pub.local_removed(a.local_path, after_seq=b.seq)
    store.gates["a.ckpt"].set()
    result = pub.close(timeout=30)

    assert a.state is PublishState.PUBLISHED, "an upload in flight completes (all or nothing)"
    assert result.ok
    assert [m.name for m in store.list_checkpoints()] == ["b.ckpt"]
    assert store.seen_at_delete == [("a.ckpt", ["a.ckpt", "b.ckpt"])], "deleted only once b was published"


def test_rotated_away_before_upload_started_is_never_uploaded(store, tmp_path):
    store.gates["a.ckpt"] = threading.Event()
    pub = Publisher(store, workers=1)
    a, b, c = _job(tmp_path, "a.ckpt", 1), _job(tmp_path, "b.ckpt", 2), _job(tmp_path, "c.ckpt", 3)
    pub.submit(a)
    pub.submit(b)  # queued behind a
    pub.submit(c)
    pub.local_removed(b.local_path, after_seq=c.seq)
    store.gates["a.ckpt"].set()
    pub.close(timeout=30)
    assert b.state is PublishState.SKIPPED
    assert "b.ckpt" not in store.started, "no byte of b was sent"
    assert [m.name for m in store.list_checkpoints()] == ["a.ckpt", "c.ckpt"]
    assert not Path(b.staged_path).exists()


def test_remote_copy_is_kept_when_its_replacement_fails(store, tmp_path):
    pub = Publisher(store, workers=1)
    a = _job(tmp_path, "a.ckpt", 1)
    pub.submit(a)
    assert a.done.wait(10)
    store.fail.add("b.ckpt")
    b = _job(tmp_path, "b.ckpt", 2)
    pub.submit(b)
    pub.local_removed(a.local_path, after_seq=b.seq)
    result = pub.close(timeout=30)
    assert [m.name for m in store.list_checkpoints()] == ["a.ckpt"], "the only good checkpoint survives"
    assert result.failed and "b.ckpt" in result.failed[0] and "AccessDenied" in result.failed[0]


def test_older_save_of_the_same_file_finishing_last_does_not_win(store, tmp_path):
    gate = threading.Event()
    store.gates["last.ckpt"] = gate
    pub = Publisher(store, workers=2)
    old = _job(tmp_path, "last.ckpt", 1)
    pub.submit(old)
    assert store.started.setdefault("last.ckpt", threading.Event()).wait(10)
    del store.gates["last.ckpt"]  # the newer save of last.ckpt uploads at once...
    new = _job(tmp_path, "last.ckpt", 2)
    pub.submit(new)
    assert new.done.wait(10) and new.state is PublishState.PUBLISHED
    gate.set()  # ...and the older one finishes after it
    pub.close(timeout=30)
    assert old.state is PublishState.PUBLISHED
    assert [(m.name, m.global_step) for m in store.list_checkpoints()] == [("last.ckpt", 2)]


def test_keep_last_deletes_nothing_while_a_newer_save_is_unpublished(store, tmp_path):
    earlier = tmp_path / "earlier.ckpt"
    earlier.write_bytes(os.urandom(4096))
    store.publish_checkpoint([earlier], name="earlier.ckpt", global_step=1, created_at=utc_now())  # an earlier attempt
    store.gates["a.ckpt"] = threading.Event()
    store.fail.add("b.ckpt")
    pub = Publisher(store, workers=2, keep_last=1)
    a, b = _job(tmp_path, "a.ckpt", 2), _job(tmp_path, "b.ckpt", 3)
    pub.submit(a)
    assert store.started.setdefault("a.ckpt", threading.Event()).wait(10)
    pub.submit(b)
    assert b.done.wait(10) and b.state is PublishState.FAILED
    store.gates["a.ckpt"].set()  # a is published after the newer b failed: keep_last waits
    assert a.done.wait(10) and a.state is PublishState.PUBLISHED
    assert store.seen_at_delete == []
    assert [m.name for m in store.list_checkpoints()] == ["earlier.ckpt", "a.ckpt"]

    c = _job(tmp_path, "c.ckpt", 4)  # a newer save is published: keep_last applies again
    pub.submit(c)
    pub.close(timeout=30)
    assert c.state is PublishState.PUBLISHED
    assert [m.name for m in store.list_checkpoints()] == ["c.ckpt"]


def test_a_failed_write_blocks_remote_rotation_until_a_newer_save_is_published(store, tmp_path):
    pub = Publisher(store, workers=1)
    a = _job(tmp_path, "a.ckpt", 1)
    pub.submit(a)
    assert a.done.wait(10)
    lost = PublishJob(seq=next(_seq), local_path=str(tmp_path / "b.ckpt"), staged_path="", meta={"global_step": 2})
    lost.error = "not written to local disk: No space left on device ([Errno 28])"
    pub.write_failed(lost)  # what the writer reports when b.ckpt could not be written
    assert [j.name for j in pub.failed_saves(lost.seq)] == ["b.ckpt"]
    pub.local_removed(a.local_path, after_seq=lost.seq)  # ModelCheckpoint rotated a away for b
    assert store.seen_at_delete == [] and [m.name for m in store.list_checkpoints()] == ["a.ckpt"]

    c = _job(tmp_path, "c.ckpt", 3)
    pub.submit(c)
    assert c.done.wait(10) and c.state is PublishState.PUBLISHED
    assert pub.failed_saves(c.seq) == [], "made up for by a newer published save"
    assert [j.name for j in pub.failed_saves(lost.seq)] == ["b.ckpt"]
    d = _job(tmp_path, "d.ckpt", 4)
    pub.submit(d)
    pub.local_removed(c.local_path, after_seq=d.seq)  # rotation works again once c is published
    result = pub.close(timeout=30)
    assert [m.name for m in store.list_checkpoints()] == ["a.ckpt", "d.ckpt"]
    assert result.failed == ["b.ckpt (not written to local disk: No space left on device ([Errno 28]))"]


def _growing_job(tmp_path: Path, name: str, step: int) -> PublishJob:
    """A save whose upload starts with its write (the file is there; its write is still to end)."""
    from trainctl_lightning.store.transfer import Growing

    visible = tmp_path / f".writing-{step}-{name}"
    visible.write_bytes(os.urandom(4096))
    fd = os.open(visible, os.O_RDONLY)
    return PublishJob(
        seq=next(_seq),
        local_path=str(tmp_path / name),
        staged_path=f"/proc/self/fd/{fd}",
        meta={"global_step": step, "created_at": utc_now()},
        fd=fd,
        growth=Growing(fd, 4096),
    )


@pytest.mark.parametrize("write", ["fails", "succeeds"])
def test_a_save_being_written_supersedes_the_queued_older_one_only_once_written(store, tmp_path, write):
    """last.ckpt saved at step 1 waits in the queue; its next save (step 2) is being written, its
    upload submitted with it. Should that write fail, step 1 is still the newest complete last.ckpt:
    it is published. Once the write succeeds, step 2 supersedes it, as a finished save always did."""
    store.gates["busy.ckpt"] = threading.Event()
    pub = Publisher(store, workers=1)
    pub.submit(_job(tmp_path, "busy.ckpt", 0))  # holds the worker
    assert store.started.setdefault("busy.ckpt", threading.Event()).wait(10)
    older = _job(tmp_path, "last.ckpt", 1)
    pub.submit(older)
    newer = _growing_job(tmp_path, "last.ckpt", 2)
    pub.submit(newer)
    assert older.state is PublishState.QUEUED, "a save still being written supersedes nothing"
    assert newer.growth is not None
    newer.growth.end(4096)
    if write == "fails":
        pub.withdraw(newer, "not written to /ckpts: No space left on device ([Errno 28])")
    else:
        pub.committed(newer)
    store.gates["busy.ckpt"].set()
    result = pub.close(timeout=30)
    steps = [(m.name, m.global_step) for m in store.list_checkpoints() if m.name == "last.ckpt"]
    if write == "fails":
        assert older.state is PublishState.PUBLISHED and steps == [("last.ckpt", 1)]
        assert result.failed == [], "the failed write is the writer's to report, once"
    else:
        assert older.state is PublishState.SKIPPED and newer.state is PublishState.PUBLISHED, (older, newer)
        assert steps == [("last.ckpt", 2)]
