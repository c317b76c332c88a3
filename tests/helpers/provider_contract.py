"""The contract every provider keeps, as tests each provider's test module subclasses in one line.

Usage, in ``tests/test_provider_<name>.py``::

    @pytest.fixture
    def provider():
        return MyProvider(...)

    @pytest.fixture
    def store_url(...):      # a store the provider's instances can reach
        ...

    class TestMyProvider(ProviderContract):
        runs_jobs = True     # the agent really runs here (local); False for mocked clouds

Not collected by itself (no ``Test`` prefix).
"""

from __future__ import annotations

import time
from typing import ClassVar

import pytest

from trainctl_lightning.errors import ConfigError, InstanceNotFoundError
from trainctl_lightning.jobs.spec import (
    EnvMode,
    JobPhase,
    JobSpec,
    JobState,
    new_run_id,
)
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.providers.api import (
    AgentLaunch,
    Instance,
    InstanceSpec,
    InstanceState,
    Provider,
)
from trainctl_lightning.store.layout import TAG_MANAGED_BY, TAG_OWNER, run_url_in
from trainctl_lightning.timeutil import utc_now

#: Short intervals: tests should see logs, heartbeats and stops within a second or two.
FAST = dict(log_interval_s=0.2, heartbeat_interval_s=0.5, stop_grace_s=2.0)


def python_job(code: str) -> dict:
    """Job arguments that run a line of Python with no code synced (``python -m timeit`` runs it once)."""
    return dict(module="timeit", args=["-n", "1", "-r", "1", code])


def submit(provider: Provider, instance: Instance, store_url: str, forward_env: dict[str, str] | None = None, **job) -> JobStore:
    """Write a job for ``instance`` into the store and start its agent, as ``trainctl launch`` does."""
    run_id = new_run_id(job.pop("stem", "contract"))
    run_url = run_url_in(store_url, run_id)
    spec = JobSpec(
        run_id=run_id,
        run_url=run_url,
        created_at=utc_now(),
        provider=provider.name,
        instance_id=instance.id,
        forward_env=sorted(forward_env or {}),
        **{**FAST, "env_mode": EnvMode.REUSE, **job},
    )
    jobs = JobStore(run_url)
    jobs.write_spec(spec)
    jobs.write_state(JobState(run_id=run_id, phase=JobPhase.QUEUED, updated_at=utc_now(), queued_at=spec.created_at))
    provider.start_agent(instance, AgentLaunch(run_id=run_id, run_url=run_url, forward_env=dict(forward_env or {})))
    return jobs


def wait_for(jobs: JobStore, phases: set[JobPhase] | None = None, timeout: float = 60.0) -> JobState:
    """The job's state once it reaches one of ``phases`` (default: any terminal phase)."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = jobs.read_state()
        if state is not None and (state.phase in phases if phases else state.phase.is_terminal()):
            return state
        time.sleep(0.1)
    raise AssertionError(f"job {jobs.url} did not reach {phases or 'a terminal phase'} in {timeout}s; last state: {state}")


class ProviderContract:
    """Shared tests. Subclasses set ``runs_jobs`` and may override the hooks below."""

    #: The agent really runs on this provider's instances in the test environment.
    runs_jobs: ClassVar[bool] = False
    #: An instance type the provider must refuse.
    invalid_instance_type: ClassVar[str] = "no-such-type.9xhuge"
    #: A well-formed id no instance has.
    unknown_instance_id: ClassVar[str] = "i-0123456789abcdef0"

    def instance_spec(self, **overrides) -> InstanceSpec:
        return InstanceSpec(**{"tags": {"team": "vision", "purpose": "contract-test"}, "name": "contract", **overrides})

    def leftover_processes(self, provider: Provider, instance: Instance, states: list[JobState]) -> list[str]:
        """What still runs for these jobs on the instance, in words (override where it can be seen)."""
        return []

    @pytest.fixture
    def instance(self, provider: Provider):
        created = provider.create(self.instance_spec())
        yield created
        provider.terminate(created.id)

    # ------------------------------------------------------------ instances

    def test_dryrun_creates_nothing_and_describes_it(self, provider: Provider) -> None:
        before = [i.id for i in provider.list(include_terminated=True)]
        plan = provider.create_dryrun(self.instance_spec())
        text = plan.describe()
        assert plan.instance_type in text
        assert f"{TAG_MANAGED_BY}=" in text and "team=vision" in text
        assert repr(plan) == text
        assert [i.id for i in provider.list(include_terminated=True)] == before

    def test_create_lists_tags_and_describes(self, provider: Provider, instance: Instance) -> None:
        assert instance.state.is_usable()
        assert instance.tags[TAG_MANAGED_BY] and instance.tags[TAG_OWNER]
        assert instance.tags["team"] == "vision"
        assert instance.id in [i.id for i in provider.list()]
        described = provider.describe(instance.id)
        assert described.id == instance.id and described.tags == instance.tags
        assert described.provider == provider.name

    def test_stop(self, provider: Provider, instance: Instance) -> None:
        stopped = provider.stop(instance.id)
        assert stopped.state in (InstanceState.STOPPED, InstanceState.STOPPING)
        assert provider.describe(instance.id).state in (InstanceState.STOPPED, InstanceState.STOPPING)

    def test_terminate_is_idempotent(self, provider: Provider, instance: Instance) -> None:
        first = provider.terminate(instance.id)
        second = provider.terminate(instance.id)
        assert first.state.is_terminal() or first.state is InstanceState.TERMINATING
        assert second.id == instance.id and second.state == provider.describe(instance.id).state
        assert instance.id not in [i.id for i in provider.list()]
        assert instance.id in [i.id for i in provider.list(include_terminated=True)]

    def test_unknown_instance(self, provider: Provider) -> None:
        for call in (provider.describe, provider.stop, provider.terminate):
            with pytest.raises(InstanceNotFoundError):
                call(self.unknown_instance_id)

    def test_invalid_instance_type_creates_nothing(self, provider: Provider) -> None:
        before = [i.id for i in provider.list(include_terminated=True)]
        with pytest.raises(ConfigError, match=self.invalid_instance_type.replace(".", r"\.")):
            provider.create(self.instance_spec(instance_type=self.invalid_instance_type))
        assert [i.id for i in provider.list(include_terminated=True)] == before

    # ------------------------------------------------------------ jobs

    @pytest.fixture
    def job_instance(self, provider: Provider, instance: Instance):
        if not self.runs_jobs:
            pytest.skip(f"{type(provider).__name__} does not run the agent in this test environment")
        return instance

    def test_job_succeeds_with_its_output_in_the_logs(self, provider: Provider, job_instance: Instance, store_url: str) -> None:
        jobs = submit(provider, job_instance, store_url, module="platform")
        state = wait_for(jobs)
        assert state.phase is JobPhase.SUCCEEDED, state.error
        assert state.exit_code == 0 and state.ended_at and state.timings["total"] > 0
        import platform

        assert platform.platform().encode() in jobs.read_logs()
        assert self.leftover_processes(provider, job_instance, [state]) == []

    def test_failing_job_reports_exit_code_and_tail(self, provider: Provider, job_instance: Instance, store_url: str) -> None:
        jobs = submit(
            provider,
            job_instance,
            store_url,
            **python_job("import os, sys; print('starting'); sys.stderr.write('ValueError: bad batch\\n'); os._exit(3)"),
        )
        state = wait_for(jobs)
        assert state.phase is JobPhase.FAILED
        assert state.exit_code == 3 and "3" in state.error
        assert "ValueError: bad batch" in state.error_tail
        assert b"starting" in jobs.read_logs()
        assert self.leftover_processes(provider, job_instance, [state]) == []

    def test_cancel_request_stops_the_job(self, provider: Provider, job_instance: Instance, store_url: str) -> None:
        jobs = submit(provider, job_instance, store_url, **python_job("import time; print('up', flush=True); time.sleep(60)"))
        wait_for(jobs, {JobPhase.RUNNING})
        jobs.request_cancel("cancelled by the contract test")
        state = wait_for(jobs, timeout=20)
        assert state.phase is JobPhase.CANCELLED
        assert state.error == "cancelled by the contract test"
        assert self.leftover_processes(provider, job_instance, [state]) == []


__all__ = ["FAST", "ProviderContract", "python_job", "submit", "wait_for"]
