"""One "node" of a two-node fit whose strategy saves folders: run under torchrun as
`sharded_train.py URL CKPT_DIR MAX_STEPS [resume]` (see tests/helpers/sharded.py).

$FAIL_UPLOAD_RANK=<r> makes rank r's uploads fail from its $FAIL_UPLOAD_AFTER-th on (a store
that refuses that node), to show that no manifest is written then. Other knobs (all optional):

- $KILL_UPLOAD_RANK=<r>, $KILL_AT_UPLOAD=<n>: rank r SIGKILLs itself in its n-th upload;
- $OUTAGE_STEP=<s>: every rank's store refuses (a transient ConnectionError) every object of the
  checkpoint of step s, an outage as long as its whole publish; $RETRY_TIMEOUT bounds the retries;
- $KEEP_LAST, $KEEP_LOCAL=0, $SAVE_TOP_K: CheckpointSync's / ModelCheckpoint's options;
- $SIGNAL_AT_STEP=<s>: rank zero sends itself SIGUSR1 (a spot notice) at step s;
- $METRICS=1: a MetricsReporter that would not flush on its own for an hour; rank zero prints
  "GATE <name> step=<s> missing=<steps>" for each manifest, naming the steps below s whose metrics were
  not stored when it was written.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.helpers.models import TinyRegressor, trainer_kwargs
from tests.helpers.sharded import FolderDDPStrategy
from trainctl_lightning import CheckpointSync
from trainctl_lightning.store.objects import ObjectStore


class NodeLocalCheckpoint(ModelCheckpoint):
    """ModelCheckpoint writing to this node's own folder: on one machine, the same absolute path
    (which Lightning broadcasts from rank zero) would be one shared disk, which nodes do not have."""

    def setup(self, trainer, pl_module, stage):  # type: ignore[no-untyped-def]
        super().setup(trainer, pl_module, stage)
        self.dirpath = os.path.abspath(os.environ.get("NODE_CKPT_DIR", "ckpts"))


def fail_uploads_from(after: int) -> None:
    real = ObjectStore.upload
    calls = {"n": 0}

    def upload(self, local, rel, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(f"injected upload failure of {rel}")
        return real(self, local, rel, **kwargs)

    ObjectStore.upload = upload  # type: ignore[method-assign]


def kill_in_upload(at: int) -> None:
    real = ObjectStore.upload
    calls = {"n": 0}

    def upload(self, local, rel, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] >= at:
            print(f"RANK {os.environ['RANK']} KILLED uploading {rel}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, local, rel, **kwargs)

    ObjectStore.upload = upload  # type: ignore[method-assign]


def outage_for_step(step: int) -> None:
    """The store is unreachable for every object of the checkpoint of ``step``: transient errors,
    retried until CheckpointSync's retry_timeout, as for a real outage."""
    from fsspec.implementations.local import LocalFileSystem

    real = LocalFileSystem.put_file
    marker = f"-step={step}."

    def put_file(self, lpath, rpath, *args, **kwargs):  # type: ignore[no-untyped-def]
        if marker in str(rpath):
            raise ConnectionError(f"injected outage: {rpath}")
        return real(self, lpath, rpath, *args, **kwargs)

    LocalFileSystem.put_file = put_file  # type: ignore[method-assign]


def check_metrics_gate(url: str) -> None:
    """Rank zero prints, for each manifest, the steps it covers whose metrics were not stored yet."""
    from trainctl_lightning.metrics.read import read_metrics
    from trainctl_lightning.store import RunStore

    real = RunStore.commit_manifest

    def commit_manifest(self, manifest, stop=None):  # type: ignore[no-untyped-def]
        stored = {r.step for r in read_metrics(url) if "train_loss" in r.metrics}
        missing = sorted(set(range(manifest.global_step)) - stored)
        print(f"GATE {manifest.name} step={manifest.global_step} missing={missing}", flush=True)
        return real(self, manifest, stop)

    RunStore.commit_manifest = commit_manifest  # type: ignore[method-assign]


class SignalAt(pl.Callback):
    """Rank zero sends itself SIGUSR1 at the end of one step, as the agent does on a spot notice."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args):  # type: ignore[no-untyped-def]
        if trainer.is_global_zero and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


if __name__ == "__main__":
    url, ckpt_dir, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    resume = len(sys.argv) > 4 and sys.argv[4] == "resume"
    rank = int(os.environ["RANK"])
    env = os.environ
    if env.get("FAIL_UPLOAD_RANK") == str(rank):
        fail_uploads_from(int(env.get("FAIL_UPLOAD_AFTER", "0")))
    if env.get("KILL_UPLOAD_RANK") == str(rank):
        kill_in_upload(int(env["KILL_AT_UPLOAD"]))
    if env.get("OUTAGE_STEP"):
        outage_for_step(int(env["OUTAGE_STEP"]))
    extra: dict = {}
    if env.get("METRICS") == "1":
        from trainctl_lightning import MetricsReporter

        extra = {"logger": MetricsReporter(url, flush_interval=3600, status_interval=10), "log_every_n_steps": 1}
        if rank == 0:
            check_metrics_gate(url)
    kwargs = trainer_kwargs(
        strategy=FolderDDPStrategy(process_group_backend="gloo"), num_nodes=2, max_steps=max_steps, limit_val_batches=0, **extra
    )
    sync = CheckpointSync(
        url,
        resume=resume,
        flush_timeout=120,
        retry_timeout=float(env.get("RETRY_TIMEOUT", "1800")),
        keep_last=int(env["KEEP_LAST"]) if env.get("KEEP_LAST") else None,
        keep_local=env.get("KEEP_LOCAL", "1") == "1",
    )
    callbacks = [NodeLocalCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=int(env.get("SAVE_TOP_K", "-1"))), sync]
    if env.get("SIGNAL_AT_STEP"):
        callbacks.append(SignalAt(int(env["SIGNAL_AT_STEP"])))
    trainer = pl.Trainer(**kwargs, callbacks=callbacks)
    try:
        trainer.fit(TinyRegressor())
    except Exception as exc:
        print(f"RANK {rank} NODE {os.environ['NODE_INDEX']} FAILED {type(exc).__name__}: {exc}", flush=True)
        raise
    print(
        f"RANK {rank} NODE {os.environ['NODE_INDEX']} WORLD {trainer.world_size} DONE step={trainer.global_step} "
        f"resumed={sync.resumed_from} resumed_step={sync.resumed_from_manifest.global_step if sync.resumed_from_manifest else None}",
        flush=True,
    )
