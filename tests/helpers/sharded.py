"""A strategy that saves checkpoints as folders on CPU, and two-"node" torchrun pairs for the tests.

Lightning's own folder-saving strategies do not run here: ``FSDPStrategy`` refuses any accelerator
but CUDA (its accelerator connector raises before the fit). :class:`FolderDDPStrategy` is DDP on
gloo that saves and loads exactly the folder layout of ``ModelParallelStrategy`` (the model state
under ``"state_dict"`` and each optimizer under ``"optimizer_<i>"`` through
``torch.distributed.checkpoint``, the rest in ``meta.pt`` on rank zero).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "scripts" / "sharded_train.py"


class FolderDDPStrategy(DDPStrategy):
    """DDP whose checkpoints are DCP folders, saved and loaded by every rank.

    Unlike Lightning's folder strategies, ``load_checkpoint`` does not broadcast rank zero's path:
    each rank loads the folder it was given (in the tests each "node" has its own cache folder).
    """

    trainctl_folder_state_key = "state_dict"

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        return get_optimizer_state_dict(self.lightning_module, optimizer)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        path = Path(self.broadcast(filepath))
        path.mkdir(parents=True, exist_ok=True)
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        dcp.save(state, checkpoint_id=path)
        if self.global_rank == 0:
            torch.save(checkpoint, path / "meta.pt")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(checkpoint_path)
        module = self.lightning_module
        assert module is not None
        optimizers = [getattr(o, "_optimizer", o) for o in self.optimizers]
        state: dict[str, Any] = {"state_dict": get_model_state_dict(module)}
        state.update({f"optimizer_{i}": get_optimizer_state_dict(module, o) for i, o in enumerate(optimizers)})
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(module, state["state_dict"])
        for i, optimizer in enumerate(optimizers):
            set_optimizer_state_dict(module, optimizer, state[f"optimizer_{i}"])
        return torch.load(path / "meta.pt", weights_only=False)

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        pass  # loaded by load_checkpoint

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        pass  # loaded by load_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_pair(
    nodes: list[Path], args: list[str], env: dict[str, str] | None = None, timeout: float = 150
) -> list[subprocess.CompletedProcess[str]]:
    """Run ``sharded_train.py args`` as two torchrun "nodes" (c10d rendezvous on 127.0.0.1, one
    process each), each in its own folder with its own cache; returns both, once both ended."""
    port = free_port()
    procs = []
    for k, cwd in enumerate(nodes):
        cwd.mkdir(parents=True, exist_ok=True)
        node_env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "TRAINCTL_CACHE_DIR": str(cwd / "cache"),
            "NODE_INDEX": str(k),
            **(env or {}),
        }
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=sharded-test", "--local-addr=127.0.0.1",
            "--max-restarts=0", f"--log-dir={cwd / 'torchelastic'}", str(SCRIPT), *args,
        ]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=node_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    done = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, ""))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done
