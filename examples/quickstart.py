"""Quickstart: never lose a checkpoint, and see the run, with one callback and one logger.

Trains a small classifier with Lightning's own ModelCheckpoint writing to fast local disk,
CheckpointSync publishing every checkpoint to a run store in the background, and MetricsReporter
reporting metrics and a live status to the same store. Then it does what a preempted job does:
starts again, finds the newest complete checkpoint with resume_path(), and carries on from that
step.

The store here is a local folder (file://), so no cloud account is needed; pass an s3:// URL
instead and nothing else changes:

    python examples/quickstart.py                        # store in ./demo-runs/quickstart
    python examples/quickstart.py --store s3://my-bucket/runs/quickstart
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainctl_lightning import CheckpointSync, MetricsReporter, RunStore, resume_path
from trainctl_lightning.metrics.read import read_status


class Classifier(pl.LightningModule):
    """A two-layer MLP on a synthetic 10-class problem (no dataset download)."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def data(seed: int, n: int = 2048) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, 64, generator=torch.Generator().manual_seed(42)) * 2
    y = torch.randint(0, 10, (n,), generator=g)
    x = centers[y] + torch.randn(n, 64, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=seed == 0)


def train(store: str, ckpt_dir: Path, max_epochs: int, cache_dir: Path) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=MetricsReporter(store),  # metrics + live status, in the same store
        enable_model_summary=False,
        callbacks=[
            # Lightning's own checkpointing, to fast local disk...
            ModelCheckpoint(dirpath=ckpt_dir, monitor="val_loss", save_top_k=2, save_last=True),
            # ...and every file it saves goes to the store in the background.
            CheckpointSync(store),
        ],
    )
    # None on the first run (start from scratch); the newest published checkpoint after that.
    trainer.fit(Classifier(), data(0), data(1), ckpt_path=resume_path(store, cache_dir=cache_dir))
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=None, help="run store URL (default: file://./demo-runs/quickstart)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs in the first run (the second adds 2)")
    args = parser.parse_args()
    store = args.store or f"file://{Path('demo-runs/quickstart').resolve()}"
    if args.store is None:
        shutil.rmtree(Path("demo-runs/quickstart"), ignore_errors=True)  # the demo starts fresh each time

    with tempfile.TemporaryDirectory(prefix="trainctl-quickstart-") as tmp:
        print(f"\n== run 1: train {args.epochs} epochs, publishing checkpoints to {store}")
        first = train(store, Path(tmp) / "machine-1", args.epochs, Path(tmp) / "cache")
        print(f"   finished at step {first.global_step}, val_acc={float(first.callback_metrics['val_acc']):.3f}")

        # A restart on a fresh machine: its local disk is empty, the store is all it has.
        print("\n== run 2: a fresh machine resumes from the newest complete checkpoint in the store")
        latest = RunStore(store).latest_checkpoint()
        print(f"   latest in store: {latest.name} at step {latest.global_step}")
        second = train(store, Path(tmp) / "machine-2", args.epochs + 2, Path(tmp) / "cache")
        print(f"   resumed at step {latest.global_step}, finished at step {second.global_step}")

    print(f"\n== what the store holds now ({store}):")
    for m in RunStore(store).list_checkpoints():
        print(f"   {m.id:48s} {m.name:28s} step {m.global_step:5d}  {m.size / 1e6:.1f} MB")
    status = read_status(store)
    print(
        f"\n== status: {status.state()} at step {status.global_step}, "
        f"val_acc={status.metrics.get('val_acc', float('nan')):.3f}, last checkpoint {status.last_checkpoint['name']}"
    )
    print(
        f"\nTry: .venv/bin/trainctl ckpt ls {store}\n     .venv/bin/trainctl ckpt verify {store}"
        f"\n     .venv/bin/trainctl runs ls {store}\n     .venv/bin/trainctl metrics {store} --output csv"
        f"\n     .venv/bin/trainctl plot {store} -o demo-runs/quickstart.png"
    )


if __name__ == "__main__":
    main()
