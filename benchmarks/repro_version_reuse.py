#!/usr/bin/env python
"""Reproduction of issue 12's lost checkpoint: ModelCheckpoint's version counter reusing a name.

Lightning's ``test_ckpt_version_after_rerun_same_trainer`` with ``CheckpointSync`` attached, run
``--runs`` times (default 20): one Trainer fits 2 epochs, then 2 more, with
``ModelCheckpoint(save_top_k=-1, monitor="epoch", filename="test")``, so every epoch's save is a
new version (``test.ckpt``, ``test-v9.ckpt``, ...). A run *lost* a checkpoint when a name was
reused while its save was pending: fewer files than saves, a file holding another save's step,
or ``best_k_models`` naming files that are not there.

Output: one line per failing run, then one JSON line, e.g.
``{"benchmark": "repro_version_reuse", "runs": 20, "lost": 0, ...}``. Exit status 1 when any
run lost a checkpoint.

Usage::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/repro_version_reuse.py --runs 20
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

__all__ = ["main", "one_run"]

EXPECTED = {"test.ckpt", "test-v9.ckpt", "test-v10.ckpt", "test-v11.ckpt"}


def one_run(folder: Path) -> list[str]:
    """One rerun-same-trainer scenario with CheckpointSync; returns what went wrong (empty: nothing)."""
    import torch
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    from trainctl_lightning import CheckpointSync, RunStore

    ckpts = folder / "ckpts"
    url = f"file://{folder / 'store'}"
    mc = ModelCheckpoint(dirpath=ckpts, save_top_k=-1, monitor="epoch", filename="test")
    mc.STARTING_VERSION = 9
    trainer = Trainer(
        max_epochs=2,
        limit_train_batches=1,
        limit_val_batches=1,
        default_root_dir=folder,
        callbacks=[mc, CheckpointSync(url)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(BoringModel())
    trainer.fit_loop.max_epochs = 4
    trainer.fit(BoringModel())

    problems = []
    files = set(os.listdir(ckpts))
    if files != EXPECTED:
        problems.append(f"files {sorted(files)} != {sorted(EXPECTED)}")
    if {Path(p).name for p in mc.best_k_models} != EXPECTED:
        problems.append(f"best_k_models {sorted(Path(p).name for p in mc.best_k_models)}")
    steps = []
    for name in sorted(files):
        try:
            steps.append(torch.load(ckpts / name, map_location="cpu", weights_only=False)["global_step"])
        except Exception as exc:  # a placeholder or a torn file is exactly what this looks for
            problems.append(f"{name} does not load: {type(exc).__name__}: {exc}")
    if sorted(steps) != [1, 2, 3, 4]:
        problems.append(f"global steps on disk {sorted(steps)} != [1, 2, 3, 4] (a save was overwritten)")
    published = sorted(m.global_step or 0 for m in RunStore(url).list_checkpoints())
    if published != [1, 2, 3, 4]:
        problems.append(f"global steps in the store {published} != [1, 2, 3, 4]")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    started = time.monotonic()
    lost = 0
    with tempfile.TemporaryDirectory(prefix="trainctl-repro-") as tmp:
        for index in range(args.runs):
            problems = one_run(Path(tmp) / f"run-{index:03d}")
            if problems:
                lost += 1
                print(f"run {index}: LOST A CHECKPOINT: {'; '.join(problems)}", flush=True)
    elapsed = time.monotonic() - started
    print(f"repro_version_reuse: {lost} of {args.runs} runs lost or overwrote a checkpoint ({elapsed:.0f}s)")
    print(json.dumps({"benchmark": "repro_version_reuse", "runs": args.runs, "lost": lost, "seconds": round(elapsed, 1)}))
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
