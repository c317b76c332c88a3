"""No fault loses the newest complete checkpoint: a local write or an upload that fails (full
disk, I/O error, permission denied), and a training process SIGKILLed mid-publish.

The disk faults are injected in-process at the OS boundary (tests/helpers/faults.py): a real
full disk would need a small tmpfs or loop device of its own, and mounting one needs root. The
upload faults come from a real store whose filesystem is wrapped (tests/helpers/stores.py). A
write that outlasts ``flush_timeout`` is covered in tests/test_checkpoint_sync_options.py, random
SIGKILLs over many trials in tests/test_crash_safety.py.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tests.helpers import wait_until
from tests.helpers.faults import FailingDisk
from tests.helpers.models import TinyRegressor, trainer_kwargs
from tests.helpers.stores import WrapSyncStore
from trainctl_lightning import CheckpointSync, RunStore, UploadError, resume_path
from trainctl_lightning.checkpoint.io import PENDING_MARKER
from trainctl_lightning.checkpoint.publisher import PublishState
from trainctl_lightning.store.layout import CHECKPOINT_MANIFEST

REPO = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 2


def _best_only(folder: Path) -> ModelCheckpoint:
    """save_top_k=1 whose every save is a new best: each one rotates the previous one away."""
    return ModelCheckpoint(dirpath=folder, filename="{epoch}", monitor="step", mode="max", save_top_k=1)


def _trainer(max_epochs: int, *callbacks: Callback) -> pl.Trainer:
    return pl.Trainer(
        **trainer_kwargs(max_epochs=max_epochs, limit_train_batches=STEPS_PER_EPOCH, limit_val_batches=0),
        callbacks=list(callbacks),
    )


def _tree(root: Path, *skip: Path) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime_ns) of every file under ``root`` outside ``skip``."""
    skipped = [str(s) for s in skip]
    found = {}
    for folder, _, files in os.walk(root):
        if any(folder == s or folder.startswith(s + os.sep) for s in skipped):
            continue
        for name in files:
            stat = os.stat(os.path.join(folder, name))
            found[os.path.join(folder, name)] = (stat.st_size, stat.st_mtime_ns)
    return found


def _local_state(folder: Path) -> tuple[list[str], list[str]]:
    """(checkpoint files in ``folder``, leftovers: hidden, temporary or placeholder files)."""
    ckpts = sorted(p.name for p in folder.glob("*.ckpt") if p.read_bytes() != PENDING_MARKER)
    leftovers = sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or not p.name.endswith(".ckpt"))
    leftovers += sorted(p.name for p in folder.glob("*.ckpt") if p.read_bytes() == PENDING_MARKER)
    return ckpts, leftovers


def _step_of(path: str | Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


@pytest.mark.parametrize(
    ("code", "at", "cause"),
    [
        (errno.ENOSPC, "write", r"No space left on device \(\[Errno 28\]\)"),
        (errno.EIO, "write", r"Input/output error \(\[Errno 5\]\)"),
        (errno.EACCES, "open", r"Permission denied \(\[Errno 13\]\)"),
    ],
    ids=["ENOSPC", "EIO", "EACCES"],
)
def test_a_failed_write_of_the_new_best_keeps_the_previous_best_locally_and_in_the_store(
    file_url, tmp_path, caplog, code, at, cause
):
    ckpts = tmp_path / "c"
    sync = CheckpointSync(file_url)
    trainer = _trainer(3, _best_only(ckpts), sync)
    before = _tree(tmp_path, ckpts, tmp_path / "store")

    # The second save fails (and the disk stays broken); the third save is where Lightning's
    # synchronous IO would have raised, so it raises there, with the cause and what to do.
    with FailingDisk(ckpts, code, nth=2, at=at) as disk, pytest.raises(UploadError) as raised:
        with caplog.at_level(logging.ERROR, logger="trainctl_lightning"):
            trainer.fit(TinyRegressor())

    message = str(raised.value)
    assert "\n" not in message
    assert raised.value.failed == ["epoch=1.ckpt"]
    assert raised.value.__cause__ is not None
    assert f"checkpoint epoch=1.ckpt could not be written to {ckpts}: " in message
    assert re.search(cause, message), message
    assert "the checkpoints saved before it are kept, locally and in the store (newest there: epoch=0.ckpt)" in message
    assert message.endswith(", then resume"), message
    # raised at the removal ModelCheckpoint queues right after the failed save (when the write
    # has already failed by then) or else at the next save; never later
    assert trainer.current_epoch in (1, 2), trainer.current_epoch
    assert len(disk.failed) == 1, "the save after the failure was refused before it touched the disk"

    # The previous best survives everywhere; nothing half-written is left or published.
    ckpt_files, leftovers = _local_state(ckpts)
    assert ckpt_files == ["epoch=0.ckpt"] and leftovers == []
    assert _step_of(ckpts / "epoch=0.ckpt") == STEPS_PER_EPOCH
    assert [m.name for m in RunStore(file_url).list_checkpoints()] == ["epoch=0.ckpt"]
    resumed = resume_path(file_url, cache_dir=tmp_path / "cache")
    assert resumed is not None and _step_of(resumed) == STEPS_PER_EPOCH
    assert _tree(tmp_path, ckpts, tmp_path / "store", tmp_path / "cache") == before

    # The failure was logged once, as it happened, and named again by the end-of-fit flush.
    lines = [r.getMessage() for r in caplog.records if "could not be written" in r.getMessage()]
    assert len(lines) == 1, lines
    flushed = sync.last_flush
    assert flushed is not None and [f.split(" (")[0] for f in flushed.failed] == ["epoch=1.ckpt"]


def test_a_write_failing_at_the_last_save_fails_the_fit_by_name_and_keeps_the_previous_best(file_url, tmp_path):
    ckpts = tmp_path / "c"
    sync = CheckpointSync(file_url, keep_last=1)
    trainer = _trainer(2, _best_only(ckpts), sync)
    with FailingDisk(ckpts, errno.ENOSPC, nth=2), pytest.raises(UploadError) as raised:
        trainer.fit(TinyRegressor())

    # Raised at the removal queued right after the failed save, if the write had failed by then,
    # else by CheckpointSync at the end of the fit: either way one line with the name, the cause
    # and what to do.
    message = str(raised.value)
    assert "\n" not in message
    assert [f.split(" (")[0] for f in raised.value.failed] == ["epoch=1.ckpt"]
    assert re.search(r"epoch=1\.ckpt \(not written to|checkpoint epoch=1\.ckpt could not be written to", message), message
    assert f"{ckpts}: No space left on device ([Errno 28])" in message
    assert "the checkpoints saved before it are kept" in message
    assert f"free space in {ckpts} or give ModelCheckpoint a dirpath on a larger disk, then resume" in message
    assert _local_state(ckpts) == (["epoch=0.ckpt"], [])
    assert [m.name for m in RunStore(file_url).list_checkpoints()] == ["epoch=0.ckpt"]


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_a_failed_upload_keeps_the_previous_checkpoint_in_the_store_and_stops_local_rotation(backend, request, tmp_path):
    url = request.getfixturevalue("s3").url() if backend == "s3" else request.getfixturevalue("file_url")
    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if backend == "file" else OSError(errno.EIO, os.strerror(errno.EIO))
    ckpts = tmp_path / "c"
    sync = CheckpointSync(url, retry_timeout=1.0, keep_last=1)
    broken = WrapSyncStore(sync)

    class BreakTheStore(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            io = trainer.strategy.checkpoint_io
            if trainer.current_epoch == 1:
                # epoch=0.ckpt is in the store; every later upload fails
                job = io.wait_published(ckpts / "epoch=0.ckpt", timeout=30)
                assert job is not None and job.state is PublishState.PUBLISHED, job
                broken.fs.failure = error
            elif trainer.current_epoch == 2:
                # epoch=1.ckpt's upload is known to have failed before the next save rotates it away
                job = io.wait_published(ckpts / "epoch=1.ckpt", timeout=30)
                assert job is not None and job.state is PublishState.FAILED, job

    trainer = _trainer(3, _best_only(ckpts), sync, broken, BreakTheStore())
    with pytest.raises(UploadError) as raised:
        trainer.fit(TinyRegressor())

    message = str(raised.value)
    assert "\n" not in message
    assert [f.split(" (")[0] for f in raised.value.failed] == ["epoch=1.ckpt", "epoch=2.ckpt"]
    assert os.strerror(error.errno) in message
    assert trainer.current_epoch == 3, "an upload failure does not stop training"

    # The store keeps epoch=0.ckpt (nothing newer is published); locally, epoch=1.ckpt is kept
    # although ModelCheckpoint rotated it away, as its upload had failed.
    assert [m.name for m in RunStore(url).list_checkpoints()] == ["epoch=0.ckpt"]
    resumed = resume_path(url, cache_dir=tmp_path / "cache")
    assert resumed is not None and _step_of(resumed) == STEPS_PER_EPOCH
    ckpt_files, leftovers = _local_state(ckpts)
    assert {"epoch=1.ckpt", "epoch=2.ckpt"} <= set(ckpt_files) and leftovers == []
    assert _step_of(ckpts / "epoch=2.ckpt") == 3 * STEPS_PER_EPOCH


@pytest.mark.slow
def test_sigkill_mid_publish_leaves_the_newest_complete_checkpoint_to_resume_from(file_url, tmp_path):
    """A deterministic kill at the worst moment (the random ones are in test_crash_safety.py):
    the second checkpoint's data is in the store and complete on local disk, its manifest not
    yet written."""
    ckpts = tmp_path / "c"
    log = tmp_path / "train.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "scripts" / "hang_mid_publish.py"), file_url, str(ckpts)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    store = RunStore(file_url)
    checkpoints = Path(store.objects.path("checkpoints"))

    def half_published() -> bool:
        uploaded = log.is_file() and "UPLOADED epoch=1.ckpt" in log.read_text()
        folders = [f for f in checkpoints.iterdir() if not (f / CHECKPOINT_MANIFEST).exists()] if checkpoints.is_dir() else []
        return uploaded and any((f / "epoch=1.ckpt").is_file() for f in folders)

    try:
        wait_until(lambda: half_published() or proc.poll() is not None, timeout=120, what="epoch=1.ckpt to be half published")
        assert proc.poll() is None, f"the training script ended early:\n{log.read_text()[-3000:]}"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)

    # Readers see only the complete checkpoint; the half-published one stays invisible.
    assert [m.name for m in store.list_checkpoints()] == ["epoch=0.ckpt"]
    orphans = [f.name for f in checkpoints.iterdir() if not (f / CHECKPOINT_MANIFEST).exists()]
    assert len(orphans) == 1 and "epoch=1" in orphans[0]
    resumed = resume_path(file_url, cache_dir=tmp_path / "cache")
    assert resumed is not None and _step_of(resumed) == STEPS_PER_EPOCH
    # Locally, epoch=1.ckpt was complete on disk before its upload began.
    assert _step_of(ckpts / "epoch=1.ckpt") == 2 * STEPS_PER_EPOCH
