"""MetricsReporter on real fits: what the model logs is what the store holds, and the status is live."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from tests.helpers import wait_until
from tests.helpers.models import TinyRegressor, trainer_kwargs
from trainctl_lightning import (
    CheckpointSync,
    ConfigError,
    MetricsReporter,
    RunStore,
    resume_path,
)
from trainctl_lightning.metrics.read import (
    list_runs,
    read_hparams,
    read_metrics,
    read_status,
)
from trainctl_lightning.metrics.records import Phase
from trainctl_lightning.timeutil import parse_time

SCRIPTS = Path(__file__).parent / "scripts"


class Counting(TinyRegressor):
    """Logs values a test can predict exactly: the step it is at, and a constant."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("seen_step", float(self.global_step))
        self.log("const", 1.5)
        return loss


def _kwargs(**overrides):
    kw = trainer_kwargs(log_every_n_steps=1, **overrides)
    kw.pop("logger")
    return kw


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_logged_values_arrive_exactly_beside_another_logger(backend, request, tmp_path):
    url = request.getfixturevalue("s3").url() if backend == "s3" else request.getfixturevalue("file_url")
    reporter = MetricsReporter(url, flush_interval=0.2, status_interval=0.2)
    trainer = pl.Trainer(**_kwargs(max_steps=25), logger=[reporter, CSVLogger(tmp_path, name="csv")])
    trainer.fit(Counting(lr=0.01))

    records = read_metrics(url)
    train = [r for r in records if "seen_step" in r.metrics]
    assert [r.metrics["seen_step"] for r in train] == [float(s) for s in range(25)]
    assert all(r.metrics["const"] == 1.5 for r in train)
    # the same numbers CSVLogger wrote, row for row
    with open(Path(trainer.loggers[1].log_dir) / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train_loss")]
    assert [float(row["train_loss"]) for row in rows] == pytest.approx([r.metrics["train_loss"] for r in train], rel=1e-6)
    assert any("val_loss" in r.metrics for r in records), "validation metrics arrive too"
    assert read_hparams(url)["lr"] == 0.01

    status = read_status(url)
    assert status.phase is Phase.FINISHED and status.state() == "finished"
    assert status.global_step == 25 and status.max_steps == 25 and status.epoch is not None
    assert status.metrics["seen_step"] == 24.0
    assert status.host and status.pid == os.getpid()


def test_status_is_refreshed_while_training_with_rate_eta_and_checkpoint(file_url, tmp_path):
    seen = []

    class Probe(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step % 20 == 0:
                # training holds still here: the writer thread must report this very step
                step = trainer.global_step
                seen.append(
                    wait_until(
                        lambda: (s := read_status(file_url)) is not None and s.global_step == step and s,
                        timeout=10,
                        what=f"a status at step {step}",
                    )
                )

    trainer = pl.Trainer(
        **_kwargs(max_steps=120, limit_val_batches=0),
        logger=[MetricsReporter(file_url, status_interval=0.3)],
        callbacks=[Probe(), ModelCheckpoint(dirpath=tmp_path / "c", every_n_train_steps=40), CheckpointSync(file_url)],
    )
    trainer.fit(TinyRegressor())
    live = [s for s in seen if s.phase is Phase.TRAINING]
    assert len({s.updated_at for s in live}) >= 3, "status refreshed several times during training"
    assert any(s.steps_per_s and s.eta_s is not None for s in live)
    assert any(s.last_checkpoint and s.last_checkpoint["name"].endswith(".ckpt") for s in live)
    final = read_status(file_url)
    assert final.phase is Phase.FINISHED and final.last_checkpoint["global_step"] == 120


def test_a_resumed_run_adds_segments_and_loses_nothing(s3, tmp_path):
    url = s3.url()

    def run(max_steps):
        trainer = pl.Trainer(
            **_kwargs(max_steps=max_steps, limit_val_batches=0),
            logger=[MetricsReporter(url)],
            callbacks=[ModelCheckpoint(dirpath=tmp_path / f"c{max_steps}", every_n_train_steps=10), CheckpointSync(url)],
        )
        trainer.fit(Counting(), ckpt_path=resume_path(url, cache_dir=tmp_path / "cache"))

    run(10)
    first = read_metrics(url)
    run(20)
    after = read_metrics(url)
    assert after[: len(first)] == first, "the first attempt's records are untouched"
    steps = [r.metrics["seen_step"] for r in after if "seen_step" in r.metrics]
    assert steps == [float(s) for s in range(20)], "the second attempt continues at step 10"
    segments = [name for name, _ in RunStore(url).read_metrics_segments()]
    assert len({name.split("-")[1] for name in segments}) == 2, "one writer session per attempt"


def test_flush_every_n_records_writes_segments_during_training(memory_url):
    counts = []

    class Count(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 45:
                # 45 records so far, and no flush is due for an hour: only flush_every writes segments
                counts.append(
                    wait_until(
                        lambda: (n := len(RunStore(memory_url).read_metrics_segments())) >= 3 and n,
                        timeout=10,
                        what="segments of 10 records",
                    )
                )

    trainer = pl.Trainer(
        **_kwargs(max_steps=50, limit_val_batches=0),
        logger=[MetricsReporter(memory_url, flush_interval=3600, flush_every=10)],
        callbacks=[Count()],
    )
    trainer.fit(TinyRegressor())
    assert counts and counts[0] >= 3, "segments are written every 10 records, not only at the end"
    assert len([r for r in read_metrics(memory_url) if "train_loss" in r.metrics]) == 50


def test_a_failing_run_reports_failed_with_the_error(file_url):
    trainer = pl.Trainer(**_kwargs(max_steps=10, limit_val_batches=0), logger=[MetricsReporter(file_url)])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(TinyRegressor(fail_at_step=4))
    status = read_status(file_url)
    assert status.phase is Phase.FAILED and status.error == "RuntimeError: boom at step 4"
    assert len(read_metrics(file_url)) >= 4, "what was logged before the failure is kept"


@pytest.mark.slow
def test_a_killed_run_shows_stale(s3, tmp_path):
    url = s3.url()
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "sigterm_train.py"), url, str(tmp_path / "c"), "--metrics"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **s3.env()},
    )
    try:
        for line in proc.stdout:
            if "TRAINING" in line:
                break
        wait_until(
            lambda: (s := read_status(url)) is not None and s.phase is Phase.TRAINING, timeout=30, what="a training status"
        )
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    status = read_status(url)
    assert status.phase is Phase.TRAINING, "killed mid-training: it never got to say it ended"
    updated = parse_time(status.updated_at)
    assert status.state(now=updated + timedelta(seconds=5)) == "training", "fresh: not stale yet"
    later = updated + timedelta(seconds=status.stale_after_s + 1)
    assert status.state(now=later) == "stale"
    assert status.stale_after_s <= 30, "stale is noticed within 30 s of the last refresh"
    [summary] = list_runs(url)
    assert summary.status.session == status.session


def test_write_failures_never_stop_training(s3, caplog):
    url = s3.url()
    reporter = MetricsReporter(url, flush_interval=0.1, status_interval=0.1)

    class DropBucket(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 5:
                s3.server.delete_bucket(s3.bucket)
            elif trainer.global_step == 6:  # writes fail while the run trains, not only at its end
                wait_until(lambda: reporter.write_errors > 0, timeout=10, what="a failed write")

    trainer = pl.Trainer(**_kwargs(max_steps=30, limit_val_batches=0), logger=[reporter], callbacks=[DropBucket()])
    with caplog.at_level(logging.ERROR):
        trainer.fit(TinyRegressor())
    assert trainer.global_step == 30
    assert reporter.write_errors > 0 and "could not write" in caplog.text
    assert not [t.name for t in threading.enumerate() if t.name.startswith("trainctl-")], "a failing store keeps no thread"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "nosuch://x"}, "unknown storage protocol"),
        ({"url": "memory://x", "status_interval": 30}, r"status_interval=30\): must be seconds in \(0, 10\]"),
        ({"url": "memory://x", "flush_every": 0}, r"flush_every=0\)"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs, message):
    url = kwargs.pop("url")
    with pytest.raises(ConfigError, match=message):
        MetricsReporter(url, **kwargs)


def test_without_a_url_it_is_taken_from_the_environment_when_it_starts(monkeypatch, memory_url):
    reporter = MetricsReporter()
    trainer = pl.Trainer(**trainer_kwargs(max_steps=2, logger=reporter))
    with pytest.raises(ConfigError, match=r"needs a store URL.*TRAINCTL_RUN_URL"):
        trainer.fit(TinyRegressor())
    monkeypatch.setenv("TRAINCTL_RUN_URL", memory_url)
    reporter = MetricsReporter()
    pl.Trainer(**trainer_kwargs(max_steps=2, logger=reporter)).fit(TinyRegressor())
    assert RunStore(memory_url).read_status() is not None  # it reported to the run URL from the environment


def test_the_hot_path_only_buffers(memory_url):
    """log_metrics does no I/O on the training thread: a burst is buffered, then written in the background."""
    reporter = MetricsReporter(memory_url, flush_interval=3600, flush_every=10**6)
    start = time.perf_counter()
    for step in range(5000):
        reporter.log_metrics({"a": 1.0, "b": torch.tensor(2.0).item(), "c": step}, step)
    per_call = (time.perf_counter() - start) / 5000
    assert RunStore(memory_url).read_metrics_segments() == [], "nothing written synchronously"
    reporter.finalize("success")
    assert len(read_metrics(memory_url)) == 5000
    assert per_call < 0.001  # generous: it is a list append, this only catches I/O sneaking in
