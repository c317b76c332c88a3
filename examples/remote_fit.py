"""Remote fit: an ordinary Lightning script whose trainer.fit runs on another machine.

The only change from a local script is ``strategy=RemoteStrategy(...)``. The model class below is
defined in this script (``__main__``), so it travels by value; classes in modules of the current
directory would be imported on the instance from the synced copy. When fit returns, ``model``
holds the trained weights and ``trainer.callback_metrics`` the final metrics, as after a local fit.

With the default local provider the "instance" is a working directory on this machine, so this
runs as is, with no cloud account:

    python examples/remote_fit.py
    python examples/remote_fit.py --provider aws --instance-type g5.xlarge --accelerator gpu \\
        --store s3://my-bucket/runs
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainctl_lightning import CheckpointSync, MetricsReporter, RemoteStrategy


class Classifier(pl.LightningModule):
    """A two-layer MLP on a synthetic 10-class problem (no dataset download)."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(32, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class Blobs(pl.LightningDataModule):
    """Gaussian blobs, generated where the data is loaded: on the instance."""

    def __init__(self, n: int = 2048, batch_size: int = 64) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def _loader(self, seed: int) -> DataLoader:
        centers = torch.randn(10, 32, generator=torch.Generator().manual_seed(42)) * 2
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 10, (self.n,), generator=g)
        x = centers[y] + torch.randn(self.n, 32, generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader(0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", default=None, help="local (default) or aws")
    parser.add_argument("--instance-type", default=None)
    parser.add_argument("--accelerator", default="auto", help="accelerator on the instance, e.g. gpu")
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--store", default=None, help="store URL for the run (default: trainctl.toml or ~/.trainctl/store)")
    parser.add_argument("--max-steps", type=int, default=200)
    args = parser.parse_args()

    model = Classifier()
    before = model.net[0].weight.detach().clone()
    strategy = RemoteStrategy(
        provider=args.provider,
        instance_type=args.instance_type,
        accelerator=args.accelerator,
        devices=int(args.devices) if args.devices.isdigit() else args.devices,
        store=args.store,
    )
    trainer = pl.Trainer(
        strategy=strategy,
        max_steps=args.max_steps,
        val_check_interval=max(1, args.max_steps // 2),
        check_val_every_n_epoch=None,  # val_check_interval counts batches across epochs
        limit_val_batches=4,
        enable_progress_bar=False,
        log_every_n_steps=10,
        # No URLs: on the instance both write to the run's own place in the store.
        logger=MetricsReporter(),
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath="checkpoints", monitor="val_loss", save_last=True), CheckpointSync()],
    )
    trainer.fit(model, datamodule=Blobs())

    print("run:", strategy.remote_run.run_url)
    print("final checkpoint:", strategy.remote_run.final_checkpoint_url)
    print("global step:", trainer.global_step)
    print("metrics:", {k: round(v.item(), 4) for k, v in trainer.callback_metrics.items()})
    print("weights changed:", not torch.equal(before, model.net[0].weight.detach()))
    run_id = strategy.remote_run.run_id
    store = f" --store {args.store}" if args.store else ""
    print(f"\nLook at the run: trainctl status {run_id}{store}")
    print(f"                 trainctl logs {run_id}{store}")
    print(f"                 trainctl ckpt ls {strategy.remote_run.run_url}")
    print(f"                 trainctl metrics {strategy.remote_run.run_url}")


if __name__ == "__main__":
    main()
