"""Trains until SIGTERM: run as `python sigterm_train.py URL CKPT_DIR`; prints TRAINING when steps run."""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint

from tests.helpers.models import TinyRegressor, trainer_kwargs
from trainctl_lightning import CheckpointSync, MetricsReporter


class Slow(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            print("TRAINING", flush=True)
        time.sleep(0.05)


if __name__ == "__main__":
    url, ckpt_dir = sys.argv[1], sys.argv[2]
    kwargs = trainer_kwargs(max_steps=100_000, limit_val_batches=0, log_every_n_steps=1)
    if "--metrics" in sys.argv:
        kwargs["logger"] = [MetricsReporter(url, status_interval=0.5)]
    trainer = pl.Trainer(
        **kwargs,
        callbacks=[
            Slow(),
            ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2),
            OnExceptionCheckpoint(dirpath=ckpt_dir, filename="on_exception"),
            CheckpointSync(url),
        ],
    )
    trainer.fit(TinyRegressor())
