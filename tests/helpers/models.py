"""Tiny real Lightning models and scripts the tests train."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader, TensorDataset


class TinyRegressor(LightningModule):
    """A linear model on a fixed random regression problem; trains in milliseconds per step."""

    def __init__(self, width: int = 32, fail_at_step: int | None = None, lr: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        with torch.random.fork_rng():  # same initial weights every run, global RNG untouched
            torch.manual_seed(seed)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.hparams.fail_at_step is not None and self.global_step == self.hparams.fail_at_step:
            raise RuntimeError(f"boom at step {self.global_step}")
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    def train_dataloader(self):
        return _loader(seed=0)

    def val_dataloader(self):
        return _loader(seed=1)


def _loader(seed: int, n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def trainer_kwargs(**overrides):
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return kwargs


class ResumableLoader:
    """The batches of a fixed regression problem, in order, with their position saved in checkpoints.

    Lightning saves ``state_dict()`` of a train loader that has one (its stateful-loader protocol)
    and loads it on resume, so a fit resumed mid-epoch sees exactly the batches an uninterrupted
    fit would have. It has a length, so Lightning does not fetch ahead of the batch it trains on.
    """

    def __init__(self, seed: int = 0, n: int = 64, batch_size: int = 8) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
        self.batch_size = batch_size
        self._yielded = 0  # batches handed out in the current epoch
        self._skip = 0  # batches to skip at the next iter() (set by load_state_dict)

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start, self._skip = self._skip, 0
        self._yielded = start
        for i in range(start, len(self)):
            self._yielded = i + 1
            s = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield self.x[s], self.y[s]

    def state_dict(self) -> dict[str, int]:
        return {"batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state.get("batches", 0)) % len(self)


class ResumableRegressor(TinyRegressor):
    """TinyRegressor trained from a :class:`ResumableLoader`: resuming it is exact."""

    def train_dataloader(self) -> ResumableLoader:
        return ResumableLoader(seed=0)
