"""``CheckpointSync``: publish every checkpoint Lightning saves to object storage, in the background."""

from __future__ import annotations

import logging
import math
import os
import uuid
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from typing_extensions import override

from trainctl_lightning.checkpoint.io import SnapshotCheckpointIO
from trainctl_lightning.checkpoint.publisher import Publisher
from trainctl_lightning.errors import ConfigError, StoreError, TrainctlError, UploadError
from trainctl_lightning.manifest import utc_now
from trainctl_lightning.retry import RetryPolicy
from trainctl_lightning.store import RUN_URL_ENV, RunStore, validate_url

log = logging.getLogger(__name__)

class CheckpointSync(Callback):
    r"""Upload every checkpoint Lightning saves to a run store, without stalling training.

    Use it beside ``ModelCheckpoint`` writing to fast local disk. Each save is copied to host
    memory on the training thread, written to disk and uploaded in the background, and published
    atomically (data first, manifest last), so the store only ever shows complete checkpoints.
    Remote copies of checkpoints that ``ModelCheckpoint`` rotates away are deleted once their
    replacement is published. A restarted run writing to the same URL keeps adding to it.

    Args:
        url: fsspec URL of the run, e.g. ``"s3://bucket/runs/exp1"`` or ``"file:///data/exp1"``.
            Defaults to ``$TRAINCTL_RUN_URL`` (set when launched by trainctl).
        storage_options: fsspec options (credentials, ``endpoint_url``); never logged.
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
        check_store: write a probe object at setup to fail fast on a bad URL or credentials.

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
    ) -> None:
        url = url if url is not None else os.environ.get(RUN_URL_ENV)
        if not url:
            raise ConfigError(
                f"CheckpointSync() needs a store URL, e.g. CheckpointSync('s3://bucket/runs/exp1'), "
                f"or ${RUN_URL_ENV} set (trainctl launch sets it)"
            )
        validate_url(url)
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
        self.url = url
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
        self.session = uuid.uuid4().hex[:8]
        self.store: RunStore | None = None
        self._io: SnapshotCheckpointIO | None = None
        self._trainer: pl.Trainer | None = None
        self._end_error: UploadError | None = None
        self._existing: list[Any] = []
        self._last_published: Any = None

    def __repr__(self) -> str:
        return f"CheckpointSync({self.url!r})"

    @property
    def state_key(self) -> str:
        return f"CheckpointSync{{url={self.url!r}}}"

    @property
    def last_published(self) -> Any:
        """Manifest of the newest checkpoint this callback published (None before the first)."""
        return self._last_published

    @property
    def last_flush(self) -> Any:
        """Outcome of the latest end-of-fit flush (published / failed / unfinished names)."""
        return self._io.last_flush if self._io is not None else None

    # ----------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return  # validate/test/predict save nothing
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
        if not trainer.is_global_zero:
            return
        self._end_error = None
        current = trainer.strategy.checkpoint_io
        if isinstance(current, SnapshotCheckpointIO) and current is self._io:
            self._io.start_fit()
            self._io.raise_outside_fit = True
            return
        self._io = SnapshotCheckpointIO(
            current,
            self._make_publisher,
            session=self.session,
            max_pending_snapshots=self.max_pending_snapshots,
            flush_timeout=self.flush_timeout,
            metadata=self._metadata,
        )
        self._io.start_fit()
        trainer.strategy.checkpoint_io = self._io

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
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
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
            if (
                isinstance(cb, ModelCheckpoint)
                and cb.monitor
                and cb.dirpath
                and os.path.abspath(str(cb.dirpath)) == folder
            ):
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


def _scalar(value: Any) -> float | None:
    try:
        if hasattr(value, "numel") and value.numel() != 1:
            return None
        number = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return number if math.isfinite(number) else None
