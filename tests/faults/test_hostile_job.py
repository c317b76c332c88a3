"""A hostile store against the agent: only the launcher that holds the run's key chooses what an
instance runs. ``job.json`` is signed (``job.sig``); it names the code manifest's sha256, so the
signature covers the code as well."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tests.helpers import agent
from tests.helpers.provider_contract import FAST, python_job
from trainctl_lightning import runkey
from trainctl_lightning.jobs.spec import EnvMode, JobPhase, JobSpec, new_run_id
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.store import layout
from trainctl_lightning.store.layout import run_url_in
from trainctl_lightning.timeutil import utc_now


def signed_job(store_url: str, key: str, code: str) -> tuple[JobStore, JobSpec]:
    run_id = new_run_id("signed")
    spec = JobSpec(
        run_id=run_id,
        run_url=run_url_in(store_url, run_id),
        created_at=utc_now(),
        **{**FAST, "env_mode": EnvMode.REUSE, **python_job(code)},
    )
    jobs = JobStore(spec.run_url)
    jobs.write_spec(spec, key)
    return jobs, spec


def marker_code(path: Path) -> str:
    return f"open({str(path)!r}, 'w').write('ran')"


def test_the_agent_runs_a_job_signed_with_its_key(file_store: str, workdir: Path, tmp_path: Path) -> None:
    key = runkey.new_key()
    ran = tmp_path / "ran"
    jobs, _ = signed_job(file_store, key, marker_code(ran))
    assert jobs.objects.read(layout.JOB_SIGNATURE) is not None
    out = agent.run(jobs, workdir, env={runkey.RUN_KEY_ENV: key})
    assert out.returncode == 0, out.stderr
    assert ran.read_text() == "ran"
    state = jobs.read_state()
    assert state is not None and state.phase == JobPhase.SUCCEEDED


@pytest.mark.parametrize("attack", ["replaced", "unsigned", "other key", "other run"])
def test_a_job_spec_the_launcher_did_not_write_is_never_run(attack: str, file_store: str, workdir: Path, tmp_path: Path) -> None:
    key = runkey.new_key()
    planted = tmp_path / "planted-code-ran"
    jobs, spec = signed_job(file_store, key, "print('the real job')")
    forged = replace(spec, module="timeit", args=["-n", "1", "-r", "1", marker_code(planted)]).to_json()
    if attack == "replaced":  # the store writer swaps job.json after the launcher signed it
        jobs.objects.write(layout.JOB, forged)
    elif attack == "unsigned":
        jobs.objects.delete(layout.JOB_SIGNATURE)
        jobs.objects.write(layout.JOB, forged)
    elif attack == "other key":
        jobs.objects.write(
            layout.JOB_SIGNATURE, runkey.detached_signature(runkey.new_key(), forged, purpose="job", run_id=spec.run_id)
        )
        jobs.objects.write(layout.JOB, forged)
    else:  # a genuine signature, lifted from another run
        jobs.objects.write(layout.JOB_SIGNATURE, runkey.detached_signature(key, forged, purpose="job", run_id="other-run-1"))
        jobs.objects.write(layout.JOB, forged)

    out = agent.run(jobs, workdir, env={runkey.RUN_KEY_ENV: key})
    assert out.returncode == 1
    assert not planted.exists(), "the planted command ran"
    state = jobs.read_state()
    assert state is not None and state.phase == JobPhase.FAILED
    assert state.error is not None and "\n" not in state.error
    assert f"refusing {jobs.objects.url_of(layout.JOB)}" in state.error
    assert "Traceback" not in out.stderr


def test_without_a_key_the_job_runs_and_its_log_says_it_is_not_authenticated(file_store: str, workdir: Path) -> None:
    """An agent started by hand (or on AWS's shared profile) has nothing to check with: it says so."""
    jobs, _ = signed_job(file_store, runkey.new_key(), "print('hello')")
    out = agent.run(jobs, workdir, env={runkey.RUN_KEY_ENV: ""})
    assert out.returncode == 0, out.stderr
    assert b"job.json is not authenticated: this agent has no run key" in jobs.read_logs()
