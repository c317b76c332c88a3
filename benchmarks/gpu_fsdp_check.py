"""Prove the sharded CheckpointSync path with Lightning's real FSDPStrategy (needs CUDA; NOT run on CPU).

Lightning's ``FSDPStrategy`` refuses any accelerator but CUDA, so the CPU tests use a DDP strategy
that saves the same folder layout. On a GPU machine with 2 GPUs (NCCL refuses two ranks on one
device; with one GPU it runs one FSDP rank, which still writes and resumes the folder format), run:

    python benchmarks/gpu_fsdp_check.py            # fit 4 steps, publish, resume to 6, check

It runs two fits, each a Lightning-launched 2-process FSDP(state_dict_type="sharded") run with
CheckpointSync to a file:// store in a temporary folder, and prints a final JSON line: the shard
files listed in the newest manifest with their ranks, and the step the second fit resumed from.
Exits 1 when a check fails.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy

from tests.helpers.models import TinyRegressor
from trainctl_lightning import CheckpointSync
from trainctl_lightning.store import RunStore

DEVICES = min(2, torch.cuda.device_count())


def fit(root: str, steps: int, resume: bool) -> CheckpointSync:
    sync = CheckpointSync(f"file://{root}/store", resume=resume)
    trainer = pl.Trainer(
        accelerator="cuda",
        devices=DEVICES,
        strategy=FSDPStrategy(state_dict_type="sharded"),
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        callbacks=[ModelCheckpoint(dirpath=f"{root}/ckpts", every_n_train_steps=2, save_top_k=-1), sync],
    )
    trainer.fit(TinyRegressor())
    return sync


def main() -> int:
    if DEVICES < 1:
        print("needs a CUDA device, found none", file=sys.stderr)
        return 2
    root = os.environ.get("CHECK_DIR") or tempfile.mkdtemp(prefix="fsdp-check-")
    fit(root, 4, resume=False)
    sync = fit(root, 6, resume=True)
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return 0
    latest = RunStore(f"file://{root}/store").list_checkpoints()
    newest = [m for m in latest if m.global_step == 4][-1]
    ranks = sorted({f.rank for f in newest.files if f.rank is not None})
    report = {
        "check": "gpu_fsdp_sharded",
        "devices": DEVICES,
        "manifests": [m.global_step for m in latest],
        "files_step4": {f.path: f.rank for f in newest.files},
        "sharded": newest.sharded,
        "resumed_step": sync.resumed_from_manifest.global_step if sync.resumed_from_manifest else None,
    }
    print(json.dumps(report))
    ok = newest.sharded is not None and ranks == list(range(DEVICES)) and report["resumed_step"] == 4
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
