"""The local provider: the contract, and what only a local instance can show (real processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers.provider_contract import (
    ProviderContract,
    python_job,
    submit,
    wait_for,
)
from trainctl_lightning.errors import ConfigError, InstanceNotFoundError, ProviderError
from trainctl_lightning.jobs.spec import JobPhase, JobState
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.providers import get_provider
from trainctl_lightning.providers.api import (
    AgentLaunch,
    Instance,
    InstanceSpec,
    InstanceState,
)
from trainctl_lightning.providers.local import (
    LocalProvider,
    process_alive,
    process_start_time,
)

SLEEP_JOB = python_job("import time; print('up', flush=True); time.sleep(60)")


@pytest.fixture
def provider() -> LocalProvider:
    return LocalProvider()


@pytest.fixture(params=["file", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('s3').bucket}/store"
    return f"file://{tmp_path}/store"


@pytest.fixture
def file_store(tmp_path) -> str:
    return f"file://{tmp_path}/store"


def agents_of(provider: LocalProvider, instance_id: str) -> list[dict]:
    return provider.describe(instance_id).details["agents"]


def running(provider: LocalProvider, instance: Instance, states: list[JobState], wait_s: float = 5.0) -> list[str]:
    """Agents and jobs of ``instance`` still alive after ``wait_s`` (agents exit just after the final state)."""
    deadline = time.monotonic() + wait_s
    while True:
        left = [f"agent {a['pid']}" for a in provider.describe(instance.id).details.get("agents", []) if a["alive"]]
        left += [f"job {s.pid}" for s in states if s.pid and process_start_time(s.pid) is not None]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


class TestLocalProvider(ProviderContract):
    runs_jobs = True
    unknown_instance_id = "local-00000000"

    def leftover_processes(self, provider, instance, states):
        return running(provider, instance, states)

    # ------------------------------------------------------------ local specifics

    def test_instance_type_refused_with_a_hint(self, provider: LocalProvider) -> None:
        with pytest.raises(ConfigError) as err:
            provider.create_dryrun(InstanceSpec(instance_type="g5.xlarge"))
        assert str(err.value) == (
            "the local provider has one instance type, 'local'; got 'g5.xlarge' (use --provider aws for EC2 types)"
        )
        for spec in (InstanceSpec(spot=True), InstanceSpec(image="ami-123"), InstanceSpec(region="us-east-1")):
            with pytest.raises(ConfigError):
                provider.create_dryrun(spec)
        assert provider.list(include_terminated=True) == []

    def test_dryrun_names_the_working_directory(self, provider: LocalProvider) -> None:
        plan = provider.create_dryrun(InstanceSpec(instance_type="local"))
        assert plan.resources == [f"working directory {plan.request['workdir']}"]
        assert plan.price_per_hour == 0.0
        assert not os.path.exists(plan.request["workdir"])

    def test_registry_and_store_protocols(self, provider: LocalProvider, file_store: str) -> None:
        assert isinstance(get_provider("local"), LocalProvider)
        provider.check_store(file_store)
        provider.check_store("s3://bucket/runs")
        with pytest.raises(ConfigError, match="memory://"):
            provider.check_store("memory://runs")

    def test_state_survives_a_new_provider_object_and_a_separate_process(self, provider: LocalProvider) -> None:
        instance = provider.create(InstanceSpec(name="persisted"))
        assert LocalProvider().describe(instance.id).name == "persisted"
        script = textwrap.dedent(
            f"""
            import json
            from trainctl_lightning.providers.local import LocalProvider
            p = LocalProvider()
            print(json.dumps([i.id for i in p.list()]))
            p.stop({instance.id!r})
            """
        )
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
        assert json.loads(out.stdout) == [instance.id]
        assert provider.describe(instance.id).state is InstanceState.STOPPED
        provider.terminate(instance.id)
        assert instance.id not in [i.id for i in LocalProvider().list()]

    def test_list_is_newest_first(self, provider: LocalProvider) -> None:
        first = provider.create()
        time.sleep(0.01)
        second = provider.create()
        assert [i.id for i in provider.list()] == [second.id, first.id]
        for inst in (first, second):
            provider.terminate(inst.id)

    def test_terminate_removes_the_working_directory_keeps_the_record(self, provider: LocalProvider) -> None:
        instance = provider.create()
        work = instance.details["workdir"]
        (open(os.path.join(work, "scratch.txt"), "w")).close()
        terminated = provider.terminate(instance.id)
        assert terminated.state is InstanceState.TERMINATED and not os.path.exists(work)
        assert provider.describe(instance.id).details["terminated_at"]

    def test_stop_kills_a_running_agent_and_its_job(self, provider: LocalProvider, instance: Instance, file_store: str) -> None:
        jobs = submit(provider, instance, file_store, **SLEEP_JOB)
        state = wait_for(jobs, {JobPhase.RUNNING})
        [agent] = agents_of(provider, instance.id)
        assert agent["alive"] and process_start_time(state.pid) is not None

        stopped = provider.stop(instance.id)
        assert stopped.state is InstanceState.STOPPED
        final = wait_for(jobs, timeout=5)
        assert final.phase is JobPhase.CANCELLED
        assert final.error == "agent received SIGTERM: the instance is stopping"
        assert running(provider, instance, [state], wait_s=0) == []
        with pytest.raises(ProviderError, match="stopped"):
            submit(provider, stopped, file_store, module="platform")

    def test_stop_lets_a_job_finish_saving_after_sigterm(
        self, provider: LocalProvider, instance: Instance, file_store: str
    ) -> None:
        """A job that takes a while to save on SIGTERM (as Lightning publishing a checkpoint does)
        is not killed halfway by `trainctl stop`."""
        code = (
            "import signal, sys, time\n"
            "def save(*_):\n"
            "    time.sleep(12); print('SAVED', flush=True); sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, save)\n"
            "print('up', flush=True)\n"
            "time.sleep(120)"
        )
        jobs = submit(provider, instance, file_store, stop_grace_s=30, **python_job(code))
        wait_for(jobs, {JobPhase.RUNNING})
        deadline = time.monotonic() + 30
        while b"up" not in jobs.read_logs() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert provider.stop(instance.id).state is InstanceState.STOPPED
        final = wait_for(jobs, timeout=5)
        assert final.phase is JobPhase.CANCELLED and b"SAVED" in jobs.read_logs()

    def test_max_runtime_times_the_job_out(self, provider: LocalProvider, instance: Instance, file_store: str) -> None:
        jobs = submit(provider, instance, file_store, max_runtime_s=1.0, **SLEEP_JOB)
        state = wait_for(jobs, timeout=20)
        assert state.phase is JobPhase.TIMED_OUT
        assert state.error == "stopped after the max runtime of 1s"
        assert state.exit_code == 128 + 15  # SIGTERM
        assert b"up" in jobs.read_logs()
        assert running(provider, instance, [state]) == []

    def test_agent_terminates_an_instance_it_owns(self, file_store: str, tmp_path) -> None:
        provider = LocalProvider(tmp_path / "elsewhere")  # the agent finds it there too
        instance = provider.create()
        jobs = submit(provider, instance, file_store, module="platform", terminate_instance_after=True)
        assert wait_for(jobs).phase is JobPhase.SUCCEEDED
        deadline = time.monotonic() + 10
        while provider.describe(instance.id).state is not InstanceState.TERMINATED and time.monotonic() < deadline:
            time.sleep(0.05)
        released = provider.describe(instance.id)
        assert released.state is InstanceState.TERMINATED and released.details["terminated_by"] == "agent"
        assert not os.path.exists(released.details["workdir"])
        assert running(provider, instance, []) == []

    def test_agent_outlives_the_process_that_started_it(
        self, provider: LocalProvider, instance: Instance, file_store: str
    ) -> None:
        script = textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
            from tests.helpers.provider_contract import python_job, submit
            from trainctl_lightning.providers.local import LocalProvider
            p = LocalProvider()
            jobs = submit(p, p.describe({instance.id!r}), {file_store!r},
                          **python_job("import time; print('up', flush=True); time.sleep(60)"))
            print(jobs.url)
            """
        )
        launcher = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert launcher.returncode == 0, launcher.stderr
        jobs = JobStore(launcher.stdout.strip())
        state = wait_for(jobs, {JobPhase.RUNNING})
        [agent] = agents_of(provider, instance.id)
        assert agent["alive"]
        with open(f"/proc/{agent['pid']}/stat") as f:  # its parent is gone: it was reparented
            assert int(f.read().rsplit(")", 1)[1].split()[1]) != os.getpid()
        jobs.request_cancel("done watching")
        assert wait_for(jobs, timeout=20).phase is JobPhase.CANCELLED
        assert running(provider, instance, [state]) == []

    def test_forwarded_environment_reaches_the_job_not_the_store(
        self, provider: LocalProvider, instance: Instance, file_store: str, tmp_path
    ) -> None:
        secret = "hunter2-" + os.urandom(4).hex()
        jobs = submit(
            provider,
            instance,
            file_store,
            forward_env={"MY_API_TOKEN": secret},
            **python_job("import os; print('token length', len(os.environ['MY_API_TOKEN']))"),
        )
        assert wait_for(jobs).phase is JobPhase.SUCCEEDED
        assert f"token length {len(secret)}".encode() in jobs.read_logs()
        for root in (tmp_path / "store", provider.root):
            for dirpath, _, files in os.walk(root):
                for name in files:
                    with open(os.path.join(dirpath, name), "rb") as f:
                        assert secret.encode() not in f.read(), os.path.join(dirpath, name)

    def test_a_reused_pid_is_never_signalled(self, provider: LocalProvider, instance: Instance) -> None:
        # a record whose agent pid now belongs to someone else (here: this test process)
        with provider._locked(instance.id):
            record = provider._read(instance.id)
            record.details["agents"].append({"run_id": "old", "pid": os.getpid(), "start_time": 1})
            provider._write(record)
        assert not process_alive(os.getpid(), 1)
        assert provider.stop(instance.id).state is InstanceState.STOPPED  # and we are still here

    def test_start_agent_failure_is_reported(self, provider: LocalProvider, instance: Instance) -> None:
        with pytest.raises(ProviderError):
            provider.start_agent(provider.terminate(instance.id), AgentLaunch("r", "file:///nowhere/r"))
        with pytest.raises(InstanceNotFoundError):
            provider.describe("../../etc")
