"""MetricsReporter against Lightning's logger contract, with CSVLogger as the baseline.

Each scenario runs once with Lightning's own ``CSVLogger`` and once with ``MetricsReporter``
(the behaviours Lightning's ``loggers/test_all.py`` checks for every logger: pickling,
``ddp_spawn``, name/version/save_dir, prefix, hyperparameters, no leftover thread), and compares
what the user can observe: ``trainer.callback_metrics``, the metric keys read back from the store
against the CSV file, where checkpoints land.
"""

from __future__ import annotations

import csv
import gc
import json
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.logger import DummyExperiment

from tests.helpers import wait_until
from tests.helpers.models import TinyRegressor, trainer_kwargs
from trainctl_lightning import MetricsReporter, RunStore
from trainctl_lightning.metrics.read import read_hparams, read_metrics, read_status
from trainctl_lightning.metrics.records import Phase

THREAD_PREFIX = "trainctl-"


def ours() -> list[str]:
    """Names of the trainctl threads alive now."""
    return [t.name for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


@pytest.fixture(autouse=True)
def _no_thread_left() -> Any:
    assert ours() == [], "a trainctl thread was alive before the test"
    yield
    gc.collect()
    assert ours() == [], "the test left a trainctl thread behind"


def make_logger(kind: str, tmp_path: Path, **kwargs: Any) -> Logger:
    if kind == "csv":
        return CSVLogger(tmp_path / "csv", **kwargs)
    return MetricsReporter(f"file://{tmp_path}/store/run", flush_interval=3600, **kwargs)


def logged(logger: Logger) -> list[tuple[int, list[str]]]:
    """(step, sorted metric names) of every log_metrics call, as read back from disk or the store."""
    if isinstance(logger, CSVLogger):
        with open(os.path.join(logger.log_dir, "metrics.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
        return [(int(row["step"]), sorted(k for k, v in row.items() if k != "step" and v != "")) for row in rows]
    assert isinstance(logger, MetricsReporter) and logger.url is not None
    return [(r.step, sorted(r.metrics)) for r in read_metrics(logger.url)]


def hparams(logger: Logger) -> dict[str, Any]:
    if isinstance(logger, CSVLogger):
        with open(os.path.join(logger.log_dir, "hparams.yaml")) as f:
            return dict(yaml.safe_load(f))
    assert isinstance(logger, MetricsReporter) and logger.url is not None
    return read_hparams(logger.url)


class LogsEverywhere(TinyRegressor):
    """Logs from training, validation and test, as Lightning's ``test_loggers_fit_test_all`` does."""

    def on_validation_epoch_end(self) -> None:
        self.log_dict({"early_stop_on": torch.tensor(1.0), "val_extra": torch.tensor(0.5)})

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", torch.nn.functional.mse_loss(self(x), y))

    def test_dataloader(self) -> Any:
        return self.val_dataloader()


def fit_and_test(logger: Logger, tmp_path: Path) -> tuple[pl.Trainer, dict[str, float], dict[str, float]]:
    trainer = pl.Trainer(
        **trainer_kwargs(
            default_root_dir=tmp_path / "root",
            max_epochs=2,
            limit_train_batches=3,
            log_every_n_steps=1,
            logger=logger,
            enable_checkpointing=True,
        )
    )
    trainer.fit(LogsEverywhere(lr=0.01))
    fitted = {k: float(v) for k, v in trainer.callback_metrics.items()}
    trainer.test(ckpt_path=None, verbose=False)
    tested = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return trainer, fitted, tested


# ----------------------------------------------------------------------------- a fit, then a test


def test_what_a_fit_and_a_test_log_reads_back_as_with_csvlogger(tmp_path: Path) -> None:
    results = {}
    for kind in ("csv", "ours"):
        logger = make_logger(kind, tmp_path / kind)
        trainer, fitted, tested = fit_and_test(logger, tmp_path / kind)
        assert ours() == [], f"{kind}: a thread is left after fit and test"
        results[kind] = (logger, trainer, fitted, tested)
    csv_logger, csv_trainer, csv_fitted, csv_tested = results["csv"]
    reporter, trainer, fitted, tested = results["ours"]
    assert fitted == csv_fitted and tested == csv_tested, "callback_metrics differ"
    assert logged(reporter) == logged(csv_logger), "the logged records differ (steps or metric names)"
    assert hparams(reporter) == hparams(csv_logger) == dict(TinyRegressor(lr=0.01).hparams)
    status = read_status(str(reporter.url))
    assert status is not None and status.phase is Phase.FINISHED and status.session == reporter.version
    # where Lightning puts checkpoints: <save_dir or default_root_dir>/<name>/<version>/checkpoints
    for logger, t in ((csv_logger, csv_trainer), (reporter, trainer)):
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        expected = os.path.join(logger.save_dir or t.default_root_dir, str(logger.name), version, "checkpoints")
        assert os.path.dirname(t.checkpoint_callback.best_model_path) == expected  # type: ignore[union-attr]


def test_name_version_and_directories_follow_the_logger_contract(tmp_path: Path) -> None:
    for kind in ("csv", "ours"):
        logger = make_logger(kind, tmp_path)
        assert isinstance(logger.name, str) and logger.name
        assert isinstance(logger.version, (int, str))
        for attribute in ("save_dir", "log_dir", "root_dir"):
            value = getattr(logger, attribute)
            assert value is None or isinstance(value, str), f"{kind}.{attribute} = {value!r}"
        copy = pickle.loads(pickle.dumps(logger))
        assert (copy.name, copy.version, copy.save_dir) == (logger.name, logger.version, logger.save_dir)


def test_a_prefix_is_put_before_every_metric_name_as_csvlogger_does(tmp_path: Path) -> None:
    read = {}
    for kind in ("csv", "ours"):
        logger = make_logger(kind, tmp_path, prefix="tmp")
        logger.log_metrics({"test": 1.0}, step=0)
        logger.finalize("success")
        read[kind] = logged(logger)
    assert read["ours"] == read["csv"] == [(0, ["tmp-test"])]


# ----------------------------------------------------------------------------- pickling


@pytest.mark.parametrize("kind", ["csv", "ours"])
def test_a_used_logger_and_a_trainer_holding_it_pickle(kind: str, tmp_path: Path) -> None:
    """Lightning's ``test_loggers_pickle_all``: log, save, pickle the logger and the Trainer."""
    logger = make_logger(kind, tmp_path)
    _ = logger.experiment
    logger.log_metrics({"a": 1.0})
    logger.save()
    pickle.dumps(logger)
    trainer = pl.Trainer(max_epochs=1, logger=logger, default_root_dir=tmp_path / "root", enable_progress_bar=False)
    trainer2 = pickle.loads(pickle.dumps(trainer))
    trainer2.logger.log_metrics({"acc": 1.0})
    assert trainer2.logger.name == logger.name and trainer2.logger.save_dir == logger.save_dir
    trainer2.logger.finalize("success")
    logger.finalize("success")
    assert sorted(name for _, names in logged(logger) for name in names) == ["a", "acc"]


def test_a_copy_pickled_before_and_after_use_writes_to_the_same_store_and_nothing_twice(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store/run"
    reporter = MetricsReporter(url, flush_interval=3600)
    before = pickle.loads(pickle.dumps(reporter))  # never used: no thread, nothing buffered
    assert ours() == []
    before.log_metrics({"from_copy_before": 1.0}, step=0)
    before.finalize("success")

    reporter.log_metrics({"pending": 2.0}, step=1)  # buffered, not yet written (flush_interval=3600)
    assert RunStore(url).read_metrics_segments() == [] or all(
        b"pending" not in data for _, data in RunStore(url).read_metrics_segments()
    )
    after = pickle.loads(pickle.dumps(reporter))  # pending records stay with the original
    assert (after.name, after.version, after.url) == (reporter.name, reporter.version, reporter.url)
    after.log_metrics({"from_copy_after": 3.0}, step=2)
    after.finalize("success")
    reporter.finalize("success")

    records = sorted((r.step, sorted(r.metrics)) for r in read_metrics(url))
    assert records == [(0, ["from_copy_before"]), (1, ["pending"]), (2, ["from_copy_after"])], "lost or duplicated"
    status = read_status(url)
    assert status is not None and status.phase is Phase.FINISHED and status.session == reporter.version


def test_credentials_are_not_pickled_except_into_a_spawned_child(tmp_path: Path) -> None:
    options = {"token": "fake-token-1", "auto_mkdir": True}
    reporter = MetricsReporter(f"file://{tmp_path}/store/run", storage_options=options)
    data = pickle.dumps(reporter)
    assert b"fake-token-1" not in data
    assert pickle.loads(data).storage_options == {"auto_mkdir": True}
    assert reporter.storage_options == options, "the reporter here keeps its credentials"


# ----------------------------------------------------------------------------- threads


def test_log_metrics_outside_a_fit_then_finalize_leaves_no_thread(tmp_path: Path) -> None:
    reporter = MetricsReporter(f"file://{tmp_path}/store/run", flush_interval=3600)
    reporter.log_metrics({"x": 1.0}, step=0)
    assert ours() == [f"trainctl-metrics-{reporter.version}"], "the writer thread has our name"
    reporter.finalize("success")
    assert ours() == []
    assert [r.metrics for r in read_metrics(str(reporter.url))] == [{"x": 1.0}]
    status = read_status(str(reporter.url))
    assert status is not None and status.phase is Phase.FINISHED


def test_a_reporter_dropped_without_finalize_stops_its_thread_and_writes_what_it_had(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store/run"
    reporter = MetricsReporter(url, flush_interval=3600)
    reporter.log_metrics({"x": 1.0}, step=0)
    reporter.log_hyperparams({"lr": 0.1})
    del reporter
    gc.collect()
    # at once, or (when the writer thread held it for a status at that moment) as soon as it lets go
    wait_until(lambda: ours() == [], timeout=30, what="the writer thread of a collected reporter to end")
    assert [r.metrics for r in read_metrics(url)] == [{"x": 1.0}] and read_hparams(url) == {"lr": 0.1}
    status = read_status(url)
    assert status is not None and status.phase is Phase.INTERRUPTED, "not finalized: it did not say it finished"


def test_a_leftover_thread_stopped_from_outside_flushes_and_the_reporter_goes_on(tmp_path: Path) -> None:
    """Lightning's test suite calls ``stop()`` on every daemon thread a test leaves behind."""
    url = f"file://{tmp_path}/store/run"
    reporter = MetricsReporter(url, flush_interval=3600)
    reporter.log_metrics({"x": 1.0}, step=0)
    [thread] = [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]
    stop: Callable[[], None] = getattr(thread, "stop")  # noqa: B009  # what Lightning's conftest looks up
    assert thread.daemon
    stop()
    assert not thread.is_alive()
    assert [r.metrics for r in read_metrics(url)] == [{"x": 1.0}]
    reporter.log_metrics({"x": 2.0}, step=1)  # a new thread
    reporter.finalize("success")
    assert [r.metrics for r in read_metrics(url)] == [{"x": 1.0}, {"x": 2.0}]
    status = read_status(url)
    assert status is not None and status.phase is Phase.FINISHED


def test_a_reporter_left_at_interpreter_exit_writes_what_it_had(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store/run"
    script = (
        "import sys\n"
        "from trainctl_lightning import MetricsReporter\n"
        "reporter = MetricsReporter(sys.argv[1], flush_interval=3600)\n"
        "reporter.log_metrics({'x': 1.0}, step=0)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), str(Path(__file__).parents[2])]))}
    subprocess.run([sys.executable, "-c", script, url], check=True, timeout=120, env=env)
    assert [r.metrics for r in read_metrics(url)] == [{"x": 1.0}]
    status = read_status(url)
    assert status is not None and status.phase is Phase.INTERRUPTED


# ----------------------------------------------------------------------------- ddp_spawn


class RankZeroExperiment(Callback):
    """Lightning's ``RankZeroLoggerCheck``, plus what each rank sees written to a file we can read."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        is_dummy = isinstance(trainer.logger.experiment, DummyExperiment)  # type: ignore[union-attr]
        assert is_dummy != trainer.is_global_zero
        if batch_idx == 0:
            options = getattr(trainer.logger, "storage_options", {})
            (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"options": sorted(options)}))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ddp_spawn_with_two_processes_reports_rank_zero_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Lightning's spawn launcher hands rank zero's weights back through a tempfile.mkdtemp() folder
    # it never removes (_collect_rank_zero_results): the spawned processes make it in this test's folder.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    results = {}
    for kind in ("csv", "ours"):
        out = tmp_path / kind / "ranks"
        out.mkdir(parents=True)
        logger = (
            # version given: left to itself, the main process's CSVLogger picks the next one after the worker's
            CSVLogger(tmp_path / kind / "csv", version=0)
            if kind == "csv"
            else MetricsReporter(f"file://{tmp_path}/store/run", storage_options={"token": "fake-token-2"}, flush_interval=3600)
        )
        trainer = pl.Trainer(
            **trainer_kwargs(
                strategy="ddp_spawn",
                devices=2,
                default_root_dir=tmp_path / kind / "root",
                max_steps=4,
                limit_val_batches=0,
                log_every_n_steps=1,
                logger=logger,
                callbacks=[RankZeroExperiment(out)],
            )
        )
        trainer.fit(TinyRegressor())
        assert trainer.state.finished
        results[kind] = (logger, trainer, sorted(trainer.callback_metrics))
        assert ours() == []
    (csv_logger, _, csv_keys), (reporter, trainer, keys) = results["csv"], results["ours"]
    assert keys == csv_keys
    assert logged(reporter) == logged(csv_logger), "rank 0's records differ from CSVLogger's (or are duplicated)"
    assert [step for step, _ in logged(reporter)] == list(range(4))
    status = read_status(str(reporter.url))
    assert status is not None and status.phase is Phase.FINISHED
    assert status.session == reporter.version and status.pid != os.getpid(), "the status is the worker's"
    # the spawned workers got the credentials through the pipe (they never went anywhere else)
    assert json.loads((tmp_path / "ours" / "ranks" / "rank0.json").read_text())["options"] == ["token"]
