"""Two-process DDP on CPU (gloo) with CheckpointSync: run as `python ddp_train.py URL CKPT_DIR`."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.helpers.models import TinyRegressor, trainer_kwargs
from trainctl_lightning import CheckpointSync, MetricsReporter

if __name__ == "__main__":
    url, ckpt_dir = sys.argv[1], sys.argv[2]
    kwargs = trainer_kwargs(strategy="ddp", devices=2, max_steps=6, limit_val_batches=0, log_every_n_steps=1)
    kwargs["logger"] = [MetricsReporter(url)]
    trainer = pl.Trainer(
        **kwargs,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1), CheckpointSync(url)],
    )
    trainer.fit(TinyRegressor())
    print(f"RANK {trainer.global_rank} DONE step={trainer.global_step} pid={os.getpid()}", flush=True)
