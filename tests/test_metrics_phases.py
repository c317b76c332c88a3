"""MetricsReporter's status.json phases as real runs produce them: validating and testing while
those loops run (seen from inside the loop), interrupted when Ctrl-C or SIGTERM stops a fit."""

from __future__ import annotations

import signal

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerStatus

from tests.helpers import wait_until
from tests.helpers.models import TinyRegressor, trainer_kwargs
from trainctl_lightning import MetricsReporter
from trainctl_lightning.metrics.read import read_metrics, read_status
from trainctl_lightning.metrics.records import Phase

STATUS_INTERVAL = 0.1  # the reporter refreshes status.json this often; the waits below are for it


class RegressorWithTestLoop(TinyRegressor):
    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", torch.nn.functional.mse_loss(self(x), y))

    def test_dataloader(self):
        return self.val_dataloader()


def _phase(url: str) -> Phase | None:
    status = read_status(url)
    return None if status is None else status.phase


def _wait_for_phase(url: str, phase: Phase, where: str) -> Phase:
    return wait_until(lambda: _phase(url) is phase and phase, timeout=15, what=f"status.json to say {phase.value} {where}")


class ObservePhases(Callback):
    """Blocks the loop at its first batch of each kind until status.json reports the expected
    phase, and notes what it saw: the phase is read from the store while the loop is running."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[tuple[str, str, str]] = []

    def _observe(self, trainer: pl.Trainer, loop: str, expected: Phase) -> None:
        key = (trainer.state.fn.value, loop)
        if any(seen[:2] == key for seen in self.seen):
            return
        got = _wait_for_phase(self.url, expected, f"during the {loop} loop of trainer.{key[0]}")
        self.seen.append((*key, got.value))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._observe(trainer, "train", Phase.TRAINING)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._observe(trainer, "validation", Phase.VALIDATING)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._observe(trainer, "test", Phase.TESTING)


def test_status_says_validating_and_testing_while_those_loops_run(file_url):
    observer = ObservePhases(file_url)
    kw = trainer_kwargs(max_steps=4, val_check_interval=2, limit_val_batches=2, limit_test_batches=2, log_every_n_steps=1)
    kw.pop("logger")
    trainer = pl.Trainer(**kw, logger=MetricsReporter(file_url, status_interval=STATUS_INTERVAL), callbacks=[observer])
    model = RegressorWithTestLoop()

    trainer.fit(model)
    assert observer.seen == [("fit", "train", "training"), ("fit", "validation", "validating")]
    assert _phase(file_url) is Phase.FINISHED

    trainer.validate(model, verbose=False)
    assert observer.seen[-1] == ("validate", "validation", "validating")
    assert _phase(file_url) is Phase.FINISHED, "validate ends finished again"

    trainer.test(model, verbose=False)
    assert observer.seen[-1] == ("test", "test", "testing")
    final = read_status(file_url)
    assert final.phase is Phase.FINISHED and final.error is None
    assert final.metrics.get("test_loss") is not None, "the test loop's metrics reached the status"


class StopAtStep(Callback):
    """Once the status says training, sends this process ``signum`` at ``step``, as Ctrl-C or the
    agent's stop (SIGTERM) would."""

    def __init__(self, url: str, signum: int, step: int) -> None:
        self.url, self.signum, self.step = url, signum, step
        self.sent_at: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and self.sent_at is None:
            _wait_for_phase(self.url, Phase.TRAINING, "before the signal")
            self.sent_at = trainer.global_step
            signal.raise_signal(self.signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_fit_stopped_by_ctrl_c_or_sigterm_reports_interrupted(file_url, signum):
    stopper = StopAtStep(file_url, signum, step=3)
    kw = trainer_kwargs(max_steps=50, limit_val_batches=0, log_every_n_steps=1)
    kw.pop("logger")
    trainer = pl.Trainer(**kw, logger=MetricsReporter(file_url, status_interval=STATUS_INTERVAL), callbacks=[stopper])

    caught: list[int] = []
    # Ctrl-C reaches Python only if SIGINT is handled (a suite started in the background inherits
    # it ignored). For SIGTERM, a handler of ours is kept beside Lightning's (it chains existing
    # handlers), so the signal can never end the test process itself.
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda s, frame: caught.append(s))
    try:
        # Lightning turns KeyboardInterrupt into exit(1) after its cleanup; SIGTERM surfaces as
        # its SIGTERMException, a SystemExit, at the end of the step
        with pytest.raises(SystemExit):
            trainer.fit(TinyRegressor())
    finally:
        for s, handler in previous.items():  # Lightning leaves SIGINT ignored after a Ctrl-C
            signal.signal(s, handler)

    assert stopper.sent_at == 3
    assert trainer.state.status is TrainerStatus.INTERRUPTED
    status = read_status(file_url)
    assert status.phase is Phase.INTERRUPTED and status.state() == "interrupted"
    assert status.error is None, "an interruption is not a failure"
    assert 3 <= status.global_step < 50
    steps = [r.step for r in read_metrics(file_url) if "train_loss" in r.metrics]
    assert {0, 1} <= set(steps), "what was logged before the interruption is kept"
    if signum == signal.SIGTERM:
        assert caught == [signal.SIGTERM]
