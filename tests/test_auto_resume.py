"""Automatic resume: ``trainer.fit(model)`` with no ``ckpt_path`` continues from the run's newest
complete checkpoint under a managed run ($TRAINCTL_RECOVER=1) or with ``CheckpointSync(resume=True)``."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tests.helpers.models import ResumableRegressor, trainer_kwargs
from trainctl_lightning import CheckpointSync, ConfigError, RunStore
from trainctl_lightning.store.layout import ATTEMPT_ENV, RECOVER_ENV


class Steps(Callback):
    """Records (global step after the batch, batch index) of every training batch of a fit."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append((trainer.global_step, batch_idx))

    @property
    def steps(self) -> list[int]:
        return [step for step, _ in self.seen]


def _fit(
    url: str,
    ckpt_dir: Path,
    max_steps: int,
    *,
    resume: bool | None = True,
    ckpt_path: str | None = None,
    extra: list[Callback] | None = None,
) -> tuple[pl.Trainer, ResumableRegressor, CheckpointSync, Steps]:
    """A fresh Trainer and model, as a new attempt on a new machine would build them."""
    sync = CheckpointSync(url, resume=resume)
    steps = Steps()
    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=max_steps, limit_val_batches=0),
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1), sync, steps, *(extra or [])],
    )
    model = ResumableRegressor()
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model, sync, steps


def _trainctl_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("trainctl_lightning") and text in r.getMessage()]


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_resume_true_continues_from_the_newest_checkpoint_without_ckpt_path(backend, request, tmp_path, caplog):
    url = request.getfixturevalue("file_url") if backend == "file" else request.getfixturevalue("s3").url()
    _, _, first_sync, first = _fit(url, tmp_path / "a", 4)
    assert first.steps == [1, 2, 3, 4] and first_sync.resumed_from is None
    newest = RunStore(url).latest_checkpoint()
    assert newest is not None and newest.global_step == 4

    with caplog.at_level(logging.INFO, logger="trainctl_lightning"):
        trainer, _, sync, second = _fit(url, tmp_path / "b", 8)  # another machine: nothing local
    assert second.seen == [(5, 4), (6, 5), (7, 6), (8, 7)], "steps 5..8 only, on batches 4..7"
    assert trainer.global_step == 8
    assert sync.resumed_from == newest.id and sync.resumed_from_manifest == newest
    assert _trainctl_lines(caplog, f"resuming from {newest.name} (step 4) of {url}")
    assert trainer.ckpt_path and Path(trainer.ckpt_path).name == newest.name, "restored as fit(ckpt_path=...) is"
    assert RunStore(url).latest_checkpoint().global_step == 8


def test_a_managed_run_resumes_by_itself_and_an_unmanaged_one_starts_fresh(file_url, tmp_path, monkeypatch, caplog):
    _fit(file_url, tmp_path / "a", 4, resume=None)
    monkeypatch.setenv(RECOVER_ENV, "1")
    monkeypatch.setenv(ATTEMPT_ENV, "2")
    with caplog.at_level(logging.INFO, logger="trainctl_lightning"):
        trainer, _, sync, managed = _fit(file_url, tmp_path / "b", 8, resume=None)
    assert managed.steps == [5, 6, 7, 8] and sync.resumed_from is not None
    assert _trainctl_lines(caplog, f"${RECOVER_ENV}=1, attempt 2")

    for value in (None, "0"):
        if value is None:
            monkeypatch.delenv(RECOVER_ENV)
        else:
            monkeypatch.setenv(RECOVER_ENV, value)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="trainctl_lightning"):
            trainer, _, sync, fresh = _fit(file_url, tmp_path / f"c{value}", 3, resume=None)
        assert fresh.steps == [1, 2, 3] and sync.resumed_from is None and trainer.ckpt_path is None
        assert not _trainctl_lines(caplog, "resuming from")

    # resume=False wins over the managed run's environment
    monkeypatch.setenv(RECOVER_ENV, "1")
    _, _, sync, never = _fit(file_url, tmp_path / "d", 2, resume=False)
    assert never.steps == [1, 2] and sync.resumed_from is None


def test_an_explicit_ckpt_path_wins(file_url, tmp_path, caplog):
    _fit(file_url, tmp_path / "a", 4)
    mine = tmp_path / "a" / "epoch=0-step=2.ckpt"
    assert mine.exists()
    with caplog.at_level(logging.INFO, logger="trainctl_lightning"):
        trainer, _, sync, steps = _fit(file_url, tmp_path / "b", 5, ckpt_path=str(mine))
    assert steps.steps == [3, 4, 5], "from the user's step-2 file, not the store's step 4"
    assert sync.resumed_from is None and trainer.ckpt_path == str(mine)
    assert len(_trainctl_lines(caplog, "not resuming automatically")) == 1


def test_no_checkpoint_yet_starts_fresh_and_says_so(file_url, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="trainctl_lightning"):
        trainer, _, sync, steps = _fit(file_url, tmp_path / "a", 3)
    assert steps.steps == [1, 2, 3] and sync.resumed_from is None and trainer.ckpt_path is None
    assert len(_trainctl_lines(caplog, f"no checkpoint in {file_url} yet: fit starts from scratch")) == 1


def test_a_preempt_checkpoint_taken_after_the_notice_is_resumed_from(file_url, tmp_path):
    class Notice(Callback):
        """The agent's SIGUSR1 on a spot notice, arriving while batch 3 trains."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGUSR1)

    _fit(file_url, tmp_path / "a", 3, extra=[Notice()])
    newest = RunStore(file_url).latest_checkpoint()
    assert newest is not None and (newest.name, newest.global_step) == ("preempt-step=3.ckpt", 3)
    assert [m.global_step for m in RunStore(file_url).list_checkpoints()] == [2, 3]

    _, _, sync, steps = _fit(file_url, tmp_path / "b", 6)
    assert sync.resumed_from == newest.id
    assert steps.seen == [(4, 3), (5, 4), (6, 5)], "no step lost after the notice, none repeated"


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_with_one_warning(file_url, tmp_path, caplog):
    _fit(file_url, tmp_path / "a", 4)
    store = RunStore(file_url)
    older, newest = store.list_checkpoints()
    data = store.objects.path("checkpoints", newest.id, newest.name)
    raw = bytearray(store.objects.fs.cat_file(data))
    raw[len(raw) // 2] ^= 0xFF  # same size, wrong sha256
    store.objects.fs.pipe_file(data, bytes(raw))

    with caplog.at_level(logging.INFO, logger="trainctl_lightning"):
        _, _, sync, steps = _fit(file_url, tmp_path / "b", 6)
    assert sync.resumed_from == older.id
    assert steps.steps == [3, 4, 5, 6]
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("trainctl_lightning")]
    assert len(loud) == 1 and newest.id in loud[0].getMessage() and "sha256" in loud[0].getMessage().lower()


def test_resumed_weights_equal_an_uninterrupted_run(file_url, tmp_path):
    torch.manual_seed(0)
    _, straight, _, _ = _fit(f"file://{tmp_path}/straight-store/run", tmp_path / "straight", 8, resume=False)

    torch.manual_seed(0)
    _fit(file_url, tmp_path / "a", 4)
    _, resumed, sync, steps = _fit(file_url, tmp_path / "b", 8)
    assert sync.resumed_from is not None and steps.steps == [5, 6, 7, 8]
    expected, got = straight.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs from the uninterrupted run"
    assert not torch.equal(ResumableRegressor().state_dict()["net.0.weight"], got["net.0.weight"]), "it trained"


@pytest.mark.parametrize("bad", ["yes", 1, 0.0, "auto"])
def test_a_bad_resume_value_is_one_clear_line(file_url, bad):
    with pytest.raises(ConfigError, match=r"^CheckpointSync\(resume=.*\): must be True, False or None") as info:
        CheckpointSync(file_url, resume=bad)
    assert repr(bad) in str(info.value) and "\n" not in str(info.value)


def test_only_fit_resumes(file_url, tmp_path):
    _fit(file_url, tmp_path / "a", 2)
    trainer, model, sync, _ = _fit(file_url, tmp_path / "b", 4)
    assert sync.resumed_from is not None and trainer.ckpt_path
    trainer.validate(model, dataloaders=model.val_dataloader(), verbose=False)
    assert trainer.ckpt_path is None, "validate with no ckpt_path uses the model as it is"


@pytest.mark.slow
def test_every_ddp_rank_resumes_from_the_same_checkpoint(file_url, tmp_path):
    def run(ckpt_dir: Path, max_steps: int) -> str:
        script = Path(__file__).parent / "scripts" / "ddp_resume_train.py"
        done = subprocess.run(
            [sys.executable, str(script), file_url, str(ckpt_dir), str(max_steps)],
            capture_output=True,
            text=True,
            timeout=240,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    first = run(tmp_path / "a", 4)
    assert "RANK 0 START step=0 ckpt=None" in first and "RANK 1 START step=0 ckpt=None" in first
    newest = RunStore(file_url).latest_checkpoint()
    assert newest is not None and newest.global_step == 4

    out = run(tmp_path / "b", 6)
    starts = sorted(line for line in out.splitlines() if " START " in line)
    assert len(starts) == 2, out
    paths = {line.split("ckpt=")[1] for line in starts}
    assert len(paths) == 1 and Path(paths.pop()).name == newest.name, "one file, chosen by rank zero"
    assert all("step=4" in line for line in starts)
    assert f"RANK 0 DONE step=6 resumed={newest.id}" in out and f"RANK 1 DONE step=6 resumed={newest.id}" in out
