"""``MetricsReporter``: a Lightning logger that reports metrics and a live status to the run store."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
import weakref
from argparse import Namespace
from collections import deque
from dataclasses import replace
from datetime import datetime, timezone
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from trainctl_lightning.errors import ConfigError, ConflictError
from trainctl_lightning.metrics.records import GpuInfo, Phase, RunStatus
from trainctl_lightning.retry import RetryPolicy
from trainctl_lightning.store import RunStore, validate_url
from trainctl_lightning.store.credentials import pickled_options
from trainctl_lightning.store.layout import RUN_URL_ENV
from trainctl_lightning.timeutil import utc_now

__all__ = ["MetricsReporter"]

log = logging.getLogger(__name__)


class MetricsReporter(Logger):
    """Report metrics and a live status to a run store, beside any other logger.

    Metric records are buffered in memory and written in the background as immutable JSON
    Lines segments (object stores cannot append), every ``flush_interval`` seconds or
    ``flush_every`` records, and at the end. A restarted run adds segments; nothing is ever
    overwritten. ``status.json`` is rewritten every ``status_interval`` seconds with the phase,
    epoch, step, steps/s, ETA, the newest published checkpoint, host and GPU.

    The training loop only appends to a list: all I/O happens on a background thread (named
    ``trainctl-metrics-<version>``), and no device synchronisation is added beyond Lightning's
    own conversion of logged values. The thread runs from the first ``log_metrics`` /
    ``log_hyperparams`` to ``finalize``. A reporter used outside a fit and never finalized stops
    its thread with a last flush when it is garbage collected or the interpreter exits (its
    status then says ``interrupted``: call ``finalize("success")`` to mark it finished).

    It pickles (``strategy="ddp_spawn"``, Lightning's own pickling of a Trainer): the copy has
    the same settings, name and version and writes to the same store, under segment names of its
    own. Records logged but not yet written when it is pickled stay with the original, which
    writes them (at its next flush, ``save()``, ``finalize`` or exit), so nothing is written
    twice or lost; the copy starts with an empty buffer and no thread.

    Args:
        url: the run's store URL; defaults to ``$TRAINCTL_RUN_URL`` (set when launched by
            trainctl). Use the same URL as ``CheckpointSync`` so a run is one URL.
        storage_options: fsspec options (credentials, endpoint); never logged. Never pickled
            either, except into a child process this machine starts (``ddp_spawn``): when the
            reporter travels to an instance (``RemoteStrategy``) or is pickled anywhere else,
            the credential-like entries are dropped
            (:mod:`trainctl_lightning.store.credentials`) and the copy uses the credentials of
            where it runs, from its environment or role.
        flush_interval: seconds between metric segment writes.
        flush_every: also write a segment once this many records are buffered.
        status_interval: seconds between status refreshes (at most 10).
        prefix: put at the beginning of every metric name, joined with ``-`` (as Lightning's
            loggers do).

    Raises:
        ConfigError: an invalid argument (raised here, before training).

    Example::

        trainer = Trainer(logger=[MetricsReporter("s3://bucket/runs/exp1"), CSVLogger("logs")])
    """

    LOGGER_JOIN_CHAR = "-"

    def __init__(
        self,
        url: str | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        flush_interval: float = 5.0,
        flush_every: int = 10_000,
        status_interval: float = 5.0,
        prefix: str = "",
    ) -> None:
        super().__init__()
        url = url if url is not None else os.environ.get(RUN_URL_ENV)
        if url is not None:
            validate_url(url)
        # else: resolved from $TRAINCTL_RUN_URL when it first writes, where the run executes
        if not (0 < flush_interval <= 3600):
            raise ConfigError(f"MetricsReporter(flush_interval={flush_interval!r}): must be seconds in (0, 3600]")
        if not isinstance(flush_every, int) or flush_every < 1:
            raise ConfigError(f"MetricsReporter(flush_every={flush_every!r}): must be an integer >= 1")
        if not (0 < status_interval <= 10):
            raise ConfigError(f"MetricsReporter(status_interval={status_interval!r}): must be seconds in (0, 10]")
        if not isinstance(prefix, str):
            raise ConfigError(f"MetricsReporter(prefix={prefix!r}): must be a string")
        self.url: str | None = url
        self.storage_options = dict(storage_options or {})
        self.flush_interval = flush_interval
        self.flush_every = flush_every
        self.status_interval = status_interval
        self.prefix = prefix
        self.session = uuid.uuid4().hex[:8]
        self._started = datetime.now(timezone.utc)
        self._phase = Phase.STARTING
        self._error: str | None = None
        self._init_process_state(self._started, {})

    def _init_process_state(self, started: datetime, latest: dict[str, float]) -> None:
        """What belongs to this process only (never pickled): the writer, the Trainer, the rate."""
        self._writer = _Writer(self, started, latest)
        self._trainer_ref: weakref.ReferenceType[pl.Trainer] | None = None
        self._rate: deque[tuple[float, int]] = deque(maxlen=120)
        self._finalizer: weakref.finalize | None = None

    def __repr__(self) -> str:
        return f"MetricsReporter({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:
        # The writer (lock, events, thread, buffer, store client) stays here: pending records are
        # written by this reporter, not by the copy. Credentials stay on this machine.
        state = {k: v for k, v in self.__dict__.items() if k not in _PROCESS_STATE}
        state["storage_options"] = pickled_options(self.storage_options, repr(self))
        state["_latest"] = dict(self._writer.latest)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        latest = state.pop("_latest", {})
        self.__dict__.update(state)
        # a writer of its own, with segment names of its own (its start time), under the same session
        self._init_process_state(datetime.now(timezone.utc), latest)

    # ---------------------------------------------------------- Logger API
    @property
    @override
    def name(self) -> str:
        return "trainctl"

    @property
    @override
    def version(self) -> str:
        return self.session

    @property
    @rank_zero_experiment
    def experiment(self) -> RunStore:
        """The run store this reporter writes to (a no-op stand-in on ranks other than 0)."""
        return self.store

    @property
    def write_errors(self) -> int:
        """Failed background writes so far (each logged); training is never stopped by them."""
        return self._writer.write_errors

    @property
    def store(self) -> RunStore:
        if self._writer.store is None:
            if self.url is None:
                self.url = os.environ.get(RUN_URL_ENV) or None
                if self.url is None:
                    raise ConfigError(
                        "MetricsReporter() needs a store URL, e.g. MetricsReporter('s3://bucket/runs/exp1'), "
                        f"or ${RUN_URL_ENV} set (trainctl launch and RemoteStrategy set it)"
                    )
                validate_url(self.url)
            self._writer.store = RunStore(self.url, self.storage_options, retry=RetryPolicy(deadline_s=60))
        return self._writer.store

    @override
    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace | None = None, *args: Any, **kwargs: Any) -> None:
        self._attach()
        if params is None:
            return
        params = vars(params) if isinstance(params, Namespace) else dict(params)
        self._append(("h", time.time(), _jsonable(params)))

    @override
    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._writer.closed:
            self._attach()
        if self.prefix:
            metrics = {f"{self.prefix}{self.LOGGER_JOIN_CHAR}{k}": v for k, v in metrics.items()}
        self._append(("m", time.time(), step, dict(metrics)))

    @override
    @rank_zero_only
    def save(self) -> None:
        """Write what is buffered now, unless a running fit's writer thread will (then nothing).

        Lightning calls this after every ``log_metrics``; during a fit the background writer
        keeps its own schedule, so the training loop never waits for the store. Called outside a
        fit, it returns once the buffered records are in the store.
        """
        trainer = self._trainer()
        if trainer is not None and trainer.state.status == TrainerStatus.RUNNING and not self._writer.closed:
            return
        if self._writer.started:
            self._writer.flush(final=True)

    @override
    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        """Write the buffered metrics now, and refresh the status soon (it names the new checkpoint).

        The metrics a checkpoint covers reach the store before it is published: an instance
        lost right after would otherwise leave a gap in the steps a resumed run continues.
        """
        if self._writer.started and not self._writer.closed:
            self._writer.flush()
        self._writer.request_status()

    def flush_now(self) -> None:
        """Write the buffered metrics to the store before returning (no-op before the first log or
        after the end). CheckpointSync calls it before it publishes a checkpoint: the metrics of
        the steps a checkpoint covers are in the store first, so a run resumed from it after a
        hard kill has no gap in its steps."""
        if self._writer.started and not self._writer.closed:
            self._writer.flush()

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        """End of a fit/validate/test: write what is buffered and a final status, stop the thread.

        A reporter that never logged in this process does nothing (the main process of
        ``ddp_spawn``: the workers report).
        """
        if not self._writer.started:
            return
        phase = {"success": Phase.FINISHED, "finished": Phase.FINISHED, "failed": Phase.FAILED}.get(status, Phase.INTERRUPTED)
        error = sys.exc_info()[1]  # Lightning finalizes "failed" loggers while handling the exception
        if phase is Phase.FAILED and isinstance(error, (KeyboardInterrupt, SystemExit)):
            phase = Phase.INTERRUPTED  # Ctrl-C, or SIGTERM (Lightning's SIGTERMException)
        elif phase is Phase.FAILED and error is not None:
            self.mark_failed(error)
        self._phase = phase
        self._writer.stop(final_status=True)

    def close(self) -> None:
        """Stop the background thread after a last flush and status (``finalize`` does this)."""
        self._writer.stop(final_status=True)

    def mark_failed(self, error: BaseException) -> None:
        """Record a failure (the status says ``failed`` with the error's first line)."""
        self._phase = Phase.FAILED
        self._error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"

    # ------------------------------------------------------------- internals
    def _append(self, entry: tuple[Any, ...]) -> None:
        writer = self._writer
        with writer.lock:
            writer.buffer.append(entry)
            full = len(writer.buffer) >= self.flush_every
            closed = writer.closed
        if closed:  # the thread finished its last flush meanwhile (stopped from elsewhere): a new one
            self._attach()
        elif full:
            writer.wake.set()

    def _attach(self) -> None:
        """Start reporting: find the Trainer that is logging to us, start the writer thread."""
        if self._trainer_ref is None:
            trainer = _trainer_from_stack()
            if trainer is not None:
                self._trainer_ref = weakref.ref(trainer)
        if self._writer.closed:
            _ = self.store  # resolve the URL here, so a missing one is raised into fit, not the writer thread
            self._phase = Phase.STARTING if self._phase.is_terminal() else self._phase
            if self._finalizer is None:
                # garbage collected or still here at exit without finalize: stop the thread, last flush
                self._finalizer = weakref.finalize(self, self._writer.stop)
            self._writer.start()

    def _trainer(self) -> pl.Trainer | None:
        return self._trainer_ref() if self._trainer_ref is not None else None

    def _status(self, metrics: dict[str, float]) -> RunStatus:
        trainer = self._trainer()
        epoch = step = total = None
        phase = self._phase
        if trainer is not None:
            epoch, step = trainer.current_epoch, trainer.global_step
            total = _total_steps(trainer)
            if not phase.is_terminal():
                phase = (
                    Phase.VALIDATING
                    if trainer.validating or trainer.sanity_checking
                    else (Phase.TESTING if trainer.testing else Phase.TRAINING if trainer.training else phase)
                )
        rate = self._steps_per_s(step)
        eta = (total - step) / rate if rate and total is not None and step is not None and total >= step else None
        return RunStatus(
            phase=phase,
            updated_at=utc_now(),
            started_at=_iso(self._started),
            refresh_interval_s=self.status_interval,
            epoch=epoch,
            global_step=step,
            max_steps=total,
            steps_per_s=round(rate, 4) if rate else None,
            eta_s=round(eta, 1) if eta is not None else None,
            last_checkpoint=_last_checkpoint(trainer),
            metrics=metrics,
            host=socket.gethostname(),
            pid=os.getpid(),
            session=self.session,
            gpu=_gpu_info(trainer),
            error=self._error,
        )

    def _steps_per_s(self, step: int | None) -> float | None:
        if step is None:
            return None
        now = time.monotonic()
        if not self._rate or self._rate[-1][1] != step:
            self._rate.append((now, step))
        while len(self._rate) > 2 and now - self._rate[0][0] > 60:
            self._rate.popleft()
        (t0, s0), (t1, s1) = self._rate[0], self._rate[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None


#: Attributes of a reporter that belong to its process and are never pickled.
_PROCESS_STATE = frozenset({"_writer", "_trainer_ref", "_rate", "_finalizer"})


def _iso(when: datetime) -> str:
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


class _Writer:
    """A reporter's I/O: the buffer, the writer thread, the segments written and the status.

    It holds its reporter only weakly (the status is built through a weak method), so a reporter
    nobody refers to any more is collected, and its finalizer stops this writer's thread after a
    last flush. Flushes are serialised by ``io_lock`` (the thread, ``save()`` and ``stop()`` in
    the caller may all flush).
    """

    def __init__(self, reporter: MetricsReporter, started: datetime, latest: dict[str, float]) -> None:
        self.session = reporter.session
        # microseconds: a run restarted within the same second still lists after the one before it
        self.prefix = f"{started:%Y%m%dT%H%M%S%f}-{reporter.session}"
        self.started_at = _iso(reporter._started)
        self.flush_interval = reporter.flush_interval
        self.flush_every = reporter.flush_every
        self.status_interval = reporter.status_interval
        self.status_source = weakref.WeakMethod(reporter._status)
        self.store: RunStore | None = None
        # Logged but not yet written: ("m", unix time, step, values) or ("h", unix time, params).
        # Encoding happens on the writer thread; the training thread only appends.
        self.buffer: list[tuple[Any, ...]] = []
        self.lock = threading.Lock()  # guards buffer and closed
        self.io_lock = threading.RLock()  # one flush or status write at a time
        self.wake = threading.Event()
        self.status_due = threading.Event()
        # A segment whose write failed: (name, bytes, latest values), retried as it is before
        # anything newer, so a write that landed but whose reply was lost is found there (same
        # name, same bytes: success) rather than retried under a name it already holds.
        self.unwritten: tuple[str, bytes, dict[str, float]] | None = None
        self.segments_written = 0
        self.latest = dict(latest)  # latest value of each metric already written
        self.last_status: RunStatus | None = None
        self.write_errors = 0
        self.thread: _WriterThread | None = None
        self.started = False  # a thread was started once: there is a status to keep final
        self.closed = True  # no thread will flush what is appended now (none yet, or its last flush is done)

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        with self.lock:
            self.closed = False
        self.started = True
        self.thread = _WriterThread(self)
        self.thread.start()

    def stop(self, final_status: bool = False) -> None:
        """Last flush and a final status, then no thread. Idempotent, from any thread.

        Args:
            final_status: write the final status even when the thread already ended (after
                ``finalize``: the phase changed); otherwise only buffered records are written.
        """
        thread = self.thread
        if thread is not None and thread.is_alive():
            thread.stop()  # its last flush and final status, on the thread
            if thread is threading.current_thread():
                return  # the reporter was collected on its own thread, which now ends
            if thread.is_alive():
                log.error("trainctl: the metrics writer for %s did not finish its last write in time", self._url())
                return
        elif self.started and (final_status or (self.buffer and self.unwritten is None)):
            # Its thread is gone (stopped by someone else): the last write here. After a last
            # write that failed, a finalizer (any thread, or exit) does not try the store again.
            with self.io_lock:
                self.flush(final=True)
                self.write_status(final=True)
        self.thread = None

    def run(self, stopping: threading.Event) -> None:
        next_flush = time.monotonic() + self.flush_interval
        next_status = time.monotonic()
        while True:
            stop = stopping.is_set()
            now = time.monotonic()
            if stop or now >= next_flush or len(self.buffer) >= self.flush_every:
                self.flush(final=stop)
                next_flush = now + self.flush_interval
            if stop or now >= next_status or self.status_due.is_set():
                self.status_due.clear()
                self.write_status(final=stop)
                next_status = now + self.status_interval
            if stop:
                with self.lock:
                    # done, unless records arrived during a last write that worked (then once more);
                    # when the store fails, what is left stays unwritten (each failure was logged)
                    if not self.buffer or self.unwritten is not None:
                        self.closed = True
                        return
                continue
            self.wake.wait(max(0.05, min(next_flush, next_status) - time.monotonic()))
            self.wake.clear()

    def request_status(self) -> None:
        if not self.closed:
            self.status_due.set()
            self.wake.set()

    # ------------------------------------------------------------------ I/O
    def _url(self) -> str:
        return self.store.url if self.store is not None else "?"

    def segment_name(self) -> str:
        return f"{self.prefix}-{self.segments_written:06d}.jsonl"

    def flush(self, final: bool = False) -> None:
        """Write the segment that failed before (unchanged), then what is buffered, as new segments.

        Args:
            final: if a write fails, try it once more now (a write that landed with its reply
                lost is found then), rather than at the next flush.
        """
        with self.io_lock:
            self._flush()
            if final and self.unwritten is not None:
                self._flush()

    def _flush(self) -> None:
        assert self.store is not None, "the store is resolved before the writer starts"
        for _ in range(100):  # bounded: a prefix full of foreign objects must not spin this thread
            if self.unwritten is None:
                with self.lock:
                    entries, self.buffer = self.buffer, []
                if not entries:
                    return
                data, latest = _encode_batch(entries)
                self.unwritten = (self.segment_name(), data, latest)
            name, data, latest = self.unwritten
            try:
                self.store.write_metrics_segment(name, data)
            except ConflictError:
                # another object holds that name (not our bytes): ours go under the next one
                self.write_errors += 1
                self.segments_written += 1
                self.unwritten = (self.segment_name(), data, latest)
                log.warning("trainctl: metrics segment %s in %s is taken; writing it as the next one", name, self._url())
                continue
            except Exception as exc:
                self.write_errors += 1
                log.error("trainctl: could not write metrics to %s (%s); will retry", self._url(), exc)
                return
            self.unwritten = None
            self.segments_written += 1
            self.latest.update(latest)
        log.error("trainctl: could not find a free metrics segment name in %s; will retry", self._url())

    def write_status(self, final: bool = False) -> None:
        """Rewrite ``status.json``; a final one from a reporter that was not finalized says interrupted."""
        assert self.store is not None, "the store is resolved before the writer starts"
        with self.lock:
            pending = list(self.buffer)
        unwritten = self.unwritten
        metrics = {**self.latest, **(unwritten[2] if unwritten else {}), **_latest_values(pending)}
        with self.io_lock:
            source = self.status_source()
            if source is not None:
                status = source(metrics)
                del source  # if this was the last reference, the reporter is collected here
            elif self.last_status is not None:
                status = replace(self.last_status, updated_at=utc_now(), metrics=metrics)
            else:
                status = RunStatus(
                    phase=Phase.INTERRUPTED,
                    updated_at=utc_now(),
                    started_at=self.started_at,
                    refresh_interval_s=self.status_interval,
                    metrics=metrics,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    session=self.session,
                )
            if final and not status.phase.is_terminal():
                status = replace(status, phase=Phase.INTERRUPTED)
            self.last_status = status
            try:
                self.store.write_status(status.to_json())
            except Exception as exc:
                self.write_errors += 1
                log.error("trainctl: could not write status to %s: %s", self._url(), exc)


class _WriterThread(threading.Thread):
    """The background writer of one reporter. ``stop()`` makes its last flush and joins it (Lightning's
    test suite calls ``stop()`` on daemon threads a test left behind)."""

    def __init__(self, writer: _Writer) -> None:
        super().__init__(name=f"trainctl-metrics-{writer.session}", daemon=True)
        self.writer = writer
        self.stopping = threading.Event()

    @override
    def run(self) -> None:
        self.writer.run(self.stopping)

    def stop(self, timeout: float = 60.0) -> None:
        self.stopping.set()
        self.writer.wake.set()
        if self is not threading.current_thread():
            self.join(timeout)


_LIGHTNING_MODULES = ("lightning.", "pytorch_lightning.")


def _trainer_from_stack(max_depth: int = 8) -> pl.Trainer | None:
    """The Trainer whose logger connector is calling us.

    Lightning gives loggers no Trainer reference, but every ``log_metrics`` /
    ``log_hyperparams`` call comes from Lightning code holding one (``self.trainer`` in the
    logger connector, ``trainer`` in ``_log_hyperparams``). This is the only place we look at
    Lightning's call stack; ``tests/test_lifecycle.py`` fails loudly if it stops working.

    Only Lightning's own frames are read: reading a frame's ``f_locals`` (Python < 3.13) leaves a
    snapshot of its variables on it, which would keep the caller's objects (the reporter itself)
    alive for as long as a long-lived user function runs.
    """
    frame: FrameType | None = sys._getframe(2)
    for _ in range(max_depth):
        if frame is None:
            return None
        if not str(frame.f_globals.get("__name__", "")).startswith(_LIGHTNING_MODULES):
            frame = frame.f_back
            continue
        for name in ("trainer", "self"):
            candidate = frame.f_locals.get(name)
            if isinstance(candidate, pl.Trainer):
                return candidate
            inner = getattr(candidate, "trainer", None) if name == "self" else None
            if isinstance(inner, pl.Trainer):
                return inner
        frame = frame.f_back
    return None


def _total_steps(trainer: pl.Trainer) -> int | None:
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    batches = trainer.num_training_batches
    if trainer.max_epochs and trainer.max_epochs > 0 and isinstance(batches, (int, float)) and math.isfinite(batches):
        per_epoch = math.ceil(batches / max(1, trainer.accumulate_grad_batches))
        return int(trainer.max_epochs * per_epoch)
    return None


def _last_checkpoint(trainer: pl.Trainer | None) -> dict[str, Any] | None:
    if trainer is None:
        return None
    from trainctl_lightning.checkpoint.sync import CheckpointSync

    for cb in trainer.callbacks:  # type: ignore[attr-defined]  # a property Lightning adds
        if isinstance(cb, CheckpointSync) and cb.last_published is not None:
            m = cb.last_published
            return {"name": m.name, "id": m.id, "global_step": m.global_step, "url": cb.url}
    ckpt = trainer.checkpoint_callback
    path = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")
    return {"name": os.path.basename(path), "local_path": path} if path else None


def _gpu_info(trainer: pl.Trainer | None) -> GpuInfo | None:
    if trainer is None:
        return None
    device = trainer.strategy.root_device
    if device.type != "cuda":
        return None
    import torch

    try:
        free, total = torch.cuda.mem_get_info(device)
        util: float | None
        try:
            util = float(torch.cuda.utilization(device))
        except Exception:  # NVML (pynvml) missing: utilisation unknown, everything else still reported
            util = None
        return GpuInfo(
            name=torch.cuda.get_device_name(device),
            memory_used_mb=round((total - free) / 2**20, 1),
            memory_total_mb=round(total / 2**20, 1),
            utilization_pct=util,
        )
    except Exception as exc:
        log.debug("trainctl: GPU status unavailable: %s", exc)
        return None


_ENCODE = json.JSONEncoder(allow_nan=True).encode
# Entries encoded between two yields of the GIL: the writer shares the interpreter with the
# training loop, which otherwise waits a whole switch interval (5 ms) for every torch op.
_ENCODE_CHUNK = 200


def _encode_batch(entries: list[tuple[Any, ...]]) -> tuple[bytes, dict[str, float]]:
    """Buffered entries as one metrics segment (JSON Lines, format in docs/run-store.md), and the
    latest value of each metric in it. One pass; timestamps formatted once per second."""
    lines: list[str] = []
    latest: dict[str, float] = {}
    last_second, prefix = None, ""
    for i, entry in enumerate(entries):
        if i and i % _ENCODE_CHUNK == 0:
            time.sleep(0)
        second, micros = divmod(round(entry[1] * 1e6), 1_000_000)
        if second != last_second:
            last_second = second
            prefix = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        when = f"{prefix}.{micros:06d}Z"
        if entry[0] == "h":
            lines.append(json.dumps({"t": when, "hparams": entry[2]}, sort_keys=True))
            continue
        values = {}
        for key, value in entry[3].items():
            if type(value) is float:
                values[key] = value
            elif _is_number(value):
                values[key] = float(value)
        lines.append(_ENCODE({"t": when, "step": int(entry[2] or 0), "metrics": values}))
        latest.update(values)
    return ("\n".join(lines) + "\n").encode(), latest


def _latest_values(entries: list[tuple[Any, ...]]) -> dict[str, float]:
    latest: dict[str, float] = {}
    for entry in entries:
        if entry[0] == "m":
            latest.update({k: float(v) for k, v in entry[3].items() if _is_number(v)})
    return latest


def _jsonable(value: Any) -> Any:
    """Hyperparameters as JSON: containers kept, numbers and strings as they are, the rest repr'd."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return repr(value)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, str)
