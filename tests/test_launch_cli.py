"""`trainctl launch` options and `trainctl logs -f` through the real CLI, on the local provider with
a file:// store: a job the test holds at a gate shows what happens while it still runs."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.helpers.agent import store_objects
from tests.helpers.cli import Running, trainctl
from tests.helpers.jobs import Gate, release_local_instances, write_gated_script
from tests.helpers.leftovers import assert_nothing_running


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The file:// store every trainctl command of the test uses (through TRAINCTL_STORE)."""
    url = f"file://{tmp_path}/store"
    monkeypatch.setenv("TRAINCTL_STORE", url)
    return url


@pytest.fixture
def project(tmp_path: Path, store: str) -> Path:
    root = tmp_path / "project"
    write_gated_script(root)
    return root


@pytest.fixture(autouse=True)
def _release_instances():
    """A failed test leaves no instance behind (each test asserts its own cleanup first)."""
    yield
    release_local_instances()


@pytest.fixture
def gate(tmp_path: Path):
    gate = Gate(tmp_path / "gate")
    yield gate
    gate.open()  # a failed test never leaves its job waiting


def job_state(run_id: str, cwd: Path) -> dict:
    result = trainctl("status", run_id, "--output", "json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["job"]


def test_logs_follow_streams_while_the_job_runs_and_ends_with_it(project: Path, gate: Gate) -> None:
    launched = trainctl("launch", "gated.py", "--detach", "--output", "json", "--", str(gate), cwd=project)
    assert launched.returncode == 0, launched.stderr
    run_id = json.loads(launched.stdout)["run_id"]

    with Running("logs", run_id, "-f", cwd=project) as follow:
        wait_until(lambda: "before the gate" in follow.stdout, timeout=30, what="the job's first line from `logs -f`")
        assert follow.proc.poll() is None  # still following: the job waits at the gate
        assert "after the gate" not in follow.stdout
        assert job_state(run_id, project)["phase"] == "running"

        gate.open()
        assert follow.wait(timeout=30) == 0, follow.stderr
    assert follow.stdout.index("before the gate") < follow.stdout.index("after the gate")
    assert f"run {run_id} succeeded" in follow.stderr
    assert_nothing_running()


def test_detach_returns_while_the_job_runs_and_the_job_then_completes(project: Path, gate: Gate) -> None:
    launched = trainctl("launch", "gated.py", "--detach", "--output", "json", "--", str(gate), cwd=project, timeout=60)
    assert launched.returncode == 0, launched.stderr
    out = json.loads(launched.stdout)
    run_id = out["run_id"]
    assert run_id.startswith("gated-") and out["run_url"].endswith(run_id)
    # the job cannot end before the gate opens, so the CLI returned while it ran
    assert out["state"] in ("queued", "fetching", "setting_up", "running")
    wait_until(lambda: job_state(run_id, project)["phase"] == "running", timeout=30, what="the detached job to run")

    gate.open()
    final = wait_until(
        lambda: (s := job_state(run_id, project))["phase"] not in ("queued", "fetching", "setting_up", "running") and s,
        timeout=30,
        what="the detached job to end",
    )
    assert final["phase"] == "succeeded" and final["exit_code"] == 0
    assert "after the gate" in trainctl("logs", run_id, cwd=project).stdout
    assert_nothing_running()  # the instance this launch created ended with its job


def test_launch_on_an_existing_instance_keeps_it(project: Path) -> None:
    (project / "where.py").write_text("import os\nprint('cwd', os.getcwd(), flush=True)\n")
    created = trainctl("create", "--output", "json", cwd=project)
    assert created.returncode == 0, created.stderr
    instance_id = json.loads(created.stdout)["id"]

    result = trainctl("launch", "where.py", "--instance", instance_id, "--output", "json", cwd=project)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["state"] == "succeeded" and out["instance_id"] == instance_id and out["created_instance"] is False
    # the job ran in that instance's working directory
    home = os.environ["TRAINCTL_HOME"]
    assert f"cwd {home}/local/instances/{instance_id}/work" in result.stderr

    listed = json.loads(trainctl("ls", "--output", "json", cwd=project).stdout)["instances"]
    assert [(i["id"], i["state"]) for i in listed] == [(instance_id, "running")]
    ended = trainctl("terminate", instance_id, "--output", "json", cwd=project)
    assert ended.returncode == 0 and json.loads(ended.stdout)["state"] == "terminated"
    assert_nothing_running()


def test_env_name_forwards_the_value_without_storing_it(project: Path, store: str) -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    digest = hashlib.sha256(secret.encode()).hexdigest()
    # the job shows it got the value by printing its hash: its output is stored too
    (project / "show_env.py").write_text(
        "import hashlib, os\nprint('sha', hashlib.sha256(os.environ['WANDB_API_KEY'].encode()).hexdigest(), flush=True)\n"
    )
    result = trainctl(
        "launch", "show_env.py", "--env", "WANDB_API_KEY", "--output", "json", cwd=project, env={"WANDB_API_KEY": secret}
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["state"] == "succeeded"
    assert f"sha {digest}" in result.stderr

    objects = store_objects(store)
    job_json = next(data for path, data in objects.items() if path.endswith(f"{out['run_id']}/job.json"))
    assert json.loads(job_json)["forward_env"] == ["WANDB_API_KEY"]
    assert [path for path, data in objects.items() if secret.encode() in data] == []
    assert_nothing_running()


def test_include_ships_files_the_ignore_files_exclude(project: Path) -> None:
    (project / ".gitignore").write_text("data/\n")
    (project / ".trainctlignore").write_text("*.local.toml\n")
    (project / "data").mkdir()
    (project / "data" / "labels.csv").write_text("cat,dog\n")
    (project / "settings.local.toml").write_text("lr = 0.5\n")
    (project / "read.py").write_text(
        "from pathlib import Path\n"
        "print('labels', Path('data/labels.csv').read_text().strip(), flush=True)\n"
        "print('settings', Path('settings.local.toml').read_text().strip(), flush=True)\n"
    )
    result = trainctl(
        "launch", "read.py", "--include", "data/labels.csv", "--include", "settings.local.toml", "--output", "json", cwd=project
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["state"] == "succeeded"
    assert "labels cat,dog" in result.stderr and "settings lr = 0.5" in result.stderr
    assert_nothing_running()
