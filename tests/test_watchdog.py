"""The instance must not outlive its purpose: the agent's launcher watchdog and the launcher's heartbeat."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.helpers.agent import make_job, run
from tests.helpers.provider_contract import python_job, submit, wait_for
from trainctl_lightning.agent.watchdog import LauncherWatchdog
from trainctl_lightning.jobs.heartbeat import (
    LauncherHeartbeat,
    read_launcher_heartbeat,
    write_launcher_heartbeat,
)
from trainctl_lightning.jobs.spec import JobPhase
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.providers.api import InstanceSpec, InstanceState
from trainctl_lightning.providers.local import LocalProvider

SLEEP_JOB = python_job("import time; print('up', flush=True); time.sleep(60)")


@pytest.fixture
def file_store(tmp_path: Path) -> str:
    return f"file://{tmp_path}/store"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_watchdog_counts_only_silence_on_its_own_clock(file_store: str) -> None:
    jobs = JobStore(f"{file_store}/run")
    clock = Clock()
    dog = LauncherWatchdog(jobs, grace_s=10, clock=clock)
    clock.now += 9
    assert dog.check() is None, "the agent's start counts as a beat"
    clock.now += 2
    assert "it has written no heartbeat for 11s" in dog.check()
    write_launcher_heartbeat(jobs, seq=1)
    assert dog.check() is None
    clock.now += 10
    assert dog.check() is None
    write_launcher_heartbeat(jobs, seq=2)
    clock.now += 5
    assert dog.check() is None, "a changed heartbeat restarts the grace from when it is seen"
    clock.now += 11
    assert dog.check() == "the launcher is gone: its heartbeat has not changed for 11s (launcher_grace_s=10)"


def test_watchdog_does_not_count_an_unreadable_heartbeat(file_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = JobStore(f"{file_store}/run")
    clock = Clock()
    dog = LauncherWatchdog(jobs, grace_s=10, clock=clock)

    def outage(*args, **kwargs):
        raise OSError("store unreachable")

    monkeypatch.setattr(jobs.objects, "read", outage)
    clock.now += 60
    assert dog.check() is None


def test_launcher_heartbeat_refreshes_until_the_block_ends(file_store: str) -> None:
    jobs = JobStore(f"{file_store}/run")
    with LauncherHeartbeat(jobs, interval_s=0.05) as beat:
        wait_until(lambda: beat.beats >= 3, timeout=10, what="three heartbeats")
    first = read_launcher_heartbeat(jobs)
    assert beat.beats >= 3 and b"heartbeat_at" in first
    time.sleep(0.2)  # four intervals with no launcher: nothing to wait for, time must pass
    assert read_launcher_heartbeat(jobs) == first, "no beat after the block"


def test_a_job_whose_launcher_is_gone_is_cancelled_and_its_instance_released(file_store: str) -> None:
    provider = LocalProvider()
    instance = provider.create(InstanceSpec(name="watchdog"))
    try:
        jobs = submit(provider, instance, file_store, launcher_grace_s=2.0, terminate_instance_after=True, **SLEEP_JOB)
        with LauncherHeartbeat(jobs, interval_s=0.3):
            wait_for(jobs, {JobPhase.RUNNING}, timeout=30)
            time.sleep(3.0)  # longer than the grace: a live launcher keeps the job going
            assert jobs.read_state().phase is JobPhase.RUNNING
        gone = time.monotonic()
        state = wait_for(jobs, timeout=2.0 + 10)
        took = time.monotonic() - gone
        assert state.phase is JobPhase.CANCELLED
        assert state.error.startswith("the launcher is gone: its heartbeat has not changed for"), state.error
        assert took < 2.0 + 6, f"cancelled {took:.1f}s after the last heartbeat"
        wait_until(
            lambda: provider.describe(instance.id).state is InstanceState.TERMINATED,
            timeout=10,
            what="the agent to release its instance",
        )
        assert provider.describe(instance.id).details["terminated_by"] == "agent"
        assert "cancelling the job" in jobs.read_logs().decode()
    finally:
        provider.terminate(instance.id)


def test_no_watchdog_without_a_grace(file_store: str, tmp_path: Path) -> None:
    jobs = make_job(file_store, **python_job("import time; time.sleep(1.5)"))  # detached: launcher_grace_s None
    assert run(jobs, tmp_path / "work").returncode == 0
    assert jobs.read_state().phase is JobPhase.SUCCEEDED


def test_an_attached_launch_beats_and_a_detached_one_does_not(tmp_path: Path) -> None:
    from trainctl_lightning import launch as api

    project = tmp_path / "project"
    project.mkdir()
    (project / "job.py").write_text("print('hello', flush=True)\n")
    store = f"file://{tmp_path}/store"
    options = dict(project_dir=project, provider="local", store=store, on_output=lambda chunk: None)
    attached = api.launch(str(project / "job.py"), **options)
    assert attached.state().phase is JobPhase.SUCCEEDED
    assert attached.spec().launcher_grace_s == 600 and attached.spec().spot is False
    assert read_launcher_heartbeat(attached.job) is not None
    detached = api.launch(str(project / "job.py"), detach=True, **options)
    assert detached.spec().launcher_grace_s is None
    detached.wait(timeout=60)
    assert read_launcher_heartbeat(detached.job) is None
