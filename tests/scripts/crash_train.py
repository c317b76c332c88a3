"""Training processes for tests/test_crash_safety.py, forked from one warm parent.

``python tests/scripts/crash_train.py zygote`` imports torch, Lightning and trainctl once, then
serves JSON lines on stdin/stdout, one trial at a time:

    in:  {"url": ..., "ckpt_dir": ..., "cache_dir": ..., "log": ..., "max_steps": ..., ...}
    out: {"pid": <child>}                      once the child is forked
    out: {"exit": <child>, "status": <code>}   when it ends (status -9: SIGKILL)

Each child is an ordinary training run -- ``resume_path(url)``, then ``Trainer.fit`` with
``ModelCheckpoint`` + ``CheckpointSync(url)`` -- with its output in its own log file, where it
prints ``STARTED step=N`` when the training loop starts (N: the global step it resumed at),
``STEP N`` after every step and ``DONE step=N`` when ``fit`` returned. The test SIGKILLs it
directly. Forking skips the ~4 s import per trial; it is safe because this parent never runs a
torch op or starts a thread (it checks that it has a single thread before every fork), and the
env the test gives it caps BLAS/OpenMP pools at one thread.

A child dies with its parent (PR_SET_PDEATHSIG), and the parent with the test process, so an
aborted test leaves nothing running.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import lightning.pytorch as pl
import s3fs  # noqa: F401  (imported here so that children do not pay for it)
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tests.helpers.models import TinyRegressor, trainer_kwargs
from trainctl_lightning import CheckpointSync, resume_path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class Marker(Callback):
    """Reports progress in the log and slows steps down so a kill finds training running."""

    def __init__(self, step_sleep: float) -> None:
        self.step_sleep = step_sleep

    def on_train_start(self, trainer, pl_module) -> None:
        print(f"STARTED step={trainer.global_step}", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        print(f"STEP {trainer.global_step}", flush=True)
        time.sleep(self.step_sleep)


def run_trial(cfg: dict) -> None:
    import logging

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("trainctl_lightning").setLevel(logging.INFO)
    # what tests/test_crash_safety.py reads to tell where a kill landed (writing, publishing)
    logging.getLogger("trainctl_lightning.checkpoint").setLevel(logging.DEBUG)
    url = cfg["url"]
    print(f"BOOT pid={os.getpid()} url={url}", flush=True)
    path = resume_path(url, cache_dir=cfg["cache_dir"])
    print(f"RESUME {path}", flush=True)
    sync = CheckpointSync(url, keep_last=cfg.get("keep_last"))
    print(f"SESSION {sync.session}", flush=True)
    checkpoint = ModelCheckpoint(
        dirpath=cfg["ckpt_dir"],
        every_n_train_steps=1,
        save_last=True,
        save_top_k=2,
        monitor="step",
        mode="max",
    )
    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=cfg["max_steps"]),
        callbacks=[Marker(cfg["step_sleep"]), checkpoint, sync],
    )
    trainer.fit(TinyRegressor(width=cfg["width"]), ckpt_path=path)
    print(f"DONE step={trainer.global_step}", flush=True)


def _child(cfg: dict) -> None:
    status = 1
    try:
        _die_with_parent()
        log = os.open(cfg["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        run_trial(cfg)
        status = 0
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)  # never return into the parent's loop, nor run its atexit hooks


def _send(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def zygote() -> None:
    _die_with_parent()
    _send({"ready": os.getpid()})
    for line in sys.stdin:
        if not line.strip():
            continue
        cfg = json.loads(line)
        threads = len(os.listdir("/proc/self/task"))
        if threads != 1:
            _send({"error": f"refusing to fork with {threads} threads in the parent"})
            return
        pid = os.fork()
        if pid == 0:
            _child(cfg)
        _send({"pid": pid})
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        _send({"exit": pid, "status": code})


if __name__ == "__main__":
    if sys.argv[1:] != ["zygote"]:
        sys.exit("usage: python tests/scripts/crash_train.py zygote")
    zygote()
