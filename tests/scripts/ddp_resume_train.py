"""Two-process DDP on CPU (gloo) with CheckpointSync(resume=True): `python ddp_resume_train.py URL CKPT_DIR MAX_STEPS`.

Each rank prints the step it started training at, the checkpoint it restored and what
CheckpointSync says it resumed from."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tests.helpers.models import ResumableRegressor, trainer_kwargs
from trainctl_lightning import CheckpointSync


def say(line: str) -> None:
    """One line in one write(2): the ranks share a stdout pipe, and print() writes the text and
    its newline separately, so two ranks' lines could interleave."""
    os.write(sys.stdout.fileno(), (line + "\n").encode())


class Start(Callback):
    def on_train_start(self, trainer, pl_module):
        say(f"RANK {trainer.global_rank} START step={trainer.global_step} ckpt={trainer.ckpt_path}")


if __name__ == "__main__":
    url, ckpt_dir, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sync = CheckpointSync(url, resume=True)
    trainer = pl.Trainer(
        **trainer_kwargs(strategy="ddp", devices=2, max_steps=max_steps, limit_val_batches=0),
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1), sync, Start()],
    )
    trainer.fit(ResumableRegressor())
    say(f"RANK {trainer.global_rank} DONE step={trainer.global_step} resumed={sync.resumed_from}")
