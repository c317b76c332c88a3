"""A user's multi-node DDP script on CPU (gloo): ``Trainer(num_nodes=N, devices=M, strategy="ddp")``
with CheckpointSync and MetricsReporter to the run. Run by the agent under ``torchrun``; Lightning
picks up TorchElasticEnvironment by itself.

``python multinode_train.py [--nodes N] [--devices M] [--max-steps S] [--step-s SECONDS] [--fail-node K]``

Each rank prints one ``RANK global_rank=.. world_size=.. node=.. ...`` line at the start of fit and a
``DONE`` line at its end (each in one write(2): ranks share their node's stdout pipe). ``--step-s``
slows each step down, so that a test can kill a process mid-run; ``--fail-node K`` makes the
script fail by itself on node K (``$TRAINCTL_NODE``) after its second step, a user error. The
``RANK`` line ends with the global step fit starts from (above 0 when it resumed).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tests.helpers.models import TinyRegressor, trainer_kwargs
from trainctl_lightning import CheckpointSync, MetricsReporter


def say(text: str) -> None:
    os.write(1, f"{text}\n".encode())


class Report(Callback):
    def __init__(self, step_s: float, fail_node: int | None) -> None:
        self.step_s = step_s
        self.fail_node = fail_node

    def on_train_start(self, trainer, pl_module):
        env = trainer.strategy.cluster_environment
        say(
            f"RANK global_rank={trainer.global_rank} world_size={trainer.world_size} node={trainer.node_rank} "
            f"local_rank={trainer.local_rank} env={type(env).__name__} trainctl_node={os.environ.get('TRAINCTL_NODE')} "
            f"pid={os.getpid()} step={trainer.global_step}"
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.fail_node is not None and os.environ.get("TRAINCTL_NODE") == str(self.fail_node) and trainer.global_step >= 2:
            raise RuntimeError(f"user error: this script fails on node {self.fail_node} on purpose")
        if self.step_s:
            time.sleep(self.step_s)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--step-s", type=float, default=0.0)
    parser.add_argument("--fail-node", type=int, default=None)
    args = parser.parse_args()
    url = os.environ["TRAINCTL_RUN_URL"]
    trainer = pl.Trainer(
        **trainer_kwargs(
            strategy="ddp",
            num_nodes=args.nodes,
            devices=args.devices,
            max_steps=args.max_steps,
            max_epochs=-1,
            limit_val_batches=0,
            log_every_n_steps=1,
            logger=[MetricsReporter(url, status_interval=0.5, flush_interval=0.2)],
        ),
        callbacks=[
            Report(args.step_s, args.fail_node),
            ModelCheckpoint(dirpath="ckpts", every_n_train_steps=2, save_top_k=-1),
            CheckpointSync(url),
        ],
    )
    trainer.fit(TinyRegressor())
    say(f"DONE global_rank={trainer.global_rank} step={trainer.global_step} pid={os.getpid()}")
