"""One "node" of a two-node fit whose strategy saves folders: run under torchrun as
`sharded_train.py URL CKPT_DIR MAX_STEPS [resume]` (see tests/helpers/sharded.py).

$FAIL_UPLOAD_RANK=<r> makes rank r's uploads fail from its $FAIL_UPLOAD_AFTER-th on (a store
that refuses that node), to show that no manifest is written then.
"""

import os
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


if __name__ == "__main__":
    url, ckpt_dir, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    resume = len(sys.argv) > 4 and sys.argv[4] == "resume"
    rank = int(os.environ["RANK"])
    if os.environ.get("FAIL_UPLOAD_RANK") == str(rank):
        fail_uploads_from(int(os.environ.get("FAIL_UPLOAD_AFTER", "0")))
    kwargs = trainer_kwargs(
        strategy=FolderDDPStrategy(process_group_backend="gloo"), num_nodes=2, max_steps=max_steps, limit_val_batches=0
    )
    sync = CheckpointSync(url, resume=resume, flush_timeout=120)
    trainer = pl.Trainer(**kwargs, callbacks=[NodeLocalCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1), sync])
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
