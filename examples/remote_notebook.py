# %% [markdown]
# # Remote training from a notebook
#
# Open this file in Jupyter / VS Code (the `# %%` markers are cells) or run it as a script:
# `python examples/remote_notebook.py`. Everything defined in the notebook travels to the
# instance by value; the local provider (the default) needs no cloud account. For a GPU in the
# cloud, change the strategy to e.g.
# `RemoteStrategy(provider="aws", instance_type="g5.xlarge", accelerator="gpu", store="s3://bucket/runs")`.

# %%
import os

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trainctl_lightning as tl

STEPS = int(os.environ.get("REMOTE_NOTEBOOK_STEPS", "100"))


# %%
class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def loader(seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 16, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=32)


# %% The fit runs on the instance; its output appears here as it runs.
model = Regressor()
strategy = tl.RemoteStrategy()
trainer = pl.Trainer(
    strategy=strategy,
    max_steps=STEPS,
    val_check_interval=max(1, STEPS // 2),
    limit_val_batches=2,
    enable_progress_bar=False,
    logger=False,
)
trainer.fit(model, train_dataloaders=loader(0), val_dataloaders=loader(1))

# %% Back here: the trained weights are in `model`, the metrics in the trainer.
print({k: round(v.item(), 4) for k, v in trainer.callback_metrics.items()})
print("run:", strategy.remote_run.run_url)
with torch.no_grad():
    print("prediction for ones:", model.net(torch.ones(1, 16)).item(), "(target 16)")


# %% Any function runs remotely too (Fabric, custom loops, evaluation...).
def total(values):
    return sum(values)


print("remote sum:", tl.remote(total, [1, 2, 3], stream=False))
