"""Store outages during a real fit: a transient one is ridden out, a permanent one is reported.

These tests train in-process against moto's S3 server on 127.0.0.1, on a server of their own
(function-scoped), because the outage test stops it: moto's state lives in this process, so
``stop()`` then ``start()`` on the same port is an endpoint that goes away and comes back with
every byte still there. The permanent failure is the bucket deleted mid-run.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

from tests.helpers.models import TinyRegressor, trainer_kwargs
from trainctl_lightning import CheckpointSync, RunStore, UploadError
from trainctl_lightning.checkpoint.publisher import PublishJob, PublishState
from trainctl_lightning.testing import LocalS3

BUCKET = "trainctl-outage"


@pytest.fixture
def outage_s3(monkeypatch: pytest.MonkeyPatch):
    """A moto S3 server of this test's own, with an empty bucket and the env pointing at it."""
    import s3fs

    server = LocalS3().start()
    try:
        server.reset()  # moto's backend is process-global: start from nothing
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        server.create_bucket(BUCKET)
        yield server
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


class RecordingCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that records every file it saves: (name, global step, wall time)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.saved: list[tuple[str, int, float]] = []

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        self.saved.append((os.path.basename(filepath), trainer.global_step, time.time()))
        super()._save_checkpoint(trainer, filepath)


class Pace(Callback):
    """Slows every step down so that training is still running while the store misbehaves;
    counts the steps that ran and runs ``at_step(trainer)`` once at the end of step ``step``."""

    def __init__(self, sleep_s: float, step: int | None = None, at_step=None) -> None:
        self.sleep_s = sleep_s
        self.step = step
        self.at_step = at_step
        self.batches = 0
        self.batch_ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        if self.at_step is not None and trainer.global_step == self.step:
            self.at_step(trainer)
        time.sleep(self.sleep_s)
        self.batch_ends.append(time.time())


class Outage(threading.Thread):
    """Stops the S3 endpoint as soon as a checkpoint upload is under way, keeps it down for
    ``down_s`` seconds, and brings it back on the same port."""

    def __init__(self, server: LocalS3, get_trainer, down_s: float, timeout_s: float = 60.0) -> None:
        super().__init__(name="test-outage", daemon=True)
        self.server = server
        self.get_trainer = get_trainer
        self.down_s = down_s
        self.timeout_s = timeout_s
        self.cancel = threading.Event()
        self.in_flight: list[PublishJob] = []
        self.stopping_at: float | None = None
        self.down_at: float | None = None
        self.up_at: float | None = None
        self.error: BaseException | None = None

    def _uploading(self) -> list[PublishJob]:
        trainer = self.get_trainer()
        publisher = getattr(trainer.strategy.checkpoint_io, "publisher", None) if trainer else None
        if publisher is None:
            return []
        return [j for j in publisher.pending() if j.state is PublishState.UPLOADING]

    def run(self) -> None:
        try:
            deadline = time.monotonic() + self.timeout_s
            while not self.cancel.is_set() and time.monotonic() < deadline:
                if not self._uploading():
                    time.sleep(0.002)
                    continue
                time.sleep(0.1)  # past the local sha256: requests are on the wire
                self.stopping_at = time.time()
                self.server.stop()  # serves what it accepted meanwhile, up to ~0.5 s
                self.in_flight = self._uploading()
                if not self.in_flight:  # all finished before it was down: try the next upload
                    self.server.start()
                    continue
                self.down_at = time.time()
                self.cancel.wait(self.down_s)
                return
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            if not self.server.running:
                self.server.start()  # same port: the endpoint comes back with its data
                self.up_at = time.time()


def _ckpt_bytes(width: int) -> int:
    # Linear(8, w) + Linear(w, 1) weights and biases, plus as many SGD momentum buffers, float32.
    params = 8 * width + width + width + 1
    return 2 * 4 * params


# With botocore's own retries (up to ~15 s of backoff) a short outage may never reach our retry
# layer; without them, trainctl's RetryPolicy alone must ride it out.
NO_SDK_RETRIES = {"config_kwargs": {"retries": {"mode": "standard", "max_attempts": 1}}}


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("sdk_retries", [True, False], ids=["sdk-retries", "no-sdk-retries"])
def test_endpoint_outage_mid_upload_is_ridden_out(outage_s3: LocalS3, tmp_path, caplog, sdk_retries):
    caplog.set_level(logging.INFO, logger="trainctl_lightning")
    width = 400_000  # ~32 MB per checkpoint: an upload is well under way when the endpoint goes
    assert _ckpt_bytes(width) > 25 * 2**20
    url = f"s3://{BUCKET}/runs/outage"
    options = None if sdk_retries else NO_SDK_RETRIES
    # Without SDK retries the uploads run on this process's threads, so that this process's retry
    # layer is what meets the outage (asserted below). With SDK retries they run in the uploader
    # process (the default): the outage is ridden out there, and the same publication checks hold.
    sync = CheckpointSync(
        url, storage_options=options, retry_timeout=120, flush_timeout=180, upload_process=None if sdk_retries else False
    )
    ckpt = RecordingCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2, save_top_k=-1, save_last=True)
    pace = Pace(sleep_s=0.4)
    trainer = Trainer(**trainer_kwargs(max_steps=6, callbacks=[pace, ckpt, sync]))
    outage = Outage(outage_s3, lambda: trainer, down_s=4.0)
    outage.start()
    try:
        trainer.fit(TinyRegressor(width=width))  # must not raise
    finally:
        outage.cancel.set()
        outage.join(30)
        assert not outage.is_alive()
    assert outage.error is None, outage.error
    fit_ended = time.time()

    # The endpoint really went away while a checkpoint was going up...
    assert outage.down_at is not None, "no upload was ever seen in flight: the outage never happened"
    assert outage.up_at is not None and outage.up_at - outage.down_at >= 3.5
    assert outage.in_flight, "no upload was in flight when the endpoint went down"
    # ... training went on meanwhile ...
    assert any(outage.down_at < t < outage.up_at for t in pace.batch_ends), "training stalled during the outage"
    # ... and each upload that was in flight then was published only after the endpoint returned.
    published_at = {
        r.getMessage().split()[-1].rsplit("/", 1)[-1]: r.created
        for r in caplog.records
        if r.name == "trainctl_lightning.checkpoint.publisher" and r.getMessage().startswith("trainctl: published ")
    }
    for job in outage.in_flight:
        assert job.state is PublishState.PUBLISHED, (job.name, job.state, job.error)
        assert job.manifest is not None
        assert published_at[job.manifest.id] > outage.up_at, (job.name, "published before the outage ended?")
    retried = [
        r
        for r in caplog.records
        if r.name == "trainctl_lightning.retry"
        and r.levelno == logging.WARNING
        and r.getMessage().startswith(f"upload s3://{BUCKET}/runs/outage/checkpoints/")
        and outage.stopping_at <= r.created <= outage.up_at + 1.0
    ]
    if not sdk_retries:
        assert retried, "the retry layer never saw the outage: " + "\n".join(r.getMessage() for r in caplog.records)

    # Training ran every step, and every checkpoint it saved is in the store.
    assert trainer.global_step == 6 and pace.batches == 6
    saved_steps = sorted({step for name, step, _ in ckpt.saved if name != "last.ckpt"})
    assert saved_steps == [2, 4, 6]
    result = sync.last_flush
    assert result is not None and result.ok, result.describe()
    assert not result.failed and not result.unfinished
    assert {name for name, _, _ in ckpt.saved} <= set(result.published)
    # (aiohttp may log an unretrieved "closing transport" task error on the asyncio logger: not ours)
    ours = [r for r in caplog.records if r.name.startswith("trainctl_lightning") and r.levelno >= logging.ERROR]
    assert not ours, [r.getMessage() for r in ours]

    store = RunStore(url)
    published = store.list_checkpoints()
    by_name = {m.name: m for m in published}
    for name, step, _ in ckpt.saved:
        assert name in by_name, f"{name} (step {step}) was saved but never published; store has {sorted(by_name)}"
        if name != "last.ckpt":
            assert by_name[name].global_step == step
    assert [m.name for m in published].count("last.ckpt") == 1  # older versions replaced
    assert by_name["last.ckpt"].global_step == 6
    for manifest in published:
        store.verify_checkpoint(manifest)
    latest = store.latest_checkpoint()
    assert latest is not None and latest.global_step == 6
    path = store.download_checkpoint(latest, tmp_path / "download")
    state = torch.load(path, map_location="cpu", weights_only=False)
    assert state["global_step"] == 6
    assert state["state_dict"]["net.0.weight"].shape == (width, 8)
    print(
        f"outage: down {outage.up_at - outage.down_at:.1f}s while uploading "
        f"{[j.name for j in outage.in_flight]}; {len(retried)} retry warning(s) from trainctl; "
        f"fit ended {fit_ended - outage.up_at:+.1f}s after the endpoint returned"
    )


def _doomed_fit(server: LocalS3, tmp_path, *, max_steps: int = 8, delete_at_step: int = 3, extra_callbacks=()):
    """A fit whose bucket is deleted for good just before step ``delete_at_step``'s save.

    Returns (trainer, sync, ckpt, pace, the UploadError fit raised, time of the deletion).
    """
    url = f"s3://{BUCKET}/runs/doomed"
    deleted_at: list[float] = []

    def delete_bucket(trainer) -> None:
        # Let what was saved so far be published, then delete the bucket for good.
        publisher = trainer.strategy.checkpoint_io.publisher
        deadline = time.monotonic() + 60
        while publisher.pending():
            assert time.monotonic() < deadline, "uploads before the deletion never finished"
            time.sleep(0.01)
        server.delete_bucket(BUCKET)
        deleted_at.append(time.time())

    sync = CheckpointSync(url, retry_timeout=30, flush_timeout=60)
    ckpt = RecordingCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=1, save_top_k=-1, save_last=True)
    # ModelCheckpoint always runs after other callbacks: the bucket is gone before this step's save.
    pace = Pace(sleep_s=0.15, step=delete_at_step, at_step=delete_bucket)
    trainer = Trainer(**trainer_kwargs(max_steps=max_steps, callbacks=[pace, ckpt, sync, *extra_callbacks]))
    with pytest.raises(UploadError) as excinfo:
        trainer.fit(TinyRegressor(width=20_000))
    assert deleted_at, "the bucket was never deleted"
    return trainer, sync, ckpt, pace, excinfo.value, deleted_at[0]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bucket_deleted_mid_run_fails_loudly_at_the_end_without_stopping_training(outage_s3: LocalS3, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="trainctl_lightning")
    max_steps, delete_at_step = 8, 3
    trainer, _, ckpt, pace, error, deleted_at = _doomed_fit(
        outage_s3, tmp_path, max_steps=max_steps, delete_at_step=delete_at_step
    )

    # Training itself ran to the end.
    assert trainer.global_step == max_steps and pace.batches == max_steps
    for name, _, _ in ckpt.saved:
        assert (tmp_path / "ckpts" / name).is_file()

    before = {name for name, _, at in ckpt.saved if at < deleted_at}
    after = {name for name, _, at in ckpt.saved if at > deleted_at}
    assert {f"epoch=0-step={s}.ckpt" for s in range(delete_at_step, max_steps + 1)} <= after
    assert "last.ckpt" in after

    # The error names every checkpoint that did not make it, and none that did.
    failed_names = {entry.split(" (")[0] for entry in error.failed}
    assert failed_names == after, (sorted(failed_names), sorted(after))
    for name in after:
        assert name in str(error)
    assert not (before - after) & failed_names
    published = {
        r.getMessage().split()[2]
        for r in caplog.records
        if r.name == "trainctl_lightning.checkpoint.publisher" and r.getMessage().startswith("trainctl: published ")
    }
    assert before <= published

    # Each failure was logged at ERROR when it happened, while training was still running.
    errors = [
        r
        for r in caplog.records
        if r.name == "trainctl_lightning.checkpoint.publisher"
        and r.levelno == logging.ERROR
        and "could not publish checkpoint" in r.getMessage()
    ]
    assert errors, [r.getMessage() for r in caplog.records]
    assert min(r.created for r in errors) < pace.batch_ends[-1], "the failure was only reported at the end of the fit"
    assert {name for name in after if any(f" {name} " in r.getMessage() for r in errors)} == after
    # A missing bucket is not retried for minutes: no retry warnings after it went.
    assert not [r for r in caplog.records if r.name == "trainctl_lightning.retry" and r.created > deleted_at], (
        "a missing bucket was treated as transient"
    )


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_last_flush_still_reports_the_failures_after_fit_raised(outage_s3: LocalS3, tmp_path):
    """``CheckpointSync.last_flush`` is the outcome of the end-of-fit flush. When that flush
    failed, ``fit`` raises ``UploadError`` -- and Lightning, handling that exception, tears the
    strategy down a second time, which must not replace the outcome with an empty "ok" one."""
    _, sync, _, _, error, _ = _doomed_fit(outage_s3, tmp_path, max_steps=4, delete_at_step=3)
    assert error.failed
    result = sync.last_flush
    assert result is not None
    assert not result.ok, f"last_flush says all was published after fit raised {error!r}: {result}"
    assert sorted(result.failed) == sorted(error.failed)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_upload_error_names_the_lost_checkpoints_when_an_on_exception_checkpoint_is_configured(outage_s3: LocalS3, tmp_path):
    """The end-of-fit ``UploadError`` goes through Lightning's exception handling, which runs
    every callback's ``on_exception``: ``OnExceptionCheckpoint`` then saves once more, after a fit
    that trained to the end. That save must not replace the error that names the checkpoints
    the run lost with one that only names ``on_exception.ckpt``."""
    trainer, _, _, _, error, _ = _doomed_fit(
        outage_s3,
        tmp_path,
        max_steps=4,
        delete_at_step=3,
        extra_callbacks=[OnExceptionCheckpoint(dirpath=tmp_path / "ckpts")],
    )
    assert trainer.global_step == 4
    failed_names = {entry.split(" (")[0] for entry in error.failed}
    lost = {"epoch=0-step=3.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"}
    assert lost <= failed_names, f"fit raised {error!r}, which does not name {sorted(lost - failed_names)}"
