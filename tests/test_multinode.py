"""A user's own Lightning script with ``num_nodes=2``, launched as a new user would: two local
instances, each its own working directory (no shared disk), one job under a real ``torchrun`` on
each, gloo between them. Both nodes train, the run ends succeeded, rank zero's checkpoints and
metrics are in the store; killing one node's job ends the run with nothing left."""

from __future__ import annotations

import glob
import json
import os
import signal
import tempfile
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.helpers import wait_until
from tests.helpers.cli import trainctl
from tests.helpers.leftovers import assert_nothing_running
from trainctl_lightning import RemoteStrategy
from trainctl_lightning import launch as api
from trainctl_lightning.jobs.spec import JobPhase
from trainctl_lightning.providers import get_provider
from trainctl_lightning.providers.api import InstanceState
from trainctl_lightning.store.layout import TAG_NODE

pytestmark = pytest.mark.slow

TRAIN_PY = textwrap.dedent(
    '''
    """The user's script: plain Lightning DDP across two nodes; nothing in it knows about trainctl's launcher."""
    import os
    import sys
    import time

    import torch
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from trainctl_lightning import CheckpointSync, MetricsReporter


    class Tiny(LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            if batch_idx == 0 and self.current_epoch == 0:
                print(f"TRAINING rank={self.global_rank} world={self.trainer.world_size} "
                      f"node={self.trainer.node_rank} pid={os.getpid()}", flush=True)
            time.sleep(float(os.environ.get("STEP_SLEEP", "0")))
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss, sync_dist=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(64, 4, generator=g)
            return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


    if __name__ == "__main__":
        trainer = Trainer(
            num_nodes=2,
            devices=1,
            accelerator="cpu",
            strategy="ddp",
            max_steps=int(os.environ.get("STEPS", "8")),
            logger=MetricsReporter(),
            callbacks=[ModelCheckpoint(dirpath="ckpts", every_n_train_steps=4, save_top_k=-1), CheckpointSync()],
            log_every_n_steps=1,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Tiny())
        print(f"DONE rank={trainer.global_rank} step={trainer.global_step}", flush=True)
    '''
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "train.py").write_text(TRAIN_PY)
    (root / ".gitignore").write_text("ckpts/\nlightning_logs/\n")
    return root


def test_two_nodes_train_together_and_the_run_succeeds(project: Path, tmp_path: Path) -> None:
    store = f"file://{tmp_path}/store"
    result = trainctl("launch", "train.py", "--nodes", "2", "--store", store, "--output", "json", cwd=project, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["state"] == "succeeded" and out["nodes"] == 2 and len(out["node_instances"]) == 2
    run_id = out["run_id"]
    # streamed live from both nodes, each line with its node
    assert "[node 0] TRAINING" in result.stderr and "[node 1] TRAINING" in result.stderr

    logs = trainctl("logs", run_id, "--store", store).stdout
    trained = sorted(line.split("TRAINING ", 1)[1].split(" pid=")[0] for line in logs.splitlines() if "TRAINING" in line)
    assert trained == ["rank=0 world=2 node=0", "rank=1 world=2 node=1"]
    assert "DONE rank=1 step=8" in trainctl("logs", run_id, "--store", store, "--node", "1").stdout

    status = json.loads(trainctl("status", run_id, "--store", store, "--output", "json").stdout)
    assert [n["job"]["phase"] for n in status["nodes"]] == ["succeeded", "succeeded"]
    assert status["training"]["global_step"] == 8

    # rank zero published the checkpoints and reported the metrics, once each
    ckpts = json.loads(trainctl("ckpt", "ls", out["run_url"], "--output", "json").stdout)["checkpoints"]
    assert [c["global_step"] for c in ckpts] == [4, 8]
    metrics = json.loads(trainctl("metrics", out["run_url"], "--output", "json").stdout)
    assert [r["step"] for r in metrics if "train_loss" in r["metrics"]] == list(range(8))

    instances = get_provider("local").list(include_terminated=True)
    assert sorted(i.id for i in instances) == sorted(out["node_instances"])
    assert {i.state for i in instances} == {InstanceState.TERMINATED}
    assert sorted(i.tags[TAG_NODE] for i in instances) == ["0", "1"]
    assert_nothing_running()
    # torchrun's own files went where the agent removes them, not into /tmp/torchelastic_* (kept forever)
    assert not glob.glob(os.path.join(tempfile.gettempdir(), "torchelastic_*", f"{run_id}*"))


def test_killing_one_nodes_job_ends_the_run_on_every_node(project: Path, tmp_path: Path) -> None:
    store = f"file://{tmp_path}/store"
    run = api.launch(
        str(project / "train.py"),
        project_dir=project,
        store=store,
        nodes=2,
        env={"STEPS": "100000", "STEP_SLEEP": "0.05"},
        detach=True,
        follow=True,
    )
    assert isinstance(run, api.Run)
    wait_until(lambda: run.logs().count("TRAINING") == 2, timeout=120, what="both nodes training")
    node1 = run.node_states()[1]
    assert node1 is not None and node1.pid is not None
    os.kill(node1.pid, signal.SIGKILL)  # node 1's job (its torchrun), without a word to anyone

    state = run.wait(timeout=120)
    assert state.phase is JobPhase.FAILED
    assert state.failed_node == 1 and "node 1" in (state.error or "")
    assert {s.phase for s in run.node_states() if s} == {JobPhase.FAILED}
    assert {i.state for i in get_provider("local").list(include_terminated=True)} == {InstanceState.TERMINATED}
    assert_nothing_running()


def test_remote_strategy_fits_across_two_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "remote-project"
    project.mkdir()
    (project / "tiny_models.py").write_text(
        textwrap.dedent(
            """
            import torch
            from lightning.pytorch import LightningModule
            from torch.utils.data import DataLoader, TensorDataset


            class Tiny(LightningModule):
                def __init__(self):
                    super().__init__()
                    torch.manual_seed(0)
                    self.net = torch.nn.Linear(4, 1)

                def training_step(self, batch, batch_idx):
                    x, y = batch
                    loss = torch.nn.functional.mse_loss(self.net(x), y)
                    self.log("train_loss", loss, sync_dist=True)
                    return loss

                def configure_optimizers(self):
                    return torch.optim.SGD(self.parameters(), lr=0.1)

                def train_dataloader(self):
                    g = torch.Generator().manual_seed(0)
                    x = torch.randn(64, 4, generator=g)
                    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
            """
        )
    )
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.chdir(project)
    import tiny_models

    model = tiny_models.Tiny()
    before = model.net.weight.detach().clone()
    strategy = RemoteStrategy(provider="local", store=f"file://{tmp_path}/store", num_nodes=2, devices=1, stream=False)
    trainer = pl.Trainer(strategy=strategy, max_steps=4, enable_progress_bar=False, enable_model_summary=False, logger=False)
    trainer.fit(model)
    assert strategy.remote_run is not None and strategy.remote_run.phase == "succeeded"
    assert trainer.global_step == 4 and "train_loss" in trainer.callback_metrics
    assert not torch.equal(model.net.weight, before)  # the weights came back from rank zero
    run = api.get_run(strategy.remote_run.run_url)
    assert run.nodes == 2 and run.logs(node=1) != ""
    assert_nothing_running()
