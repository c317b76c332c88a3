"""The EC2 boot script's own install, run for real on this machine: the launcher ships a wheel of
trainctl to the store, the script fetches it from S3 (moto), makes a fresh venv, installs the wheel
into it, and runs the agent from that venv against the store.

What stays simulated, as in test_provider_aws.py: power-off, apt-get and the uv installer (a dry
run logs them), and the network: there is no uv on PATH, so the script takes its venv + pip path,
and trainctl's dependencies come from this test environment through PYTHONPATH (pip counts them as
installed, so nothing is downloaded; PIP_NO_INDEX makes sure).
"""

from __future__ import annotations

import hashlib
import json
import os
import site
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from tests.helpers.wheels import build_wheel
from trainctl_lightning.jobs.dist import ship_trainctl
from trainctl_lightning.jobs.spec import EnvMode, JobPhase, JobSpec, JobState
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.providers import aws_bootstrap
from trainctl_lightning.providers.aws_bootstrap import render_user_data
from trainctl_lightning.store.layout import DIST, run_url_in
from trainctl_lightning.timeutil import utc_now

#: Which environment runs, and where its trainctl_lightning comes from (one line: ``WHERE [prefix, file]``).
WHERE = "import json, sys, trainctl_lightning; print('WHERE', json.dumps([sys.prefix, trainctl_lightning.__file__]))"


def dependencies_only(dest: Path) -> Path:
    """A folder with this environment's installed packages except trainctl itself (links, not copies)."""
    dest.mkdir()
    for site_dir in site.getsitepackages():
        for entry in Path(site_dir).iterdir():
            if entry.name.startswith(("trainctl_lightning", "__editable__", "__pycache__")) or entry.suffix == ".pth":
                continue
            if not (dest / entry.name).exists():
                (dest / entry.name).symlink_to(entry)
    return dest


def boot_env(tmp_path: Path, s3_env: dict[str, str]) -> dict[str, str]:
    """What cloud-init gives the script, plus the dry-run switches and what stands in for the network."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # the image's python3: the interpreter under this test's venv, without the venv's packages
    (bin_dir / "python3").symlink_to(os.path.realpath(sys.executable))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_", "UV_"))}
    home = tmp_path / "home"
    home.mkdir()
    return {
        **env,
        **s3_env,
        "HOME": str(home),
        "PATH": f"{bin_dir}:/usr/bin:/bin",  # no uv, no aws CLI: the script's fallbacks
        "PYTHONPATH": str(dependencies_only(tmp_path / "deps")),
        "PIP_NO_INDEX": "1",
        "TRAINCTL_BOOTSTRAP_DRY": "1",
        "TRAINCTL_WORKDIR": str(tmp_path / "work"),
        "TRAINCTL_BOOTSTRAP_LOG": str(tmp_path / "boot.log"),
    }


def queued_job(store_url: str, run_id: str) -> JobStore:
    """A job as the launcher leaves it for the instance: spec written, state queued."""
    run_url = run_url_in(store_url, run_id)
    jobs = JobStore(run_url)
    jobs.write_spec(
        JobSpec(
            run_id=run_id,
            run_url=run_url,
            created_at=utc_now(),
            module="timeit",
            args=["-n", "1", "-r", "1", WHERE],
            env_mode=EnvMode.REUSE,
            provider="aws",
            instance_id="i-0123456789abcdef0",
            terminate_instance_after=True,
            log_interval_s=0.2,
            heartbeat_interval_s=0.5,
        )
    )
    jobs.write_state(JobState(run_id=run_id, phase=JobPhase.QUEUED, updated_at=utc_now()))
    return jobs


@pytest.mark.slow
def test_boot_script_installs_the_shipped_wheel_into_a_fresh_venv_and_runs_the_agent(tmp_path: Path, s3) -> None:
    store_url = f"s3://{s3.bucket}/store"
    shipped = ship_trainctl(store_url)
    assert shipped is not None and shipped.url.startswith(f"{store_url}/{DIST}/{shipped.sha256}/")
    wheel_url = shipped.url
    assert wheel_url.endswith(".whl")
    jobs = queued_job(store_url, "boot-20250101-000000-0002")
    script = tmp_path / "user-data.sh"
    script.write_text(render_user_data(jobs.url, install=wheel_url, install_sha256=shipped.sha256, region="us-east-1"))

    env = boot_env(tmp_path, s3.env())
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=240)
    log = (tmp_path / "boot.log").read_text()
    assert proc.returncode == 0, log

    venv = tmp_path / "work" / "venv"
    wheel = tmp_path / "work" / "wheels" / wheel_url.rsplit("/", 1)[-1]
    assert wheel.is_file()  # fetched from the store under its own file name
    assert "uv unavailable: falling back to venv + pip" in log and f"installing {wheel}" in log
    assert f"sha256 of {wheel} matches the launcher's ({shipped.sha256})" in log
    assert "could not install" not in log

    # the fresh venv has trainctl from the wheel, not from this checkout
    where = subprocess.run([str(venv / "bin" / "python"), "-c", WHERE], env=env, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr
    prefix, module = json.loads(where.stdout.removeprefix("WHERE "))
    assert Path(prefix) == venv
    assert Path(module).is_relative_to(venv / "lib") and "site-packages" in Path(module).parts
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "show", "trainctl-lightning"], env=env, capture_output=True, text=True
    )
    assert installed.returncode == 0 and f"Location: {Path(module).parent.parent}" in installed.stdout
    # built from the source this test runs
    assert (Path(module).parent / "providers" / "aws_bootstrap.py").read_text() == Path(aws_bootstrap.__file__).read_text()

    # and the agent it started ran the job with that interpreter
    state = jobs.read_state()
    assert state.phase is JobPhase.SUCCEEDED, state.error
    assert state.python == str(venv / "bin" / "python")
    assert where.stdout.strip() in jobs.read_logs().decode()
    assert log.rstrip().endswith("dry run: shutdown -h now trainctl: job ended")


@pytest.mark.slow
def test_boot_script_refuses_a_wheel_replaced_in_the_store_and_powers_off(tmp_path: Path, s3) -> None:
    """Anyone who can write the store can replace the wheel; the instance installs it as root only
    if its SHA-256 is the launcher's, else it installs nothing, runs no agent and powers off."""
    store_url = f"s3://{s3.bucket}/store"
    shipped = ship_trainctl(store_url)
    assert shipped is not None
    name = shipped.url.rsplit("/", 1)[-1]
    version = name.split("-")[1]
    marker = tmp_path / "planted-code-ran"
    planted = build_wheel(
        tmp_path / "planted",
        "trainctl-lightning",
        version,
        {
            "trainctl_lightning/__init__.py": "",
            "trainctl_lightning/agent/__init__.py": "",
            "trainctl_lightning/agent/__main__.py": f"open({str(marker)!r}, 'w').write('pwned')\n",
        },
    )
    assert planted.name == name  # the same file name: only the content tells them apart
    fs = fsspec.filesystem("s3")
    fs.pipe_file(shipped.url, planted.read_bytes())

    jobs = queued_job(store_url, "boot-20250101-000000-0003")
    script = tmp_path / "user-data.sh"
    script.write_text(render_user_data(jobs.url, install=shipped.url, install_sha256=shipped.sha256, region="us-east-1"))
    env = boot_env(tmp_path, s3.env())
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=240)
    log = (tmp_path / "boot.log").read_text()

    assert proc.returncode == 90, log
    planted_sha = hashlib.sha256(planted.read_bytes()).hexdigest()
    [refused] = [line for line in log.splitlines() if "REFUSED" in line]
    assert f"REFUSED {shipped.url}: its sha256 is {planted_sha}, the launcher recorded {shipped.sha256}" in refused
    assert "nothing was installed" in refused
    venv = tmp_path / "work" / "venv"
    assert not list(venv.glob("lib/python*/site-packages/trainctl_lightning*"))  # not installed
    assert not (tmp_path / "work" / "wheels" / name).exists()  # nor kept
    assert "starting the agent" not in log and not marker.exists()
    assert log.rstrip().endswith("dry run: shutdown -h now trainctl: job ended")  # the boot failed: the instance ends
    assert jobs.read_state().phase is JobPhase.QUEUED

    # and the launcher's next ship puts its own wheel back, under the same name
    again = ship_trainctl(store_url)
    assert again == shipped
    assert hashlib.sha256(fs.cat_file(shipped.url)).hexdigest() == shipped.sha256
