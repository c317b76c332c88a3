"""A training run that stops mid-publish, for tests/faults/test_write_faults.py to SIGKILL.

``python tests/scripts/hang_mid_publish.py URL CKPT_DIR`` trains two epochs with
``ModelCheckpoint(save_top_k=1)`` + ``CheckpointSync(URL)``: ``epoch=0.ckpt`` is published
normally; ``epoch=1.ckpt``'s data is uploaded and then its publisher hangs before writing the
manifest (at most five minutes, so a test that fails to kill it leaks nothing for long).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tests.helpers.models import TinyRegressor, trainer_kwargs
from trainctl_lightning import CheckpointSync

HANG_S = 300.0


class HangAfterUpload:
    """The store's filesystem: uploads of ``name`` complete, then never return."""

    def __init__(self, fs: Any, name: str) -> None:
        self._fs = fs
        self._name = name

    def put_file(self, lpath: Any, rpath: str, *args: Any, **kwargs: Any) -> Any:
        result = self._fs.put_file(lpath, rpath, *args, **kwargs)
        if str(rpath).endswith("/" + self._name):
            print(f"UPLOADED {self._name}", flush=True)
            threading.Event().wait(HANG_S)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)


class Hang(Callback):
    def __init__(self, sync: CheckpointSync) -> None:
        self.sync = sync

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        assert self.sync.store is not None
        self.sync.store.objects.fs = HangAfterUpload(self.sync.store.objects.fs, "epoch=1.ckpt")


def main(url: str, ckpt_dir: str) -> None:
    sync = CheckpointSync(url)
    trainer = pl.Trainer(
        **trainer_kwargs(max_epochs=2, limit_train_batches=2, limit_val_batches=0),
        callbacks=[
            ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", monitor="step", mode="max", save_top_k=1),
            sync,
            Hang(sync),
        ],
    )
    trainer.fit(TinyRegressor())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
