"""Crash safety: SIGKILL a training process at random moments while it checkpoints, many times.

Each trial is a real training process (forked from a warm parent, see
``tests/scripts/crash_train.py``) that resumes with ``resume_path(url)`` from what the trials
before it published, trains with ``ModelCheckpoint`` + ``CheckpointSync(url)`` saving a few-MB
checkpoint twice a step, and is SIGKILLed at a random moment -- mid ``torch.save``, mid upload,
mid manifest write, mid deletion of a rotated-away checkpoint, or between checkpoints. After
every kill the store must show only complete checkpoints, the newest must verify and load, the
step must never go backwards, and the next trial must resume exactly from it. A last trial per
store is left to finish, and must end with its final step published.

Most trials use a ``file://`` store, every third one moto's S3 server. Environment:
``TRAINCTL_CRASH_TRIALS`` (killed trials, default 30), ``TRAINCTL_CRASH_SEED`` (replay a run).
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from trainctl_lightning import RunStore
from trainctl_lightning.checkpoint.io import PENDING_MARKER
from trainctl_lightning.store.layout import CHECKPOINT_MANIFEST as MANIFEST_NAME

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "scripts" / "crash_train.py"

WIDTH = 131_072  # TinyRegressor(width) + SGD momentum: ~10.5 MB per checkpoint file
STEP_SLEEP_S = 0.02  # training keeps running (and checkpointing twice a step) when the kill lands
KILL_WINDOW_S = 0.9  # the kill lands uniformly in [0, this) after the training loop started
KEEP_LAST = 4  # retention deletes run too, and can be killed midway as well
# Names ModelCheckpoint gives: top-k files (a -vN suffix when a killed run left one behind) and last.
_CKPT_NAME = re.compile(r"^(last|epoch=\d+-step=\d+)(-v\d+)?\.ckpt$")


class Zygote:
    """The warm parent process of crash_train.py: forks one trial at a time on request."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=REPO,
            env=env,
            text=True,
            bufsize=1,
        )
        self._messages: queue.Queue[dict | None] = queue.Queue()
        self._peeked: list[dict | None] = []
        self._reader = threading.Thread(target=self._read, name="zygote-reader", daemon=True)
        self._reader.start()
        self.child: int | None = None
        self._pidfd: int | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._messages.put(json.loads(line))
        self._messages.put(None)

    def _next(self, timeout: float) -> dict:
        try:
            message = self._peeked.pop(0) if self._peeked else self._messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"crash_train.py zygote said nothing for {timeout}s") from None
        if message is None or "error" in message:
            raise AssertionError(f"crash_train.py zygote failed: {message}; see {self._log.name}")
        return message

    def wait_ready(self, timeout: float = 120) -> None:
        assert "ready" in self._next(timeout)

    def spawn(self, cfg: dict) -> int:
        assert self.child is None
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cfg) + "\n")
        self.proc.stdin.flush()
        self.child = self._next(30)["pid"]
        try:  # a pidfd makes the kill race-free against pid reuse
            self._pidfd = os.pidfd_open(self.child)
        except (AttributeError, OSError):
            self._pidfd = None
        return self.child

    def exited(self) -> dict | None:
        """The child's exit message, if it has ended (does not block)."""
        if not self._peeked:
            try:
                self._peeked.append(self._messages.get_nowait())  # a peek: wait_exit() takes it
            except queue.Empty:
                return None
        return self._peeked[0]

    def kill(self) -> None:
        if self.child is None:
            return
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            elif self.exited() is None:
                os.kill(self.child, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait_exit(self, timeout: float) -> int:
        message = self._next(timeout)
        assert message.get("exit") == self.child, message
        self.child = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        return message["status"]

    def close(self) -> None:
        try:
            if self.child is not None:
                self.kill()
                try:
                    self.wait_exit(30)
                except AssertionError:
                    pass
        finally:
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
            if self.proc.stdin is not None:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # its children die with it (PR_SET_PDEATHSIG)
                self.proc.wait(timeout=15)
            self._reader.join(timeout=5)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._log.close()


@dataclass
class Run:
    """One store URL and the local checkpoint folder its trials share, as a restarted job would."""

    kind: str
    url: str
    ckpt_dir: Path
    latest_id: str | None = None
    latest_step: int | None = None
    trials: int = 0
    orphans: set[str] = field(default_factory=set)


def _log_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _wait_for_start(zygote: Zygote, log: Path, timeout: float = 120) -> int:
    """The global step the trial's training loop started at (its STARTED line)."""
    deadline = time.monotonic() + timeout
    while True:
        match = re.search(r"^STARTED step=(\d+)$", _log_text(log), re.M)
        if match:
            return int(match.group(1))
        if zygote.exited() is not None:
            raise AssertionError(f"trial ended before training started:\n{_log_text(log)[-5000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"trial did not start training in {timeout}s:\n{_log_text(log)[-5000:]}")
        time.sleep(0.005)


def _store_objects(store: RunStore) -> dict[str, set[str]]:
    """checkpoint folder -> object names in it, read behind the store's back."""
    base = store.objects.path("checkpoints")
    store.objects.fs.invalidate_cache()
    try:
        paths = store.objects.fs.find(base)
    except FileNotFoundError:
        return {}
    folders: dict[str, set[str]] = {}
    for path in paths:
        rel = path[len(base) :].strip("/").split("/")
        if len(rel) >= 2:
            folders.setdefault(rel[0], set()).add("/".join(rel[1:]))
    return folders


def _settled_listing(store: RunStore, settle: bool) -> list:
    """list_checkpoints(); on S3, once the server has finished what a dead client had sent."""
    listing = store.list_checkpoints()
    if not settle:
        return listing
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.25)
        again = store.list_checkpoints()
        if [m.id for m in again] == [m.id for m in listing]:
            return again
        listing = again
    return listing


def _check_store(run: Run, tmp_path: Path, context: str) -> tuple[int, int]:
    """Everything a reader can see after a kill is complete; returns (published, new orphans)."""
    store = RunStore(run.url)
    listing = _settled_listing(store, settle=run.kind == "s3")
    objects = _store_objects(store)
    for manifest in listing:
        # Only checkpoints ModelCheckpoint named -- never a staging, partial or temporary file.
        assert _CKPT_NAME.match(manifest.name), f"{context}: published {manifest.name!r} ({manifest.id})"
        assert [f.path for f in manifest.files] == [manifest.name], f"{context}: {manifest}"
        for part in (manifest.name, manifest.id, *(f.path for f in manifest.files)):
            assert ".trainctl-staging" not in part and ".partial" not in part and not part.endswith(".tmp"), (
                f"{context}: a leftover file was published: {manifest}"
            )
        assert manifest.global_step is not None and manifest.id.startswith(f"{manifest.global_step:010d}-")
        assert MANIFEST_NAME in objects.get(manifest.id, set())
        store.verify_checkpoint(manifest)  # every published checkpoint, not only the newest

    latest = store.latest_checkpoint()
    if listing:
        assert latest is not None and latest.id == listing[-1].id
    if latest is None:
        assert run.latest_step is None, f"{context}: the store lost every checkpoint (had step {run.latest_step})"
    else:
        if run.latest_step is not None:
            assert latest.global_step >= run.latest_step, (
                f"{context}: latest went back from step {run.latest_step} to {latest.global_step} ({latest.id})"
            )
        path = store.download_checkpoint(latest, tmp_path / "downloads" / latest.id)
        state = torch.load(path, map_location="cpu", weights_only=False)
        assert state["global_step"] == latest.global_step, context
        assert state["state_dict"]["net.0.weight"].shape == (WIDTH, 8), context
        assert state["optimizer_states"] and state["loops"], context
        shutil.rmtree(tmp_path / "downloads")
        run.latest_id, run.latest_step = latest.id, latest.global_step

    # Folders with data but no manifest: an upload (or a deletion) the kill cut short.
    orphans = {folder for folder, names in objects.items() if MANIFEST_NAME not in names}
    new_orphans = orphans - run.orphans
    run.orphans = orphans
    return len(listing), len(new_orphans)


def _in_flight(log: Path) -> tuple[bool, bool]:
    """(a checkpoint file was being written, one was written but not yet published) at the kill,
    from the trial's debug log: the writer logs "writing ... (save #N)" and "(save #N) is on disk",
    the publisher "save #N <name>: <outcome>"."""
    text = _log_text(log)
    started = set(re.findall(r"trainctl: writing .* \(save #(\d+)\)$", text, re.M))
    on_disk = set(re.findall(r"\(save #(\d+)\) is on disk; publishing it$", text, re.M))
    ended = set(re.findall(r"trainctl: save #(\d+) \S+: \w+$", text, re.M))
    failed = set(re.findall(r"could not be written", text))
    return bool(started - on_disk) and not failed, bool(on_disk - ended)


def _trial_cfg(run: Run, tmp_path: Path, index: int, max_steps: int) -> tuple[dict, Path]:
    log = tmp_path / "logs" / f"trial-{index:03d}-{run.kind}.log"
    return (
        {
            "url": run.url,
            "ckpt_dir": str(run.ckpt_dir),
            "cache_dir": str(tmp_path / "cache" / f"{index:03d}"),
            "log": str(log),
            "max_steps": max_steps,
            "width": WIDTH,
            "step_sleep": STEP_SLEEP_S,
            "keep_last": KEEP_LAST,
        },
        log,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_at_random_moments_never_breaks_the_store_or_resume(s3, tmp_path):
    trials = int(os.environ.get("TRAINCTL_CRASH_TRIALS", "30"))
    seed = int(os.environ.get("TRAINCTL_CRASH_SEED", random.SystemRandom().randrange(2**31)))
    print(f"\ncrash test: {trials} killed trials, seed {seed} (rerun with TRAINCTL_CRASH_SEED={seed})")
    rng = random.Random(seed)
    runs = {
        "file": Run("file", f"file://{tmp_path}/store/run", tmp_path / "ckpts-file"),
        "s3": Run("s3", s3.url("crash"), tmp_path / "ckpts-s3"),
    }
    (tmp_path / "logs").mkdir()
    env = {
        **os.environ,
        **s3.env(),
        # No BLAS/OpenMP pool threads in the zygote: it forks, so it must stay single-threaded.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO),
    }
    started = time.monotonic()
    zygote = Zygote(env, tmp_path / "logs" / "zygote.log")
    kills: list[str] = []
    try:
        zygote.wait_ready()
        for index in range(trials):
            run = runs["s3"] if index % 3 == 2 else runs["file"]
            run.trials += 1
            cfg, log = _trial_cfg(run, tmp_path, index, max_steps=10**6)
            context = f"trial {index} ({run.kind}, seed {seed}, log {log.name})"
            before_id, before_step = run.latest_id, run.latest_step

            zygote.spawn(cfg)
            resumed_at = _wait_for_start(zygote, log)
            delay = rng.uniform(0, KILL_WINDOW_S)
            time.sleep(delay)
            assert zygote.exited() is None, f"{context}: ended on its own:\n{_log_text(log)[-5000:]}"
            zygote.kill()
            status = zygote.wait_exit(30)
            assert status == -signal.SIGKILL, f"{context}: exit status {status}:\n{_log_text(log)[-5000:]}"

            # It resumed from exactly what was published before it started, not from zero.
            text = _log_text(log)
            assert resumed_at == (before_step or 0), f"{context}: resumed at {resumed_at}, latest was {before_step}"
            if before_id is None:
                assert "RESUME None" in text, context
            else:
                assert f"/{before_id}/" in text.split("RESUME ", 1)[1].splitlines()[0], context
            steps = [int(s) for s in re.findall(r"^STEP (\d+)$", text, re.M)]

            writing, publishing = _in_flight(log)
            published, new_orphans = _check_store(run, tmp_path, context)
            where = "mid-write" if writing else "mid-publish" if (publishing or new_orphans) else "between"
            kills.append(where)
            print(
                f"  trial {index:2d} {run.kind:4s}: resumed at {resumed_at:3d}, killed {delay:.2f}s in "
                f"(last step {steps[-1] if steps else '-'}), {where}; store: {published} checkpoint(s), "
                f"latest step {run.latest_step}"
            )
            shutil.rmtree(cfg["cache_dir"], ignore_errors=True)

        # The normal restart, left alone this time: it resumes and runs to max_steps.
        for run in runs.values():
            start_step = run.latest_step or 0
            max_steps = start_step + 5
            cfg, log = _trial_cfg(run, tmp_path, trials + (run.kind == "s3"), max_steps=max_steps)
            context = f"final {run.kind} trial (seed {seed}, log {log.name})"
            zygote.spawn(cfg)
            status = zygote.wait_exit(180)
            text = _log_text(log)
            assert status == 0, f"{context}: exit status {status}:\n{text[-5000:]}"
            assert f"STARTED step={start_step}\n" in text, f"{context}:\n{text[-5000:]}"
            assert f"DONE step={max_steps}\n" in text, f"{context}:\n{text[-5000:]}"
            _check_store(run, tmp_path, context)
            assert run.latest_step == max_steps, f"{context}: latest published step {run.latest_step}"
            # What killed runs left in the shared local folder was cleaned up, never published.
            hidden = sorted(p.name for p in run.ckpt_dir.iterdir() if p.name.startswith("."))
            assert not hidden, f"{context}: temporary files left behind: {hidden}"
            placeholders = sorted(p.name for p in run.ckpt_dir.glob("*.ckpt") if p.read_bytes() == PENDING_MARKER)
            assert not placeholders, f"{context}: placeholders of unfinished saves left behind: {placeholders}"
    finally:
        zygote.close()

    elapsed = time.monotonic() - started
    counts = {where: kills.count(where) for where in ("mid-write", "mid-publish", "between")}
    print(f"crash test: {trials} kills {counts}, {elapsed:.0f}s, seed {seed}")
    assert zygote.proc.returncode == 0, f"zygote exit status {zygote.proc.returncode}"
    assert runs["file"].trials and (runs["s3"].trials or trials < 3)
    if trials >= 10:
        # The test means something only if kills keep landing while checkpoints are in flight.
        in_flight = counts["mid-write"] + counts["mid-publish"]
        assert in_flight >= trials // 4, f"only {in_flight}/{trials} kills landed mid-checkpoint: {counts}"
