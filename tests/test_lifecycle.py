"""CheckpointSync across process boundaries: SIGTERM, DDP, and the Lightning seams it relies on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tests.helpers.models import TinyRegressor, trainer_kwargs
from trainctl_lightning import RunStore

SCRIPTS = Path(__file__).parent / "scripts"


def _run(script: str, *args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPTS / script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        **kw,
    )


@pytest.mark.slow
def test_sigterm_saves_publishes_and_exits(s3, tmp_path):
    url = s3.url()
    proc = _run("sigterm_train.py", url, str(tmp_path / "c"), env=s3.env())
    try:
        for line in proc.stdout:
            if "TRAINING" in line:
                break
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Lightning handles the SIGTERM and exits through SIGTERMException, a SystemExit without a
    # code: status 0, not -SIGTERM (killed by the signal) nor 1 (a hook failed on the way out)
    assert proc.returncode == 0, out[-2000:]
    store = RunStore(url)
    latest = store.latest_checkpoint()
    assert latest is not None and latest.name == "on_exception.ckpt", out[-2000:]
    assert latest.global_step >= 3
    store.verify_checkpoint(latest)
    # everything ModelCheckpoint kept locally is in the store too
    local = {p.name for p in (tmp_path / "c").glob("*.ckpt")}
    assert local <= {m.name for m in store.list_checkpoints()}


@pytest.mark.slow
def test_only_global_rank_zero_uploads_and_reports_under_ddp(file_url, tmp_path):
    proc = _run("ddp_train.py", file_url, str(tmp_path / "c"), env={"PYTHONUNBUFFERED": "1"})
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    pids = {int(line.split("pid=")[1]) for line in out.splitlines() if line.startswith("RANK 0 DONE")}
    assert len(pids) == 1 and "RANK 1 DONE" in out
    published = RunStore(file_url).list_checkpoints()
    assert [m.global_step for m in published] == [2, 4, 6], "each checkpoint exactly once"
    assert {m.source["pid"] for m in published} == pids, "published by rank zero's process only"
    # metrics too: one writer (rank zero), every step once
    from trainctl_lightning.metrics.read import read_metrics, read_status

    segments = RunStore(file_url).read_metrics_segments()
    assert len({name.split("-")[1] for name, _ in segments}) == 1
    assert read_status(file_url).pid in pids
    assert [r.step for r in read_metrics(file_url) if "train_loss" in r.metrics] == list(range(6))


class _RecordingIO(TorchCheckpointIO):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.calls.append(f"save {Path(path).name}")
        super().save_checkpoint(checkpoint, path, storage_options)

    def remove_checkpoint(self, path):
        self.calls.append(f"remove {Path(path).name}")
        super().remove_checkpoint(path)

    def teardown(self):
        self.calls.append("teardown")


class _Install(Callback):
    """Installs a CheckpointIO in `setup`, exactly the way CheckpointSync does."""

    def __init__(self, io):
        self.io = io

    def setup(self, trainer, pl_module, stage):
        trainer.strategy.checkpoint_io = self.io


@pytest.mark.parametrize("fail", [False, True])
def test_lightning_seams_we_rely_on(tmp_path, fail):
    """Fails loudly if Lightning stops routing saves, removals or teardown through checkpoint_io.

    CheckpointSync depends on: a CheckpointIO assigned to `trainer.strategy.checkpoint_io` in a
    callback's `setup` receives every ModelCheckpoint save and removal, and its `teardown` runs at
    the end of fit, after an exception too.
    """
    io = _RecordingIO()
    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=6, limit_val_batches=0),
        callbacks=[
            _Install(io),
            ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=1, monitor="step", mode="max"),
        ],
    )
    if fail:
        with pytest.raises(RuntimeError):
            trainer.fit(TinyRegressor(fail_at_step=5))
        assert io.calls[-1] == "teardown"
        return
    trainer.fit(TinyRegressor())
    assert io.calls == [
        "save epoch=0-step=2.ckpt",
        "save epoch=0-step=4.ckpt",
        "remove epoch=0-step=2.ckpt",
        "save epoch=0-step=6.ckpt",
        "remove epoch=0-step=4.ckpt",
        "teardown",
    ]


def test_metrics_reporter_finds_the_trainer_logging_to_it(memory_url):
    """Lightning gives loggers no Trainer; MetricsReporter finds it on the call stack of
    log_hyperparams/log_metrics (its one look at Lightning internals). If Lightning moves that
    call, the status loses epoch, step and ETA: this fails loudly instead."""
    from trainctl_lightning import MetricsReporter

    reporter = MetricsReporter(memory_url)
    kwargs = trainer_kwargs(max_steps=3, limit_val_batches=0, log_every_n_steps=1)
    kwargs["logger"] = [reporter]
    trainer = pl.Trainer(**kwargs)
    trainer.fit(TinyRegressor())
    assert reporter._trainer() is trainer
