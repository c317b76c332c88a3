"""Running the agent as a real subprocess against a job written straight into a store."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import fsspec

from tests.helpers.provider_contract import FAST
from trainctl_lightning.jobs.spec import EnvMode, JobSpec, new_run_id
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.store.layout import run_url_in
from trainctl_lightning.timeutil import utc_now

AGENT = [sys.executable, "-m", "trainctl_lightning.agent", "run"]


def make_job(store_url: str, workdir: Path | None = None, files: dict[str, str] | None = None, **job) -> JobStore:
    """Write a job spec; ``files`` are put in the code root the agent uses when no code is synced."""
    run_id = new_run_id("agent-test")
    run_url = run_url_in(store_url, run_id)
    spec = JobSpec(run_id=run_id, run_url=run_url, created_at=utc_now(), **{**FAST, "env_mode": EnvMode.REUSE, **job})
    for rel, text in (files or {}).items():
        path = workdir / "runs" / run_id / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    jobs = JobStore(run_url)
    jobs.write_spec(spec)
    return jobs


#: Agents ``start`` launched and no one has stopped yet (see ``stop_started_agents``).
_started: list[subprocess.Popen] = []


def start(jobs: JobStore, workdir: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(
        [*AGENT, "--run-url", jobs.url, "--workdir", str(workdir)],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _started.append(proc)
    return proc


def stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """Stop an agent if it still runs: SIGTERM makes it stop its job first; SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.communicate(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.communicate()  # reap it and close its pipes


def stop_started_agents() -> None:
    """Stop every agent started by ``start`` that a test left running (it failed before its end)."""
    while _started:
        stop(_started.pop())


def run(jobs: JobStore, workdir: Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = start(jobs, workdir, env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def store_objects(url: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return {p: fs.cat_file(p) for p in fs.find(root)}
