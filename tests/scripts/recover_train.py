"""A managed run's job: trains with CheckpointSync and MetricsReporter until max steps. No resume
code: under a managed run (``$TRAINCTL_RECOVER=1``, set by the agent) CheckpointSync makes ``fit``
start from the run's newest complete checkpoint by itself.

``python recover_train.py [--max-steps N] [--every N] [--fail] [--resumable] [--lr LR]``

``--resumable`` trains ResumableRegressor (a loader whose position is saved in checkpoints), so a
resumed fit sees exactly the batches an uninterrupted one would: its final weights are the same.

Metrics are flushed every 0.2 s: on a hard kill, metrics not yet flushed are lost even when a
checkpoint after them was published (a gap in the metrics' steps); MetricsReporter should flush
before a checkpoint is published (open, not in this branch).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tests.helpers.models import ResumableRegressor, TinyRegressor, trainer_kwargs
from trainctl_lightning import CheckpointSync, MetricsReporter


class Slow(Callback):
    def on_train_start(self, trainer, pl_module):
        print(f"START step={trainer.global_step} attempt={os.environ.get('TRAINCTL_ATTEMPT')}", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(0.05)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--fail", action="store_true")
    parser.add_argument("--resumable", action="store_true")
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    if args.fail:
        raise SystemExit("user error: this script fails on purpose")
    url = os.environ["TRAINCTL_RUN_URL"]
    trainer = pl.Trainer(
        **trainer_kwargs(
            max_steps=args.max_steps,
            max_epochs=-1,
            limit_val_batches=0,
            log_every_n_steps=1,
            logger=[MetricsReporter(url, status_interval=0.5, flush_interval=0.2)],  # see the note above
        ),
        callbacks=[
            Slow(),
            ModelCheckpoint(dirpath="ckpts", every_n_train_steps=args.every, save_top_k=-1),
            CheckpointSync(url),
        ],
    )
    trainer.fit(ResumableRegressor(lr=args.lr) if args.resumable else TinyRegressor(lr=args.lr))
    print(f"DONE step={trainer.global_step}", flush=True)
