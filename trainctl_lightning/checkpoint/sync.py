"""``CheckpointSync``: publish every checkpoint Lightning saves to object storage, in the background."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from typing_extensions import override

from trainctl_lightning.checkpoint import sharded
from trainctl_lightning.checkpoint.io import SnapshotCheckpointIO
from trainctl_lightning.checkpoint.publisher import FlushResult, Publisher, PublishJob, PublishState
from trainctl_lightning.checkpoint.resume import resume_checkpoint, run_cache_dir
from trainctl_lightning.errors import (
    ConfigError,
    IntegrityError,
    StoreError,
    TrainctlError,
    UploadError,
)
from trainctl_lightning.jobs.spec import SAVE_NOW_SIGNAL
from trainctl_lightning.remote import _lightning
from trainctl_lightning.retry import RetryPolicy
from trainctl_lightning.store import RunStore, layout, validate_url
from trainctl_lightning.store.credentials import pickled_options
from trainctl_lightning.store.layout import ATTEMPT_ENV, RECOVER_ENV, RUN_URL_ENV
from trainctl_lightning.store.manifest import CheckpointManifest
from trainctl_lightning.timeutil import utc_now

__all__ = ["CheckpointSync"]

log = logging.getLogger(__name__)


class _MetricsGate:
    """Holds each checkpoint's manifest until the metrics of the steps it covers are in the store.

    Lightning logs a step's metrics after the checkpoint of that step is saved, and the
    background publish can finish first: an instance lost right then would leave a run whose
    newest checkpoint is ahead of its stored metrics, a gap in the steps that the resumed run
    never fills. So the publisher waits here, before each manifest, until the training thread
    has stored the buffered metrics (at the next batch, or when a flush begins), for at most
    ``timeout_s`` (publishing matters more than the metrics: past it, the checkpoint goes and
    the wait is logged).
    """

    def __init__(self, reporters: list[Any], timeout_s: float = 60.0) -> None:
        self.reporters = reporters
        self.timeout_s = timeout_s
        self._released = 0
        self._open = False
        self._cond = threading.Condition()

    def wait(self, job: PublishJob | sharded.ShardedJob) -> None:
        with self._cond:
            ready = self._cond.wait_for(lambda: self._open or self._released >= job.seq, timeout=self.timeout_s)
        if not ready:
            log.warning(
                "trainctl: publishing %s without waiting longer for the metrics of its steps (%.0fs)", job.name, self.timeout_s
            )

    def pending(self, saves: int) -> bool:
        with self._cond:
            return not self._open and self._released < saves

    def release(self, saves: int, *, open_: bool = False) -> None:
        """Store the buffered metrics, then let the first ``saves`` checkpoints (all, and every later
        one, with ``open_``) be published. Called on the training thread."""
        for reporter in self.reporters:
            try:
                reporter.flush_now()
            except Exception as exc:  # the reporter logs and retries its own writes; publish anyway
                log.warning("trainctl: metrics could not be stored before publishing: %s", exc)
        with self._cond:
            self._released = max(self._released, saves)
            self._open = self._open or open_
            self._cond.notify_all()


class CheckpointSync(Callback):
    r"""Upload every checkpoint Lightning saves to a run store, without stalling training.

    Use it beside ``ModelCheckpoint`` writing to fast local disk. Each save is copied to host
    memory on the training thread, written to disk and uploaded in the background, and published
    atomically (data first, manifest last), so the store only ever shows complete checkpoints.
    Remote copies of checkpoints that ``ModelCheckpoint`` rotates away are deleted once their
    replacement is published. A restarted run writing to the same URL keeps adding to it.

    With a strategy that saves checkpoints as folders (FSDP ``state_dict_type="sharded"``,
    ``ModelParallelStrategy``), every rank publishes its own shards and rank zero the manifest;
    every option below means the same for them (``docs/sharded-checkpoints.md``).

    **Checkpoint now.** :meth:`request_checkpoint`, or ``SIGUSR1`` sent to the training process
    (what the trainctl agent does on a spot interruption notice), makes the next
    ``on_train_batch_end`` save ``<ModelCheckpoint dirpath>/<name>-step=<N>.ckpt`` and wait,
    at most ``request_timeout`` seconds, until it is published. The ``SIGUSR1`` handler is
    installed while ``fit`` runs, from the main thread of global rank zero, and calls any handler
    that was there before; it is left out on SLURM with auto-requeue (Lightning's requeue signal).
    In a multi-process fit the ranks agree at every batch end, with a one-int all-reduce on CPU
    (gloo), so a request that reached rank zero alone is saved by all of them together.

    **Automatic resume.** In a managed run (``trainctl launch --recover``: the agent sets
    ``$TRAINCTL_RECOVER=1``), or with ``resume=True``, ``trainer.fit(model)`` without
    ``ckpt_path`` starts from the run's newest complete checkpoint (a ``preempt-step=N.ckpt`` taken
    after a spot notice, when that is the newest), downloaded and verified as by
    :func:`~trainctl_lightning.resume_path` (a damaged newest one is skipped with a logged error
    for the next older one), and restored like ``fit(ckpt_path=...)``: weights, optimizer, loops
    and callbacks. A ``ckpt_path`` the user passes wins; with no checkpoint yet fit starts fresh.
    validate/test/predict never resume. In a multi-process fit rank zero chooses the checkpoint
    and broadcasts it; a rank that cannot see rank zero's file (another machine) downloads the same
    checkpoint into its own cache folder. :attr:`resumed_from` names the checkpoint used.

    Args:
        url: fsspec URL of the run, e.g. ``"s3://bucket/runs/exp1"`` or ``"file:///data/exp1"``.
            Defaults to ``$TRAINCTL_RUN_URL`` (set when launched by trainctl).
        storage_options: fsspec options (credentials, ``endpoint_url``); never logged. Never
            pickled either: when the callback travels to an instance (``RemoteStrategy``), the
            credential-like entries are dropped (:mod:`trainctl_lightning.store.credentials`) and
            the instance uses its own credentials, from its environment or role.
        keep_last: keep at most this many newest checkpoints in the store (default: all that
            ``ModelCheckpoint`` keeps).
        mirror_deletes: delete the remote copy when ``ModelCheckpoint`` removes or saves over a
            local checkpoint (after its replacement is published).
        keep_local: keep local checkpoint files after they are published. With ``False`` each
            file is deleted once it is safely in the store.
        upload_workers: checkpoints uploaded at once.
        max_concurrency: multipart parts uploaded at once per file (S3).
        part_size_mb: multipart part size.
        max_pending_snapshots: host-memory snapshots in flight. Memory cost is at most this
            many times the checkpoint size; a save that finds none free waits until the oldest
            is on local disk (never dropped).
        retry_timeout: seconds to keep retrying a transient store error for one checkpoint.
        flush_timeout: seconds to wait at the end of fit for uploads still in flight; what has
            not made it by then is named in the error.
        upload_process: upload checkpoints to S3 from a separate uploader process, so that the
            upload's Python work does not compete with training for the GIL (started with the
            first save, ended when the fit ends, and with this process if it dies). Default
            (None): on for S3 stores on Linux and macOS; other stores upload on threads.
        check_store: write a probe object at setup to fail fast on a bad URL or credentials.
        request_timeout: seconds a requested checkpoint may hold training up while it is
            published (a spot notice leaves about 120).
        resume: where ``fit`` without ``ckpt_path`` starts: ``None`` (default) resumes from the
            run's newest checkpoint only in a managed run (``$TRAINCTL_RECOVER`` is ``1``),
            ``True`` always does when there is one, ``False`` never does.
        zip_crc32: write the zip CRC-32 of each record into checkpoint files (``torch.save``'s
            default). Off by default: it costs about 1 CPU-second per GB of every save, no
            ``torch.load`` since torch 2.6 checks it, and the manifest's SHA-256, checked on every
            download, covers the whole file. Turn it on if the files are read by torch older than
            2.6 or checked with zip tools. Torch before 2.6 always writes it.

    Raises:
        ConfigError: an argument is invalid (raised here, before training).
        StoreError: at ``setup``, the store cannot be written (missing bucket, no credentials...).
        UploadError: at the end of ``fit``, some checkpoints were not published; names them.

    Example::

        trainer = Trainer(
            callbacks=[ModelCheckpoint(dirpath="ckpts", save_last=True), CheckpointSync("s3://bucket/runs/exp1")],
        )
        trainer.fit(model, ckpt_path=resume_path("s3://bucket/runs/exp1"))
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        keep_last: int | None = None,
        mirror_deletes: bool = True,
        keep_local: bool = True,
        upload_workers: int = 2,
        max_concurrency: int = 8,
        part_size_mb: int = 16,
        max_pending_snapshots: int = 1,
        retry_timeout: float = 1800.0,
        flush_timeout: float | None = 900.0,
        check_store: bool = True,
        request_timeout: float = 90.0,
        resume: bool | None = None,
        upload_process: bool | None = None,
        zip_crc32: bool = False,
    ) -> None:
        url = url if url is not None else os.environ.get(RUN_URL_ENV)
        if url is not None:
            validate_url(url)
        # else: resolved from $TRAINCTL_RUN_URL at setup, where the run executes (RemoteStrategy
        # builds the callback on the launching machine and ships it to the instance)
        for label, value, low in (
            ("keep_last", keep_last, 1),
            ("upload_workers", upload_workers, 1),
            ("max_concurrency", max_concurrency, 1),
            ("part_size_mb", part_size_mb, 5),
            ("max_pending_snapshots", max_pending_snapshots, 1),
        ):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ConfigError(f"CheckpointSync({label}={value!r}): must be an integer >= {low}")
        if not (retry_timeout >= 0 and math.isfinite(retry_timeout)):
            raise ConfigError(f"CheckpointSync(retry_timeout={retry_timeout!r}): must be a number of seconds >= 0")
        if flush_timeout is not None and not flush_timeout >= 0:
            raise ConfigError(f"CheckpointSync(flush_timeout={flush_timeout!r}): must be seconds >= 0 or None")
        if not (request_timeout >= 0 and math.isfinite(request_timeout)):
            raise ConfigError(f"CheckpointSync(request_timeout={request_timeout!r}): must be a number of seconds >= 0")
        if resume is not None and not isinstance(resume, bool):
            raise ConfigError(
                f"CheckpointSync(resume={resume!r}): must be True, False or None "
                f"(None: resume only in a managed run, where ${RECOVER_ENV}=1)"
            )
        if upload_process is not None and not isinstance(upload_process, bool):
            raise ConfigError(f"CheckpointSync(upload_process={upload_process!r}): must be True, False or None (None: on for S3)")
        if not isinstance(zip_crc32, bool):
            raise ConfigError(f"CheckpointSync(zip_crc32={zip_crc32!r}): must be True or False")
        self.url: str | None = url
        self.resume = resume
        self.upload_process = upload_process
        self.zip_crc32 = zip_crc32
        self.storage_options = dict(storage_options or {})
        self.keep_last = keep_last
        self.mirror_deletes = mirror_deletes
        self.keep_local = keep_local
        self.upload_workers = upload_workers
        self.max_concurrency = max_concurrency
        self.part_size_mb = part_size_mb
        self.max_pending_snapshots = max_pending_snapshots
        self.retry_timeout = retry_timeout
        self.flush_timeout = flush_timeout
        self.check_store = check_store
        self.request_timeout = request_timeout
        self.session = uuid.uuid4().hex[:8]
        self.store: RunStore | None = None
        self._io: SnapshotCheckpointIO | None = None
        self._gate: _MetricsGate | None = None  # with a MetricsReporter: manifests wait for the metrics
        self._trainer: pl.Trainer | None = None
        self._end_error: UploadError | None = None
        self._existing: list[CheckpointManifest] = []
        self._last_published: CheckpointManifest | None = None
        # (file name prefix, monotonic time) of a pending "checkpoint now"; set from a signal handler
        self._save_request: tuple[str, float] | None = None
        self._signal_handler: Callable[[int, FrameType | None], None] | None = None
        self._previous_handler: Callable[[int, FrameType | None], Any] | int | None = None
        self._vote_group: Any = None  # gloo group of a multi-process fit, for the per-batch request vote
        self._resumed_from: CheckpointManifest | None = None
        self._sharded: sharded.ShardedWriter | None = None  # this rank's, while a fit of a folder-saving strategy runs
        self._sharded_uninstall: Callable[[], None] | None = None
        self._sharded_result: FlushResult | None = None

    def __repr__(self) -> str:
        return f"CheckpointSync({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Pickled when RemoteStrategy ships the callback: credentials stay on this machine (they go
        # only to a child process being spawned here, through its pipe: ddp_spawn; see pickled_options).
        state = self.__dict__.copy()
        state["storage_options"] = pickled_options(self.storage_options, repr(self))
        state["_gate"] = None  # a lock: belongs to this process's fit
        state["_sharded"] = state["_sharded_uninstall"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def state_key(self) -> str:
        return f"CheckpointSync{{url={self.url!r}}}"

    @property
    def last_published(self) -> CheckpointManifest | None:
        """Manifest of the newest checkpoint this callback published (None before the first)."""
        return self._last_published

    @property
    def last_flush(self) -> FlushResult | None:
        """Outcome of the latest end-of-fit flush (published / failed / unfinished names)."""
        if self._sharded_result is not None:
            return self._sharded_result
        return self._io.last_flush if self._io is not None else None

    @property
    def resumed_from(self) -> str | None:
        """Id of the checkpoint the latest ``fit`` resumed from automatically (None: it did not)."""
        return self._resumed_from.id if self._resumed_from is not None else None

    @property
    def resumed_from_manifest(self) -> CheckpointManifest | None:
        """Manifest of that checkpoint (name, global step, ...); None when it did not resume."""
        return self._resumed_from

    def resumes(self) -> bool:
        """Whether ``fit`` without ``ckpt_path`` resumes here: ``resume``, else ``$TRAINCTL_RECOVER == "1"``."""
        return self.resume if self.resume is not None else os.environ.get(RECOVER_ENV) == "1"

    def request_checkpoint(self, name: str = "requested") -> None:
        """Save a checkpoint at the end of the current training batch and publish it at once.

        Safe from any thread and from a signal handler: it only sets a flag. The checkpoint is
        ``<name>-step=<N>.ckpt`` in the ``ModelCheckpoint`` folder (else
        ``<default_root_dir>/checkpoints``); training waits until it is published, at most
        ``request_timeout`` seconds, and the outcome is logged with its id.

        Example::

            sync = CheckpointSync("s3://bucket/runs/exp1")
            ...
            sync.request_checkpoint()   # e.g. from a thread that watches for a maintenance event
        """
        if not name or "/" in name or os.sep in name:
            raise ConfigError(f"request_checkpoint(name={name!r}): must be a non-empty file name prefix")
        self._save_request = (name, time.monotonic())

    # ----------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return  # validate/test/predict save nothing
        if self.url is None:
            self.url = os.environ.get(RUN_URL_ENV) or None
            if self.url is None:
                raise ConfigError(
                    f"CheckpointSync() needs a store URL, e.g. CheckpointSync('s3://bucket/runs/exp1'), "
                    f"or ${RUN_URL_ENV} set (trainctl launch and RemoteStrategy set it)"
                )
            validate_url(self.url)
        self._trainer = trainer
        error: tuple[str, str] | None = None
        if trainer.is_global_zero:
            try:
                self.store = RunStore(
                    self.url,
                    self.storage_options,
                    retry=RetryPolicy(deadline_s=self.retry_timeout),
                    max_concurrency=self.max_concurrency,
                    part_size=self.part_size_mb * 2**20,
                )
                if self.check_store:
                    self.store.check_writable()
                self._existing = self.store.list_checkpoints()
                if self._existing:
                    log.info(
                        "trainctl: %s already holds %d checkpoint(s), newest %s at step %s; new ones are added beside them",
                        self.store.url,
                        len(self._existing),
                        self._existing[-1].name,
                        self._existing[-1].global_step,
                    )
            except TrainctlError as exc:
                error = (type(exc).__name__, str(exc))
        # Every rank raises together, so DDP never hangs on one rank's bad URL.
        error = trainer.strategy.broadcast(error, src=0)
        if error:
            kind, message = error
            raise (ConfigError if kind == "ConfigError" else StoreError)(message)
        self._vote_group = _cpu_group(trainer)  # every rank creates it
        self._start_sharded(trainer)  # a strategy that saves folders: every rank publishes its shards
        self._resumed_from = None
        if self.resumes():
            # Lightning resolved ckpt_path before any setup hook: choose when it restores (every rank)
            _lightning.choose_fit_checkpoint(trainer, lambda given: self._resume_checkpoint(trainer, given))
        if not trainer.is_global_zero:
            return
        self._end_error = None
        self._install_signal_handler(trainer)
        if self._sharded is not None:
            return  # the strategy's saves go to the sharded writer, not through its CheckpointIO
        strategy = trainer.strategy
        current = strategy.checkpoint_io
        if isinstance(current, SnapshotCheckpointIO):  # left by a fit that never tore down
            current = current.inner
        io = SnapshotCheckpointIO(
            current,
            self._make_publisher,
            session=self.session,
            max_pending_snapshots=self.max_pending_snapshots,
            flush_timeout=self.flush_timeout,
            metadata=self._metadata,
            zip_crc32=self.zip_crc32,
        )

        def restore() -> None:
            # After the fit the strategy has exactly the CheckpointIO the user configured.
            if strategy.checkpoint_io is io:
                strategy.checkpoint_io = current

        io.on_teardown = restore
        reporters = [lg for lg in trainer.loggers if callable(getattr(lg, "flush_now", None))]  # MetricsReporter
        self._gate = _MetricsGate(reporters) if reporters else None
        gate = self._gate
        if gate is not None:
            io.before_flush = lambda: gate.release(io.saves_queued, open_=True)
        self._io = io
        io.start_fit()
        strategy.checkpoint_io = io

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # The step before this one logged its metrics: store them, then let its checkpoints go.
        gate, saves = self._gate, self._saves_queued()
        if gate is not None and gate.pending(saves):
            gate.release(saves)

    def _saves_queued(self) -> int:
        if self._sharded is not None:
            return self._sharded.saves_queued
        return self._io.saves_queued if self._io is not None else 0

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # ModelCheckpoint resolves its dirpath in its own setup, which runs after ours.
        checkpointers = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        if not checkpointers:
            log.warning(
                "trainctl: CheckpointSync(%r) has nothing to upload: the Trainer has no ModelCheckpoint "
                "(enable_checkpointing=False?)",
                self.url,
            )
        for cb in checkpointers:
            if cb.dirpath and "://" in str(cb.dirpath) and not str(cb.dirpath).startswith("file://"):
                raise ConfigError(
                    f"ModelCheckpoint(dirpath={cb.dirpath!r}) writes remotely and stalls training; give it a "
                    f"local dirpath and let CheckpointSync({self.url!r}) upload in the background"
                )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        request = self._save_request
        if trainer.world_size > 1:
            # every rank takes part in a save; the request usually reached rank zero alone
            if not self._anyone_requested(trainer, request is not None):
                return
            request = trainer.strategy.broadcast(request, src=0) or ("requested", time.monotonic())
        elif request is None:
            return
        self._save_request = None
        self._save_now(trainer, *request)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            _lightning.clear_fit_checkpoint_choice(trainer)
            self._restore_signal_handler()
            self._release_vote_group()
            if self._sharded is not None:
                if self._gate is not None:  # the fit is over: its metrics are stored now, the rest may go
                    self._gate.release(self._sharded.saves_queued, open_=True)
                outcome = self._stop_sharded()
                if not outcome.ok:  # every rank: each learnt the outcome of every save
                    self._end_error = UploadError(
                        f"CheckpointSync({self.url!r}): not every sharded checkpoint was published: {outcome.describe()}",
                        failed=outcome.failed + outcome.unfinished,
                    )
                    raise self._end_error
                return
        if self._io is None or stage != "fit":
            return
        # The strategy's teardown already flushed (it calls checkpoint_io.teardown); a fit that
        # ends normally but left checkpoints behind must not look like a success.
        result = self._io.last_flush
        if result is not None and not result.ok:
            self._end_error = UploadError(
                f"CheckpointSync({self.url!r}): not every checkpoint was published: {result.describe()}",
                failed=result.failed + result.unfinished,
            )
            raise self._end_error

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_signal_handler()  # Lightning runs no teardown hooks after an exception
        _lightning.clear_fit_checkpoint_choice(trainer)  # a fit that failed before restoring
        self._release_vote_group()
        if self._sharded is not None:
            if self._gate is not None:
                self._gate.release(self._sharded.saves_queued, open_=True)
            self._stop_sharded()  # outcome logged; the fit's own exception is what is raised
        if self._io is not None and exception is self._end_error:
            # Our own end-of-fit error makes Lightning run every on_exception hook, and
            # OnExceptionCheckpoint saves once more. Publish that save, but let a failure be
            # logged rather than replace the error that names what the run lost.
            self._io.raise_outside_fit = False

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"url": self.url, "session": self.session}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        previous = state_dict.get("url")
        if previous and previous != self.url:
            log.info("trainctl: resuming a checkpoint that was synced to %s; now syncing to %s", previous, self.url)

    # ------------------------------------------------------- automatic resume
    def _resume_checkpoint(self, trainer: pl.Trainer, given: Any) -> Any:
        """The path ``fit`` restores from: ``given`` when the user passed one, else the run's newest
        checkpoint (rank zero chooses, every rank gets the same one), else None."""
        why = f"resume={self.resume}" if self.resume is not None else f"${RECOVER_ENV}=1"
        attempt = os.environ.get(ATTEMPT_ENV)
        if attempt:
            why += f", attempt {attempt}"
        if given:
            if trainer.is_global_zero:
                log.info("trainctl: fit(ckpt_path=%r) given: not resuming automatically from %s (%s)", str(given), self.url, why)
            return given
        found: tuple[CheckpointManifest, str] | None = None
        error: tuple[str, str] | None = None
        if trainer.is_global_zero:
            try:
                found = resume_checkpoint(self.url, storage_options=self.storage_options)
            except TrainctlError as exc:
                error = (type(exc).__name__, str(exc))
        found, error = trainer.strategy.broadcast((found, error), src=0)
        if error:
            kind, message = error
            raise {"IntegrityError": IntegrityError, "ConfigError": ConfigError}.get(kind, StoreError)(
                f"CheckpointSync({self.url!r}) cannot resume ({why}): {message}"
            )
        if found is None:
            if trainer.is_global_zero:
                log.info("trainctl: no checkpoint in %s yet: fit starts from scratch (%s)", self.url, why)
            return None
        manifest, path = found
        if manifest.sharded is not None:  # every rank fetches the shards it reads (rank zero has its own)
            path = self._fetch_sharded(trainer, manifest)
        elif not os.path.exists(path):  # rank zero's cache is on another machine: fetch the same checkpoint
            assert self.url is not None
            store = RunStore(self.url, self.storage_options)
            folder = run_cache_dir(store.url) / f"rank{trainer.global_rank}" / manifest.id
            path = str(store.download_checkpoint(store.get_checkpoint(manifest.id), folder))
        self._resumed_from = manifest
        if trainer.is_global_zero:
            log.info(
                "trainctl: resuming from %s (step %s) of %s: checkpoint %s (%s)",
                manifest.name,
                manifest.global_step,
                self.url,
                manifest.id,
                why,
            )
        return path

    # ------------------------------------------------------- checkpoint now
    def _save_now(self, trainer: pl.Trainer, name: str, requested_at: float) -> None:
        step = trainer.global_step
        path = os.path.join(_checkpoint_dir(trainer), f"{name}-step={step}.ckpt")
        trainer.save_checkpoint(path)  # every rank calls it; rank zero writes through our CheckpointIO
        if self._sharded is not None:
            self._wait_sharded(trainer, path, step, requested_at)
            return
        if not trainer.is_global_zero or self._io is None:
            return
        if self._gate is not None:  # this thread waits for it now: nothing else would release it
            self._gate.release(self._io.saves_queued)
        job = self._io.wait_published(path, timeout=self.request_timeout)
        published = job is not None and job.state is PublishState.PUBLISHED
        self._report_requested(path, step, requested_at, job.manifest if published and job else None, job.error if job else None)

    def _report_requested(
        self, path: str, step: int, requested_at: float, manifest: CheckpointManifest | None, error: str | None
    ) -> None:
        """One log line on a requested checkpoint: where it was published and how long it took, or why not."""
        if manifest is not None:
            log.warning(
                "trainctl: %s (step %d) published as %s, %.1fs after it was requested",
                os.path.basename(path),
                step,
                self.store.url_of(layout.checkpoint_object(manifest.id)) if self.store else manifest.id,
                time.monotonic() - requested_at,
            )
        else:
            why = error or f"not published within {self.request_timeout:g}s"
            log.error("trainctl: requested checkpoint %s (step %d) is not in %s: %s", path, step, self.url, why)

    def _anyone_requested(self, trainer: pl.Trainer, mine: bool) -> bool:
        """Whether any rank has a pending request: a one-int all-reduce on CPU every batch, so
        that no rank's device has to synchronise for it."""
        if self._vote_group is None:
            return trainer.strategy.reduce_boolean_decision(mine, all=False)
        import torch
        import torch.distributed as dist

        vote = torch.tensor([int(mine)], dtype=torch.int32)
        dist.all_reduce(vote, group=self._vote_group)
        return bool(vote.item())

    def _release_vote_group(self) -> None:
        group, self._vote_group = self._vote_group, None
        if group is not None:
            import torch.distributed as dist

            try:
                dist.destroy_process_group(group)
            except (RuntimeError, ValueError) as exc:  # the default group is already gone
                log.debug("trainctl: could not destroy the request vote group: %s", exc)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.request_checkpoint("preempt")
        previous = self._previous_handler
        if callable(previous):
            previous(signum, frame)

    def _install_signal_handler(self, trainer: pl.Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.info(
                "trainctl: fit runs outside the main thread: SIGUSR1 does not request a checkpoint (request_checkpoint() does)"
            )
            return
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if getattr(environment, "auto_requeue", False) and getattr(environment, "requeue_signal", None) == SAVE_NOW_SIGNAL:
            log.info("trainctl: SIGUSR1 is SLURM's requeue signal here: it does not request a checkpoint")
            return
        current = signal.getsignal(SAVE_NOW_SIGNAL)
        if self._signal_handler is not None and current == self._signal_handler:
            return  # still ours from an earlier fit
        if current == signal.SIG_IGN:
            log.info("trainctl: SIGUSR1 is ignored in this process: it does not request a checkpoint")
            return
        self._previous_handler = current
        self._signal_handler = self._on_signal
        signal.signal(SAVE_NOW_SIGNAL, self._signal_handler)

    def _restore_signal_handler(self) -> None:
        if self._signal_handler is None or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(SAVE_NOW_SIGNAL) == self._signal_handler:  # not replaced since: put the old one back
            previous = self._previous_handler
            signal.signal(SAVE_NOW_SIGNAL, previous if previous is not None else signal.SIG_DFL)
        self._signal_handler = self._previous_handler = None

    # ------------------------------------------------------ sharded checkpoints
    def _start_sharded(self, trainer: pl.Trainer) -> None:
        """With a strategy that saves folders, every rank writes and publishes its own shards."""
        self._sharded_result = None
        self._gate = None
        key = sharded.folder_state_key(trainer.strategy)
        if key is None:
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.is_gloo_available()):
            raise ConfigError(
                f"CheckpointSync({self.url!r}): {type(trainer.strategy).__name__} saves checkpoints as folders, which "
                "CheckpointSync publishes from every rank over a gloo process group, but torch.distributed is not "
                "initialized with gloo available here; run the fit under torchrun or Lightning's launcher"
            )
        assert self.url is not None
        store = self.store or RunStore(
            self.url,
            self.storage_options,
            retry=RetryPolicy(deadline_s=self.retry_timeout),
            max_concurrency=self.max_concurrency,
            part_size=self.part_size_mb * 2**20,
        )
        group = sharded.new_group(self.flush_timeout if self.flush_timeout is not None else 1800.0)
        if trainer.is_global_zero:  # rank zero writes the manifests: they wait for the metrics, as single files do
            reporters = [lg for lg in trainer.loggers if callable(getattr(lg, "flush_now", None))]  # MetricsReporter
            self._gate = _MetricsGate(reporters) if reporters else None
        writer = sharded.ShardedWriter(
            store,
            group,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            state_key=key,
            session=self.session,
            max_pending=self.max_pending_snapshots,
            on_published=self._note_published,
            gate=None if self._gate is None else self._gate.wait,
            mirror_deletes=self.mirror_deletes,
            keep_last=self.keep_last,
            keep_local=self.keep_local,
        )
        self._sharded = writer
        self._sharded_uninstall = sharded.install(trainer.strategy, writer, self._metadata)

    def _stop_sharded(self) -> FlushResult:
        writer, self._sharded = self._sharded, None
        assert writer is not None
        if self._sharded_uninstall is not None:
            self._sharded_uninstall()
            self._sharded_uninstall = None
        result = writer.flush(self.flush_timeout)
        try:
            import torch.distributed as dist

            dist.destroy_process_group(writer.group)
        except (RuntimeError, ValueError) as exc:  # the default group is already gone
            log.debug("trainctl: could not destroy the sharded checkpoint group: %s", exc)
        if not result.ok:
            log.error("trainctl: not every sharded checkpoint was published: %s", result.describe())
        self._sharded_result = result
        return result

    def _wait_sharded(self, trainer: pl.Trainer, path: str, step: int, requested_at: float) -> None:
        """Checkpoint now, folder strategies: every rank waits until the save every rank just queued
        is published (each learns the outcome), at most ``request_timeout``; rank zero logs it."""
        writer = self._sharded
        assert writer is not None
        if self._gate is not None:  # this thread waits for it now: nothing else would release it
            self._gate.release(writer.saves_queued)
        job = writer.wait_published(path, timeout=self.request_timeout)
        if not trainer.is_global_zero:
            return
        published = job is not None and job.done.is_set() and job.error is None
        self._report_requested(path, step, requested_at, job.manifest if published and job else None, job.error if job else None)

    def _fetch_sharded(self, trainer: pl.Trainer, manifest: CheckpointManifest) -> str:
        """Every rank downloads (verified) what it needs of a sharded checkpoint; a failure on any
        rank is raised on every rank, in one line."""
        import torch.distributed as dist

        assert self.url is not None
        path: str | None = None
        error: str | None = None
        try:
            store = RunStore(self.url, self.storage_options)
            folder = run_cache_dir(store.url) / manifest.id
            path = str(sharded.fetch_for_rank(store, manifest, folder, trainer.global_rank, trainer.world_size))
        except TrainctlError as exc:
            error = f"rank {trainer.global_rank}: {exc}"
        errors: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(errors, error)
        failed = [e for e in errors if e]
        if failed:
            raise IntegrityError(f"CheckpointSync({self.url!r}) cannot resume from {manifest.id}: {'; '.join(failed)}")
        assert path is not None
        return path

    # --------------------------------------------------------------- helpers
    def _make_publisher(self) -> Publisher:
        assert self.store is not None
        return Publisher(
            self.store,
            workers=self.upload_workers,
            mirror_deletes=self.mirror_deletes,
            keep_last=self.keep_last,
            keep_local=self.keep_local,
            session=self.session,
            existing=self._existing,
            on_published=self._note_published,
            gate=None if self._gate is None else self._gate.wait,
            upload_process=self.upload_process is not False,
        )

    def _note_published(self, manifest: Any) -> None:
        if self._last_published is None or manifest.sort_key() > self._last_published.sort_key():
            self._last_published = manifest

    def _metadata(self, checkpoint: dict[str, Any], path: str) -> dict[str, Any]:
        """Manifest fields for one save, read on the training thread at save time."""
        meta: dict[str, Any] = {
            "epoch": checkpoint.get("epoch"),
            "global_step": checkpoint.get("global_step"),
            "created_at": utc_now(),
        }
        trainer = self._trainer
        if trainer is None:
            return meta
        folder = os.path.dirname(os.path.abspath(path))
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.dirpath and os.path.abspath(str(cb.dirpath)) == folder:
                meta["monitor"] = cb.monitor
                meta["monitor_value"] = _scalar(cb.current_score)
                break
        metrics = {}
        for key, value in trainer.callback_metrics.items():
            number = _scalar(value)
            if number is not None:
                metrics[key] = number
        meta["metrics"] = metrics
        return meta


def _cpu_group(trainer: pl.Trainer) -> Any:
    """A gloo process group over every rank of a multi-process fit (None otherwise, or without gloo)."""
    if trainer.world_size <= 1:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.is_gloo_available()):
        return None
    return dist.new_group(backend="gloo")


def _checkpoint_dir(trainer: pl.Trainer) -> str:
    """Where a requested checkpoint goes: beside ModelCheckpoint's, else ``<default_root_dir>/checkpoints``."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            return str(cb.dirpath).removeprefix("file://")
    return os.path.join(trainer.default_root_dir, "checkpoints")


def _scalar(value: Any) -> float | None:
    try:
        if hasattr(value, "numel") and value.numel() != 1:
            return None
        number = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return number if math.isfinite(number) else None
