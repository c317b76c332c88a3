"""The agent, run as the instance runs it (``python -m trainctl_lightning.agent run``) against a
real store: file:// and moto's S3."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.helpers.agent import make_job, run, start, store_objects
from tests.helpers.provider_contract import FAST, python_job, wait_for
from trainctl_lightning.agent.environment import (
    Requirements,
    collect_requirements,
    missing_requirements,
    script_metadata,
)
from trainctl_lightning.errors import SetupError
from trainctl_lightning.humanize import human_duration
from trainctl_lightning.jobs.spec import EnvMode, JobPhase, JobSpec, new_run_id
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.providers.local import process_start_time
from trainctl_lightning.store.layout import run_url_in
from trainctl_lightning.timeutil import utc_now


@pytest.fixture(params=["file", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('s3').bucket}/store"
    return f"file://{tmp_path}/store"


# ---------------------------------------------------------------- running and reporting


def test_output_arrives_in_chunks_while_the_job_runs(store_url: str, workdir: Path) -> None:
    jobs = make_job(
        store_url,
        **python_job("import time; print('first line', flush=True); time.sleep(2.0); print('second line')"),
    )
    agent = start(jobs, workdir)
    seen_first_while_running = False

    def ended() -> tuple | None:
        nonlocal seen_first_while_running
        state = jobs.read_state()
        logs = jobs.read_logs()  # read after the state: logs of a terminal state are complete
        if state is not None and state.phase.is_terminal():
            return state, logs
        if b"first line" in logs and b"second line" not in logs and state is not None and state.phase is JobPhase.RUNNING:
            seen_first_while_running = True
        return None

    state, logs = wait_until(ended, timeout=60, interval=0.1, what="the job to end")
    assert b"second line" in logs, "the last chunk is written before the terminal state"
    assert agent.wait(timeout=30) == 0
    assert seen_first_while_running, "the first line only arrived after the job ended"
    assert state.phase is JobPhase.SUCCEEDED and state.exit_code == 0
    assert len(jobs.read_log_chunks()) >= 2
    assert jobs.read_logs().index(b"first line") < jobs.read_logs().index(b"second line")
    assert set(state.timings) == {"fetch", "setup", "run", "total"}
    assert state.env_mode == "reused" and state.python == sys.executable
    assert state.queued_at and state.started_at and state.running_at and state.ended_at


def test_heartbeat_refreshes_the_state(file_store: str, workdir: Path) -> None:
    jobs = make_job(file_store, **python_job("import time; time.sleep(2)"))
    agent = start(jobs, workdir)
    first = wait_for(jobs, {JobPhase.RUNNING}, timeout=30)
    # the job sleeps 2s and prints nothing: only a heartbeat (every 0.5s) refreshes a running state
    second = wait_until(
        lambda: (s := jobs.read_state()).updated_at > first.updated_at and s, timeout=30, what="the state to be refreshed"
    )
    assert second.phase is JobPhase.RUNNING and second.updated_at > first.updated_at
    assert second.pid == first.pid and process_start_time(first.pid) is not None
    assert agent.wait(timeout=30) == 0


def test_failing_job_exit_code_tail_and_environment(file_store: str, workdir: Path) -> None:
    code = (
        "import os, sys; print('loading data'); print('RUN', os.environ['TRAINCTL_RUN_ID'], os.environ['TRAINCTL_RUN_URL'],"
        " os.environ['TRAINCTL_INSTANCE_ID'], os.environ['STAGE']); sys.stderr.write('Traceback: ValueError\\n'); os._exit(3)"
    )
    jobs = make_job(file_store, instance_id="local-0000abcd", env={"STAGE": "dev"}, **python_job(code))
    done = run(jobs, workdir)
    assert done.returncode == 3
    state = jobs.read_state()
    spec = jobs.read_spec()
    assert state.phase is JobPhase.FAILED and state.exit_code == 3
    assert state.error == "the job exited with code 3"
    assert state.error_tail.splitlines()[-1] == "Traceback: ValueError"
    assert f"RUN {spec.run_id} {spec.run_url} local-0000abcd dev".encode() in jobs.read_logs()
    local_log = (workdir / "logs" / f"{spec.run_id}.log").read_bytes()
    assert b"loading data" in local_log


def test_cancel_request_stops_the_job_with_sigterm(store_url: str, workdir: Path) -> None:
    # the job saves on SIGTERM, as Lightning does, and the agent waits for it
    code = (
        "import os, signal, time; "
        "signal.signal(signal.SIGTERM, lambda *a: (print('saving on SIGTERM', flush=True), os._exit(0))); "
        "print('training', flush=True); time.sleep(60)"
    )
    jobs = make_job(store_url, **python_job(code))
    agent = start(jobs, workdir)
    running = wait_for(jobs, {JobPhase.RUNNING}, timeout=30)
    wait_until(lambda: b"training" in jobs.read_logs(), timeout=30, what="the job's first output")
    jobs.request_cancel("the user pressed Ctrl-C")
    assert agent.wait(timeout=30) == 0
    state = jobs.read_state()
    assert state.phase is JobPhase.CANCELLED and state.error == "the user pressed Ctrl-C"
    assert b"saving on SIGTERM" in jobs.read_logs()
    assert process_start_time(running.pid) is None


def test_sigterm_to_the_agent_stops_the_job_and_kills_it_after_the_grace(file_store: str, workdir: Path) -> None:
    # a job that ignores SIGTERM is killed stop_grace_s later
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('stubborn', flush=True); time.sleep(60)"
    jobs = make_job(file_store, stop_grace_s=0.5, **python_job(code))
    agent = start(jobs, workdir)
    running = wait_for(jobs, {JobPhase.RUNNING}, timeout=30)
    wait_until(lambda: b"stubborn" in jobs.read_logs(), timeout=30, what="the job's first output")
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=30) == 128 + signal.SIGKILL
    state = jobs.read_state()
    assert state.phase is JobPhase.CANCELLED
    assert state.error == "agent received SIGTERM: the instance is stopping"
    assert state.exit_code == 128 + signal.SIGKILL
    assert process_start_time(running.pid) is None


def test_max_runtime(file_store: str, workdir: Path) -> None:
    jobs = make_job(file_store, max_runtime_s=0.5, **python_job("import time; time.sleep(60)"))
    assert run(jobs, workdir).returncode == 128 + signal.SIGTERM
    state = jobs.read_state()
    assert state.phase is JobPhase.TIMED_OUT and state.error == "stopped after the max runtime of 0.5s"
    assert b"[trainctl agent] timed_out: stopped after the max runtime" in jobs.read_logs()


def test_human_duration() -> None:
    assert human_duration(7200) == "2h00m"
    assert human_duration(5430) == "1h30m"
    assert human_duration(90) == "1m30s"
    assert human_duration(2) == "2s"


def test_missing_job_is_a_failed_state(file_store: str, workdir: Path) -> None:
    jobs = JobStore(run_url_in(file_store, "no-such-run"))
    started = time.monotonic()
    done = run(jobs, workdir, env={"TRAINCTL_AGENT_SPEC_WAIT_S": "3"})  # the agent waits for a job.json written late
    assert done.returncode == 1 and time.monotonic() - started >= 3
    state = jobs.read_state()
    assert state.phase is JobPhase.FAILED and "could not read the job" in state.error
    assert "\n" not in state.error


def test_setup_commands_run_first_and_their_failure_fails_the_job(file_store: str, workdir: Path) -> None:
    jobs = make_job(file_store, setup=["echo preparing > marker.txt", "echo from setup; exit 7"], module="platform")
    assert run(jobs, workdir).returncode == 1
    state = jobs.read_state()
    assert state.phase is JobPhase.FAILED and state.exit_code is None
    assert state.error == "setup command 'echo from setup; exit 7' failed with exit code 7: from setup"
    logs = jobs.read_logs()
    assert b"$ echo preparing > marker.txt" in logs and b"from setup" in logs
    assert (workdir / "runs" / state.run_id / "marker.txt").read_text() == "preparing\n"


def test_cancel_during_setup(file_store: str, workdir: Path) -> None:
    jobs = make_job(file_store, setup=["echo installing; sleep 30"], module="platform")
    agent = start(jobs, workdir)
    wait_for(jobs, {JobPhase.SETTING_UP}, timeout=30)
    jobs.request_cancel("changed my mind")
    assert agent.wait(timeout=30) == 1
    state = jobs.read_state()
    assert state.phase is JobPhase.CANCELLED and state.error == "changed my mind"
    assert state.timings["setup"] < 10 and "run" not in state.timings


def test_script_missing_from_the_code(file_store: str, workdir: Path) -> None:
    jobs = make_job(file_store, script="train.py")
    assert run(jobs, workdir).returncode == 1
    assert jobs.read_state().error.startswith("script 'train.py' is not in the code")


def test_store_outage_during_the_run_does_not_stop_the_job(s3, workdir: Path) -> None:
    jobs = make_job(
        f"s3://{s3.bucket}/store",
        **python_job("import time; print('before', flush=True); time.sleep(3); print('after', flush=True); time.sleep(1)"),
    )
    agent = start(jobs, workdir)
    wait_for(jobs, {JobPhase.RUNNING}, timeout=30)
    s3.server.stop()
    try:
        time.sleep(2)  # the outage itself: the job goes on printing meanwhile
    finally:
        s3.server.start()
    assert agent.wait(timeout=60) == 0
    state = jobs.read_state()
    assert state.phase is JobPhase.SUCCEEDED
    logs = jobs.read_logs()
    assert b"before" in logs and b"after" in logs


def test_forwarded_secrets_never_reach_the_store_or_the_logs(store_url: str, workdir: Path) -> None:
    secret = "s3cr3t-" + os.urandom(6).hex()
    jobs = make_job(
        store_url,
        forward_env=["WANDB_API_KEY"],
        **python_job("import os; print('key length', len(os.environ['WANDB_API_KEY']))"),
    )
    done = run(jobs, workdir, env={"WANDB_API_KEY": secret})
    assert done.returncode == 0, done.stderr
    assert b"forwarded variables not set" not in jobs.read_logs()
    assert f"key length {len(secret)}".encode() in jobs.read_logs()
    objects = store_objects(store_url)
    assert objects and not [p for p, data in objects.items() if secret.encode() in data]
    assert secret not in done.stdout + done.stderr
    for path in workdir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


# ---------------------------------------------------------------- environments


def test_pep723_metadata() -> None:
    source = textwrap.dedent(
        """\
        #!/usr/bin/env python
        # /// script
        # requires-python = ">=3.10"
        # dependencies = [
        #   "rich>=13",
        #   "fsspec",
        # ]
        # ///
        import rich
        """
    )
    assert script_metadata(source) == {"requires-python": ">=3.10", "dependencies": ["rich>=13", "fsspec"]}
    assert script_metadata("print('no metadata')\n") is None
    assert script_metadata("# /// other\n# x = 1\n# ///\n") is None
    with pytest.raises(SetupError, match="more than one"):
        script_metadata("# /// script\n# a = 1\n# ///\nimport os\n# /// script\n# b = 2\n# ///\n")
    with pytest.raises(SetupError, match="not valid TOML"):
        script_metadata("# /// script\n# dependencies = [\n# ///\n")


def test_collect_requirements(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text(
        "# training deps\nfsspec>=2023  # storage\n-r more.txt\n--index-url https://example.invalid/simple\n-e .\n\n"
    )
    (tmp_path / "more.txt").write_text("pytest\n")
    (tmp_path / "train.py").write_text('# /// script\n# dependencies = ["packaging"]\n# ///\n')
    reqs = collect_requirements(tmp_path, "train.py")
    assert reqs.items == ["fsspec>=2023", "pytest", "packaging"]
    assert reqs.unchecked == [f"-e {tmp_path}"]
    assert reqs.options == ["--index-url https://example.invalid/simple"]
    assert reqs.sources == ["requirements.txt", "train.py (PEP 723)"]
    assert len(reqs) == 4
    assert reqs.pip_args() == ["-r", str(tmp_path / "requirements.txt"), "packaging"]
    # uv gets only what the base lacks (it cannot see the base's packages), with the options
    assert reqs.uv_lines(["packaging"]) == ["--index-url https://example.invalid/simple", f"-e {tmp_path}", "packaging"]

    # pyproject.toml's dependencies win over requirements.txt
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = ["fsspec", "torch>=2"]\n')
    assert collect_requirements(tmp_path).items == ["fsspec", "torch>=2"]
    assert not collect_requirements(tmp_path / "nothing-here")


def test_missing_requirements_honours_markers_and_versions() -> None:
    reqs = Requirements(
        items=[
            "fsspec",
            "pytest>=1.0",
            "fsspec<1.0",
            "definitely-not-installed-trainctl-xyz",
            "also-not-installed-xyz; python_version < '3'",
        ]
    )
    missing = missing_requirements(sys.executable, reqs)
    assert [m.split(" (")[0] for m in missing] == ["fsspec<1.0", "definitely-not-installed-trainctl-xyz"]
    assert "found" in missing[0] and "not installed" in missing[1]


PRINT_PYTHON = "import sys, fsspec, trainctl_lightning; print('PREFIX', sys.prefix); print('PYTHON', sys.executable)\n"


def test_auto_reuses_an_interpreter_that_satisfies_the_requirements(file_store: str, workdir: Path) -> None:
    jobs = make_job(
        file_store,
        workdir,
        files={"requirements.txt": "fsspec>=2020\npytest ; python_version >= '3'\n", "train.py": PRINT_PYTHON},
        script="train.py",
        env_mode=EnvMode.AUTO,
        python=sys.executable,
    )
    done = run(jobs, workdir)
    assert done.returncode == 0, done.stderr
    state = jobs.read_state()
    assert state.env_mode == "reused" and state.python == sys.executable
    assert f"PREFIX {sys.prefix}".encode() in jobs.read_logs()
    assert f"reused {sys.executable} (all 2 requirements satisfied)" in done.stderr
    assert not (workdir / "envs").exists()


def test_auto_builds_an_environment_when_a_requirement_is_missing(file_store: str, workdir: Path) -> None:
    # no index reachable in tests: the install fails fast, and the job fails with pip's error line
    jobs = make_job(
        file_store,
        workdir,
        files={"requirements.txt": "fsspec\nnot-a-real-package-trainctl-xyz==1.0\n", "train.py": PRINT_PYTHON},
        script="train.py",
        env_mode=EnvMode.AUTO,
        env={"PIP_NO_INDEX": "1"},
    )
    assert run(jobs, workdir).returncode == 1
    state = jobs.read_state()
    assert state.phase is JobPhase.FAILED
    assert state.error.startswith("installing the requirements failed")
    assert "not-a-real-package-trainctl-xyz" in state.error
    assert b"1 of 2 requirements missing: not-a-real-package-trainctl-xyz==1.0 (not installed)" in jobs.read_logs()


def test_isolated_environment_is_built_used_and_cached(file_store: str, workdir: Path) -> None:
    # fsspec is already in the base: the environment is created and nothing new is installed
    files = {"requirements.txt": "fsspec\n", "train.py": PRINT_PYTHON}
    first = make_job(file_store, workdir, files=files, script="train.py", env_mode=EnvMode.ISOLATED, env={"PIP_NO_INDEX": "1"})
    done = run(first, workdir)
    assert done.returncode == 0, first.read_logs().decode()
    state = first.read_state()
    envs = workdir / "envs"
    [env_dir] = [p for p in envs.iterdir() if p.is_dir()]
    assert state.env_mode == "isolated (venv)" and state.python == str(env_dir / "bin" / "python")
    assert f"PREFIX {env_dir}".encode() in first.read_logs()  # the job ran in it, importing the base's packages

    second = make_job(file_store, workdir, files=files, script="train.py", env_mode=EnvMode.ISOLATED, env={"PIP_NO_INDEX": "1"})
    done = run(second, workdir)
    assert done.returncode == 0
    assert "cached" in done.stderr
    assert second.read_state().python == state.python
    assert second.read_state().timings["setup"] < state.timings["setup"]


FAKE_UV = """#!/bin/sh
# uv's command line, carried out with venv and pip; every call is recorded in $UV_LOG
echo "$@" >> "$UV_LOG"
case "$1" in
  venv) exec "$4" -m venv --system-site-packages --without-pip "$5" ;;
  pip) cp "$6" "$UV_LOG.requirements"; exec "$4" -m pip install -r "$6" ;;
esac
exit 2
"""


@pytest.fixture
def fake_uv(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "uv").write_text(FAKE_UV)
    (bin_dir / "uv").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "UV_LOG": str(tmp_path / "uv.log")}


def test_uv_builds_the_environment_and_installs_only_what_the_base_lacks(
    file_store: str, workdir: Path, fake_uv: dict[str, str]
) -> None:
    files = {"requirements.txt": "fsspec\nnot-a-real-package-trainctl-xyz==1.0\n", "train.py": PRINT_PYTHON}
    jobs = make_job(file_store, workdir, files=files, script="train.py", env_mode=EnvMode.ISOLATED, env={"PIP_NO_INDEX": "1"})
    assert run(jobs, workdir, env=fake_uv).returncode == 1
    state = jobs.read_state()
    [env_dir] = [p for p in (workdir / "envs").iterdir() if p.is_dir()]
    venv_call, pip_call = Path(fake_uv["UV_LOG"]).read_text().splitlines()
    assert venv_call == f"venv --system-site-packages --python {sys.executable} {env_dir}"
    assert pip_call.startswith(f"pip install --python {env_dir}/bin/python -r ")
    assert Path(fake_uv["UV_LOG"] + ".requirements").read_text() == "not-a-real-package-trainctl-xyz==1.0\n"
    assert state.error.startswith("installing the requirements failed (uv exit code 1)")
    assert not (env_dir / ".trainctl-env.json").exists()  # never reused half-built


def test_uv_environment_with_nothing_missing_installs_nothing(file_store: str, workdir: Path, fake_uv: dict[str, str]) -> None:
    files = {"requirements.txt": "fsspec\n", "train.py": PRINT_PYTHON}
    jobs = make_job(file_store, workdir, files=files, script="train.py", env_mode=EnvMode.ISOLATED)
    done = run(jobs, workdir, env=fake_uv)
    assert done.returncode == 0, jobs.read_logs().decode()
    state = jobs.read_state()
    assert state.env_mode == "isolated (uv)"
    assert [line.split()[0] for line in Path(fake_uv["UV_LOG"]).read_text().splitlines()] == ["venv"]
    assert f"PREFIX {Path(state.python).parent.parent}".encode() in jobs.read_logs()


# ---------------------------------------------------------------- code bundles


def test_code_bundle_is_fetched_and_run(store_url: str, workdir: Path, tmp_path: Path) -> None:
    codesync = pytest.importorskip("trainctl_lightning.jobs.codesync")
    project = tmp_path / "project"
    (project / "pkg").mkdir(parents=True)
    (project / "pkg" / "__init__.py").write_text("GREETING = 'hello from the bundle'\n")
    (project / "train.py").write_text("import pkg, sys\nprint(pkg.GREETING, sys.argv[1:])\n")
    run_id = new_run_id("bundle")
    run_url = run_url_in(store_url, run_id)
    code, _ = codesync.upload_bundle(codesync.scan_project(project), store_url, run_url)
    spec = JobSpec(run_id=run_id, run_url=run_url, created_at=utc_now(), script="train.py", args=["--fast"], code=code, **FAST)
    jobs = JobStore(run_url)
    jobs.write_spec(spec)
    done = run(jobs, workdir)
    assert done.returncode == 0, done.stderr
    assert b"hello from the bundle ['--fast']" in jobs.read_logs()
    assert (workdir / "runs" / run_id / "code" / "train.py").is_file()


def test_tampered_code_manifest_fails_the_job(file_store: str, workdir: Path, tmp_path: Path) -> None:
    codesync = pytest.importorskip("trainctl_lightning.jobs.codesync")
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print('never runs')\n")
    run_id = new_run_id("tampered")
    run_url = run_url_in(file_store, run_id)
    code, _ = codesync.upload_bundle(codesync.scan_project(project), file_store, run_url)
    bad = type(code)(**{**code.__dict__, "manifest_sha256": "0" * 64})
    jobs = JobStore(run_url)
    jobs.write_spec(JobSpec(run_id=run_id, run_url=run_url, created_at=utc_now(), script="train.py", code=bad, **FAST))
    assert run(jobs, workdir).returncode == 1
    state = jobs.read_state()
    assert state.phase is JobPhase.FAILED and state.error.startswith("could not fetch the code bundle")
    assert b"never runs" not in jobs.read_logs()
