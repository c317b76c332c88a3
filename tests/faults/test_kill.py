"""SIGKILL of the agent and of the job (local provider, real processes): no orphan survives
`stop`/`terminate`, the working directory goes only after the job's processes, and the run's
state says what happened."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.helpers.cli import trainctl
from tests.helpers.leftovers import assert_nothing_running
from tests.helpers.provider_contract import python_job, submit, wait_for
from trainctl_lightning.agent.jobproc import JOBS_DIR, JobProcess, process_start_time, write_job_record
from trainctl_lightning.jobs.spec import JobPhase, JobState
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.providers.api import Instance, InstanceState
from trainctl_lightning.providers.local import LocalProvider

#: A job that ignores SIGTERM (so it outlives its agent's death signal) and starts a child in
#: its process group that ignores it too and holds the job's output pipe.
STUBBORN_JOB = python_job(
    "import signal, subprocess, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "print('child', child.pid, flush=True)\n"
    "time.sleep(120)"
)
#: A job that prints, starts a child holding its output pipe, and sleeps.
SLEEPY_JOB = python_job(
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "print('child', child.pid, flush=True)\n"
    "time.sleep(120)"
)


@pytest.fixture
def provider() -> LocalProvider:
    return LocalProvider()


@pytest.fixture
def instance(provider: LocalProvider) -> Iterator[Instance]:
    created = provider.create()
    yield created
    provider.terminate(created.id)  # no-op when the test terminated it


@pytest.fixture
def file_store(tmp_path: Path) -> str:
    return f"file://{tmp_path}/store"


def running_pid(state: JobState) -> int:
    assert state.pid is not None, state
    return state.pid


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it runs no more)."""
    return process_start_time(pid) is not None


def child_pid(jobs: JobStore) -> int:
    match = wait_until(lambda: re.search(rb"child (\d+)", jobs.read_logs()), what="the job to print its child's pid")
    assert match is not None
    return int(match.group(1))


def kill_agent(provider: LocalProvider, instance: Instance) -> int:
    [agent] = provider.describe(instance.id).details["agents"]
    assert agent["alive"]
    os.kill(agent["pid"], signal.SIGKILL)
    wait_until(lambda: not provider.describe(instance.id).details["agents"][0]["alive"], what="the agent to die")
    return int(agent["pid"])


class WorkdirWatch:
    """Watches, while a stop runs, for the working directory vanishing while a job process still runs."""

    def __init__(self, work: str, pids: list[int]) -> None:
        self.work, self.pids = work, pids
        self.violations: list[str] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._done.is_set():
            left = [p for p in self.pids if alive(p)]
            if left and not os.path.exists(self.work):
                self.violations.append(f"{self.work} was removed while {left} still ran")
            self._done.wait(0.005)

    def __enter__(self) -> WorkdirWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def test_terminate_ends_the_process_group_of_a_job_whose_agent_was_killed(
    provider: LocalProvider, instance: Instance, file_store: str
) -> None:
    jobs = submit(provider, instance, file_store, **STUBBORN_JOB)
    state = wait_for(jobs, {JobPhase.RUNNING})
    pid = running_pid(state)
    child = child_pid(jobs)
    work = instance.details["workdir"]
    [record] = (Path(work) / JOBS_DIR).glob("*.json")
    assert json.loads(record.read_text())["pid"] == pid

    agent_pid = kill_agent(provider, instance)
    # the death signal (SIGTERM) is ignored by this job: without `terminate` it would run on
    assert alive(pid) and alive(child)

    with WorkdirWatch(work, [pid, child]) as watch:
        result = trainctl("terminate", instance.id, "--output", "json")
    assert result.returncode == 0, result.stderr
    assert watch.violations == []
    assert not alive(pid) and not alive(child)
    assert not os.path.exists(work)

    terminated = json.loads(result.stdout)
    assert terminated["state"] == InstanceState.TERMINATED.value
    note = (
        f"agent pid {agent_pid} of run {state.run_id} was dead; its job's process group {pid} "
        "killed with SIGKILL after 2s of SIGTERM"
    )
    assert terminated["details"]["notes"] == [note]
    final = jobs.read_state()
    assert final is not None and final.phase is JobPhase.FAILED and final.error == note
    assert_nothing_running()


def test_stop_ends_an_orphaned_job_and_says_so(provider: LocalProvider, instance: Instance, file_store: str) -> None:
    jobs = submit(provider, instance, file_store, **STUBBORN_JOB)
    state = wait_for(jobs, {JobPhase.RUNNING})
    pid = running_pid(state)
    child = child_pid(jobs)
    kill_agent(provider, instance)

    result = trainctl("stop", instance.id)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{instance.id}: stopped"
    assert f"its job's process group {pid} killed with SIGKILL" in lines[1]
    assert not alive(pid) and not alive(child)
    assert os.path.exists(instance.details["workdir"])  # stop keeps the disk
    provider.terminate(instance.id)
    assert_nothing_running()


def test_a_job_dies_with_its_agent(provider: LocalProvider, instance: Instance, file_store: str) -> None:
    jobs = submit(provider, instance, file_store, **SLEEPY_JOB)
    state = wait_for(jobs, {JobPhase.RUNNING})
    pid = running_pid(state)
    child = child_pid(jobs)
    agent_pid = kill_agent(provider, instance)
    # nobody watches it any more: it gets SIGTERM at once (the death signal), not an hour later
    wait_until(lambda: not alive(pid), timeout=10, what="the job to die with its agent")

    terminated = provider.terminate(instance.id)
    assert not alive(child)  # what the job left in its group went with `terminate`
    note = f"agent pid {agent_pid} of run {state.run_id} was dead; its job's process group {pid} ended on SIGTERM"
    assert terminated.details["notes"] == [note]
    final = jobs.read_state()
    assert final is not None and final.phase is JobPhase.FAILED and final.error == note
    assert_nothing_running()


def test_a_killed_job_fails_with_a_clear_line_and_its_agent_exits(
    provider: LocalProvider, instance: Instance, file_store: str
) -> None:
    jobs = submit(provider, instance, file_store, **SLEEPY_JOB)
    state = wait_for(jobs, {JobPhase.RUNNING})
    pid = running_pid(state)
    child = child_pid(jobs)  # holds the output pipe: the agent must not wait on it forever
    os.kill(pid, signal.SIGKILL)

    final = wait_for(jobs, timeout=30)
    assert final.phase is JobPhase.FAILED
    assert final.exit_code == 128 + signal.SIGKILL
    assert final.error is not None and final.error.startswith("the job was killed by SIGKILL, not by trainctl")
    wait_until(lambda: not provider.describe(instance.id).details["agents"][0]["alive"], what="the agent to exit")
    assert not alive(child)
    assert not list((Path(instance.details["workdir"]) / JOBS_DIR).glob("*.json"))  # the agent cleaned up
    provider.terminate(instance.id)
    assert_nothing_running()


def test_a_recorded_job_whose_pid_was_reused_is_never_signalled(provider: LocalProvider, instance: Instance) -> None:
    # a stranger now holds the pid (and group) a dead agent's job record names, with another start time
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        record = JobProcess(
            run_id="gone-run",
            run_url="file:///nowhere/gone-run",
            pid=stranger.pid,
            start_time=(process_start_time(stranger.pid) or 0) + 1,
            agent_pid=stranger.pid,
            stop_grace_s=0.1,
        )
        write_job_record(Path(instance.details["workdir"]), record)
        terminated = provider.terminate(instance.id)
        assert stranger.poll() is None  # still running: never signalled
        assert terminated.state is InstanceState.TERMINATED and "notes" not in terminated.details
    finally:
        stranger.kill()
        stranger.wait()


def test_a_run_whose_agent_died_ends_failed_saying_so(provider: LocalProvider, instance: Instance, file_store: str) -> None:
    jobs = submit(provider, instance, file_store, **python_job("import time; print('up', flush=True); time.sleep(120)"))
    state = wait_for(jobs, {JobPhase.RUNNING})
    pid = running_pid(state)
    agent_pid = kill_agent(provider, instance)
    wait_until(lambda: not alive(pid), timeout=10, what="the job to die with its agent")
    current = jobs.read_state()
    assert current is not None and current.phase is JobPhase.RUNNING  # nobody was left to say otherwise

    terminated = provider.terminate(instance.id)
    note = f"agent pid {agent_pid} of run {state.run_id} died before the job ended"
    assert terminated.details["notes"] == [note]
    final = jobs.read_state()
    assert final is not None and final.phase is JobPhase.FAILED and final.error == note
    assert_nothing_running()
