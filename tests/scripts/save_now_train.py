"""Trains with CheckpointSync until max steps; a checkpoint can be asked for while it runs.

``python save_now_train.py URL CKPT_DIR [--max-steps N] [--request-at STEP] [--chain] [--resume] [--ddp]``
(URL ``-``: ``$TRAINCTL_RUN_URL``, as set by the trainctl agent)

Prints ``START step=N`` when training starts (after a resume), ``TRAINING`` at step 3, and on
exit whether the SIGUSR1 handler that was there before fit is back (``HANDLER RESTORED``).
``--chain`` installs a SIGUSR1 handler of its own before fit (it prints ``PREVIOUS HANDLER``).
``--request-at`` calls ``request_checkpoint()`` from a callback at that step. ``--ddp``: two
processes on CPU (gloo); prints ``RANK r DONE step=N`` from each.
"""

import argparse
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tests.helpers.models import TinyRegressor, trainer_kwargs
from trainctl_lightning import CheckpointSync, resume_path


class Steps(Callback):
    def __init__(self, sync, request_at):
        self.sync = sync
        self.request_at = request_at

    def on_train_start(self, trainer, pl_module):
        print(f"START step={trainer.global_step}", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            print("TRAINING", flush=True)
        if trainer.global_step == self.request_at:
            self.sync.request_checkpoint()
        time.sleep(0.05)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("ckpt_dir")
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--request-at", type=int)
    parser.add_argument("--chain", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--ddp", action="store_true")
    args = parser.parse_args()
    url = None if args.url == "-" else args.url
    if args.chain:
        signal.signal(signal.SIGUSR1, lambda *a: print("PREVIOUS HANDLER", flush=True))
    before = signal.getsignal(signal.SIGUSR1)
    sync = CheckpointSync(url)
    parallel = dict(strategy="ddp", devices=2) if args.ddp else {}
    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=args.max_steps, max_epochs=-1, limit_val_batches=0, **parallel),
        callbacks=[Steps(sync, args.request_at), ModelCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=1000), sync],
    )
    try:
        trainer.fit(TinyRegressor(), ckpt_path=resume_path(url) if args.resume else None)
    finally:
        print("HANDLER RESTORED" if signal.getsignal(signal.SIGUSR1) == before else "HANDLER NOT RESTORED", flush=True)
    print(f"RANK {trainer.global_rank} DONE step={trainer.global_step}", flush=True)
