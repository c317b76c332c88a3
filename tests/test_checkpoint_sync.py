"""CheckpointSync on a real Trainer.fit: what Lightning saves ends up in the store, and only that."""

from __future__ import annotations

import logging
import os
import threading
import time

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint

from tests.helpers.models import TinyRegressor, trainer_kwargs
from trainctl_lightning import (
    CheckpointSync,
    ConfigError,
    RunStore,
    StoreError,
    UploadError,
    resume_path,
)
from trainctl_lightning.checkpoint.io import PENDING_MARKER, SnapshotCheckpointIO


def _local_ckpts(folder) -> set[str]:
    return {p.name for p in folder.iterdir() if p.suffix == ".ckpt"}


def test_every_saved_checkpoint_is_published_and_remote_mirrors_local(store_url, tmp_path):
    ckpt_dir = tmp_path / "ckpts"
    sync = CheckpointSync(store_url)
    trainer = pl.Trainer(
        **trainer_kwargs(max_epochs=3, limit_train_batches=4),
        callbacks=[
            ModelCheckpoint(dirpath=ckpt_dir, monitor="val_loss", save_top_k=2, save_last=True),
            ModelCheckpoint(dirpath=ckpt_dir / "steps", every_n_train_steps=5, save_top_k=-1, filename="s{step}"),
            sync,
        ],
    )
    trainer.fit(TinyRegressor())

    store = RunStore(store_url)
    published = store.list_checkpoints()
    local = _local_ckpts(ckpt_dir) | _local_ckpts(ckpt_dir / "steps")
    assert sorted(m.name for m in published) == sorted(local)
    assert sync.last_flush.ok and not sync.last_flush.failed
    # the remote copy of each file is byte-identical to what Lightning left on disk
    for m in published:
        src = ckpt_dir / m.name if (ckpt_dir / m.name).exists() else ckpt_dir / "steps" / m.name
        out = store.download_checkpoint(m, tmp_path / "dl" / m.id)
        assert out.read_bytes() == src.read_bytes()
    # top-k checkpoints carry their monitored value; "latest" is the one taken last
    ranked = [m for m in published if m.monitor == "val_loss"]
    assert ranked and all(m.monitor_value is not None for m in ranked)
    latest = store.latest_checkpoint()
    assert latest.created == max(m.created for m in published)
    assert latest.global_step == max(m.global_step for m in published)
    assert trainer.global_step == 12
    assert "train_loss" in latest.metrics
    hidden = [str(p) for p in ckpt_dir.rglob("*") if p.name.startswith(".")]
    assert hidden == [], "nothing but ModelCheckpoint's files is left in its folder"


def test_published_weights_are_those_at_save_time(file_url, tmp_path):
    """The background writer must not see updates made by later optimizer steps."""
    seen: dict[int, dict[str, torch.Tensor]] = {}

    class Record(Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            seen[trainer.global_step] = {k: v.clone() for k, v in checkpoint["state_dict"].items()}

    class SlowIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            time.sleep(0.3)  # training runs on meanwhile and changes every weight
            super().save_checkpoint(checkpoint, path, storage_options)

    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=12, limit_val_batches=0),
        plugins=[SlowIO()],
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "c", every_n_train_steps=3, save_top_k=-1),
            CheckpointSync(file_url, max_pending_snapshots=2),
            Record(),
        ],
    )
    trainer.fit(TinyRegressor())
    store = RunStore(file_url)
    published = store.list_checkpoints()
    assert [m.global_step for m in published] == [3, 6, 9, 12]
    for m in published:
        state = torch.load(store.download_checkpoint(m, tmp_path / m.id), weights_only=False)["state_dict"]
        for key, expected in seen[m.global_step].items():
            assert torch.equal(state[key], expected), f"{key} at step {m.global_step} differs"


def test_restarted_run_keeps_publishing_to_the_same_url_and_resumes_from_the_published_step(s3, tmp_path, caplog):
    url = s3.url()

    def run(max_steps: int, ckpt_dir) -> pl.Trainer:
        trainer = pl.Trainer(
            **trainer_kwargs(max_steps=max_steps, limit_val_batches=0),
            callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=4, save_last=True), CheckpointSync(url)],
        )
        trainer.fit(TinyRegressor(), ckpt_path=resume_path(url))
        return trainer

    assert resume_path(url) is None
    run(8, tmp_path / "a")
    first = {m.id: m for m in RunStore(url).list_checkpoints()}
    assert RunStore(url).latest_checkpoint().global_step == 8

    # a restart on another machine (fresh local dir) resumes from step 8, not 0
    starts = []

    class StartStep(Callback):
        def on_train_start(self, trainer, pl_module):
            starts.append(trainer.global_step)

    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=16, limit_val_batches=0),
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=4, save_last=True),
            CheckpointSync(url),
            StartStep(),
        ],
    )
    with caplog.at_level(logging.INFO, logger="trainctl_lightning"):
        trainer.fit(TinyRegressor(), ckpt_path=resume_path(url))
    assert starts == [8]
    assert "last.ckpt also exists in the store from an earlier attempt" in caplog.text, "a name clash is not silent"
    after = RunStore(url).list_checkpoints()
    # nothing the first attempt published was deleted or overwritten: every old id is still
    # listed, unchanged, and verifies (only keep_last ever deletes an earlier attempt's checkpoints)
    assert first and {m.id: m for m in after if m.id in first} == first
    for old in first.values():
        RunStore(url).verify_checkpoint(old)
    assert RunStore(url).latest_checkpoint().global_step == 16
    # last.ckpt exactly once per attempt: the name repeats across attempts, under two ids
    assert sorted(m.global_step for m in after if m.name == "last.ckpt") == [8, 16]


def test_keep_last_trims_the_store_and_keep_local_false_frees_disk(memory_url, tmp_path):
    ckpt_dir = tmp_path / "c"
    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=10, limit_val_batches=0),
        callbacks=[
            ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1),
            CheckpointSync(memory_url, keep_last=2, keep_local=False),
        ],
    )
    trainer.fit(TinyRegressor())
    published = RunStore(memory_url).list_checkpoints()
    assert [m.global_step for m in published] == [8, 10]
    assert _local_ckpts(ckpt_dir) == set(), "published files are deleted locally with keep_local=False"


def test_mirror_deletes_off_keeps_every_remote_checkpoint(file_url, tmp_path):
    trainer = pl.Trainer(
        **trainer_kwargs(max_epochs=4, limit_train_batches=3),
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "c", monitor="val_loss", save_top_k=1),
            CheckpointSync(file_url, mirror_deletes=False),
        ],
    )
    trainer.fit(TinyRegressor())
    assert len(_local_ckpts(tmp_path / "c")) == 1
    # every epoch's top-1 at the time it was saved is still in the store
    assert len(RunStore(file_url).list_checkpoints()) >= 2


def test_exception_checkpoint_is_published_before_the_error_surfaces(file_url, tmp_path):
    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=20, limit_val_batches=0),
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "c", every_n_train_steps=3),
            OnExceptionCheckpoint(dirpath=tmp_path / "c", filename="on_exception"),
            CheckpointSync(file_url),
        ],
    )
    with pytest.raises(RuntimeError, match="boom at step 7"):
        trainer.fit(TinyRegressor(fail_at_step=7))
    latest = RunStore(file_url).latest_checkpoint()
    assert latest.name == "on_exception.ckpt" and latest.global_step == 7
    RunStore(file_url).verify_checkpoint(latest)


def test_after_fit_the_strategy_has_its_own_checkpoint_io_again(file_url, tmp_path):
    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=2, limit_val_batches=0),
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "c"), CheckpointSync(file_url)],
    )
    before = trainer.strategy.checkpoint_io
    trainer.fit(TinyRegressor())
    assert trainer.strategy.checkpoint_io is before and type(before) is TorchCheckpointIO
    # A save after the fit is Lightning's own, synchronous and not published, as without CheckpointSync.
    trainer.save_checkpoint(tmp_path / "c" / "manual.ckpt")
    assert torch.load(tmp_path / "c" / "manual.ckpt", weights_only=False)["global_step"] == 2
    assert [m.name for m in RunStore(file_url).list_checkpoints()] == ["epoch=0-step=2.ckpt"]


def test_back_pressure_waits_instead_of_dropping(file_url, tmp_path, caplog):
    class SlowIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            time.sleep(0.8)
            super().save_checkpoint(checkpoint, path, storage_options)

    sync = CheckpointSync(file_url, max_pending_snapshots=1)
    slow = SlowIO()
    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=6, limit_val_batches=0),
        plugins=[slow],
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "c", every_n_train_steps=1, save_top_k=-1), sync],
    )
    with caplog.at_level(logging.WARNING):
        trainer.fit(TinyRegressor())
    assert [m.global_step for m in RunStore(file_url).list_checkpoints()] == [1, 2, 3, 4, 5, 6]
    assert trainer.strategy.checkpoint_io is slow
    io = sync._io
    assert isinstance(io, SnapshotCheckpointIO) and io.snapshot_wait_s > 1.0
    assert "waited" in caplog.text and "max_pending_snapshots=1" in caplog.text


def test_permanent_failure_is_loud_and_named_but_training_finishes(s3, tmp_path, caplog):
    url = s3.url()
    steps = []

    class DropBucket(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append(trainer.global_step)
            if trainer.global_step == 2:  # the bucket vanishes under the run
                s3.server.delete_bucket(s3.bucket)

    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=6, limit_val_batches=0),
        callbacks=[
            DropBucket(),
            ModelCheckpoint(dirpath=tmp_path / "c", every_n_train_steps=3, save_top_k=-1),
            CheckpointSync(url, retry_timeout=5),
        ],
    )
    with caplog.at_level(logging.ERROR), pytest.raises(UploadError) as info:
        trainer.fit(TinyRegressor())
    assert steps[-1] == 6, "training ran to the end"
    assert "step=3.ckpt" in str(info.value) and "step=6.ckpt" in str(info.value)
    assert any("could not publish checkpoint" in r.message for r in caplog.records)
    assert _local_ckpts(tmp_path / "c") == {"epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt"}, "local copies kept"


# ------------------------------------------------------------------ bad input
def test_bad_store_fails_at_setup_before_any_step(s3, tmp_path):
    class NoStep(TinyRegressor):
        def training_step(self, batch, batch_idx):
            raise AssertionError("training must not start")

    for url, message in (
        ("s3://no-such-bucket/run", "bucket of s3://no-such-bucket/run does not exist"),
        ("file:///sys/trainctl", "permission denied"),
    ):
        trainer = pl.Trainer(**trainer_kwargs(max_steps=2), callbacks=[ModelCheckpoint(dirpath=tmp_path), CheckpointSync(url)])
        with pytest.raises(StoreError, match=message):
            trainer.fit(NoStep())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "nosuch://x"}, "unknown storage protocol 'nosuch'"),
        ({"url": "memory://x", "keep_last": 0}, r"keep_last=0\): must be an integer >= 1"),
        ({"url": "memory://x", "part_size_mb": 1}, r"part_size_mb=1\): must be an integer >= 5"),
        ({"url": "memory://x", "flush_timeout": -1}, "flush_timeout=-1"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs, message):
    url = kwargs.pop("url")
    with pytest.raises(ConfigError, match=message):
        CheckpointSync(url, **kwargs)


def test_url_from_the_agent_environment(monkeypatch, memory_url):
    monkeypatch.setenv("TRAINCTL_RUN_URL", memory_url)
    assert CheckpointSync().url == memory_url


def test_without_a_url_it_is_taken_from_the_environment_at_setup(monkeypatch, memory_url, tmp_path):
    """RemoteStrategy builds the callback where no run URL is set; the instance's agent sets it."""
    sync = CheckpointSync()
    trainer = pl.Trainer(**trainer_kwargs(max_steps=2), callbacks=[ModelCheckpoint(dirpath=tmp_path), sync])
    with pytest.raises(ConfigError, match=r"needs a store URL.*TRAINCTL_RUN_URL"):
        trainer.fit(TinyRegressor())
    monkeypatch.setenv("TRAINCTL_RUN_URL", memory_url)
    sync = CheckpointSync()
    trainer = pl.Trainer(**trainer_kwargs(max_steps=2), callbacks=[ModelCheckpoint(dirpath=tmp_path / "2"), sync])
    trainer.fit(TinyRegressor())
    assert sync.url == memory_url and RunStore(memory_url).list_checkpoints()


def test_remote_modelcheckpoint_dirpath_is_refused_before_training(memory_url, tmp_path):
    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=2),
        callbacks=[ModelCheckpoint(dirpath="memory://elsewhere/ckpts"), CheckpointSync(memory_url)],
    )
    with pytest.raises(ConfigError, match="give it a local dirpath"):
        trainer.fit(TinyRegressor())


def test_leftovers_from_a_killed_process_are_never_published(file_url, tmp_path):
    ckpt_dir = tmp_path / "c"
    staging = ckpt_dir / ".trainctl-staging"  # what versions before 0.12 staged in
    staging.mkdir(parents=True)
    (staging / "deadbeef-000001-epoch=0-step=1.ckpt.partial").write_bytes(b"half a checkpoint")
    (ckpt_dir / ".last.ckpt.deadbeef.tmp").write_bytes(b"half a checkpoint")
    (ckpt_dir / "epoch=0-step=1.ckpt").write_bytes(b"written by a killed run without trainctl")
    (ckpt_dir / "epoch=0-step=3.ckpt").write_bytes(PENDING_MARKER)  # reserved by a run killed mid-write
    old = time.time() - 3600
    for p in (
        staging / "deadbeef-000001-epoch=0-step=1.ckpt.partial",
        ckpt_dir / ".last.ckpt.deadbeef.tmp",
        ckpt_dir / "epoch=0-step=3.ckpt",
    ):
        os.utime(p, (old, old))
    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=4, limit_val_batches=0),
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1), CheckpointSync(file_url)],
    )
    trainer.fit(TinyRegressor())
    names = [m.name for m in RunStore(file_url).list_checkpoints()]
    assert names == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    assert sorted(os.listdir(ckpt_dir)) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]


def test_fit_twice_with_the_same_trainer_and_callback(file_url, tmp_path):
    sync = CheckpointSync(file_url)
    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=2, limit_val_batches=0),
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "c", every_n_train_steps=2, save_top_k=-1), sync],
    )
    trainer.fit(TinyRegressor())
    trainer.fit_loop.epoch_loop.max_steps = 4
    trainer.fit(trainer.lightning_module)
    assert [m.global_step for m in RunStore(file_url).list_checkpoints()] == [2, 4]
    assert not any(t.name.startswith("trainctl-") for t in threading.enumerate()), "background threads stopped"


def test_a_checkpoint_is_published_only_after_the_metrics_of_its_steps(tmp_path) -> None:
    """With a MetricsReporter on the Trainer, no manifest appears before the metrics of the steps
    the checkpoint covers are in the store: an instance lost right after a publish leaves no gap
    in the steps a resumed run continues. The reporter here would not flush on its own for an hour."""
    from trainctl_lightning import MetricsReporter
    from trainctl_lightning.metrics.read import read_metrics

    url = f"file://{tmp_path}/store/run"
    store = RunStore(url)
    seen: dict[str, list[int]] = {}  # checkpoint id -> metric steps stored when its manifest first showed
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for manifest in store.list_checkpoints():
                if manifest.id not in seen:
                    seen[manifest.id] = [r.step for r in read_metrics(url) if "train_loss" in r.metrics]
            time.sleep(0.005)  # a poll interval, not a wait for a condition

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        trainer = pl.Trainer(
            **trainer_kwargs(
                max_steps=6,
                limit_val_batches=0,
                log_every_n_steps=1,
                logger=MetricsReporter(url, flush_interval=3600, status_interval=10),
            ),
            callbacks=[CheckpointSync(url), ModelCheckpoint(dirpath=tmp_path / "c", every_n_train_steps=2, save_top_k=-1)],
        )
        trainer.fit(TinyRegressor())
    finally:
        done.set()
        watcher.join(timeout=10)
    manifests = {m.id: m for m in store.list_checkpoints()}
    assert len(manifests) == 3 and len(seen) >= 2 and set(seen) <= set(manifests)  # the last one may go at the end
    for ckpt_id, steps in seen.items():
        covered = manifests[ckpt_id].global_step
        assert covered is not None and set(range(covered)) <= set(steps), (ckpt_id, covered, steps)
