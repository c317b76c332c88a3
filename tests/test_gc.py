"""`trainctl gc` on the local provider: an instance whose run has ended is garbage (terminated with
--yes), one whose run still runs is kept, and so is one that has no run yet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.helpers.cli import trainctl
from tests.helpers.jobs import Gate, release_local_instances, write_gated_script
from tests.helpers.leftovers import assert_nothing_running


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    write_gated_script(root)
    (root / "quick.py").write_text("print('done', flush=True)\n")
    return root


@pytest.fixture
def gate(tmp_path: Path):
    gate = Gate(tmp_path / "gate")
    yield gate
    gate.open()  # a failed test never leaves its job waiting
    release_local_instances()


def states(cwd: Path) -> dict[str, str]:
    return {i["id"]: i["state"] for i in json.loads(trainctl("ls", "--all", "--output", "json", cwd=cwd).stdout)["instances"]}


@pytest.mark.slow
def test_gc_terminates_an_instance_whose_run_ended_and_keeps_the_others(project: Path, tmp_path: Path, gate: Gate) -> None:
    store = f"file://{tmp_path}/store"
    env = {"TRAINCTL_STORE": store}
    ended = trainctl("launch", "quick.py", "--keep-alive", "--output", "json", cwd=project, env=env)
    assert ended.returncode == 0, ended.stderr
    ended = json.loads(ended.stdout)
    assert ended["state"] == "succeeded"
    live = trainctl("launch", "gated.py", "--detach", "--output", "json", "--", str(gate), cwd=project, env=env)
    assert live.returncode == 0, live.stderr
    live = json.loads(live.stdout)
    idle = json.loads(trainctl("create", "--output", "json", cwd=project).stdout)  # no run: jobs may still come
    wait_until(
        lambda: "before the gate" in trainctl("logs", live["run_id"], cwd=project, env=env).stdout, what="the live job to run"
    )

    gc = ["gc", "--provider", "local", "--store", store, "--output", "json"]
    listed = trainctl(*gc, cwd=project)
    assert listed.returncode == 0, listed.stderr
    report = json.loads(listed.stdout)
    assert [(i["instance"]["id"], i["job_state"], i["terminated"]) for i in report["garbage"]] == [
        (ended["instance_id"], "succeeded", False)
    ]
    assert "run ended" in report["garbage"][0]["reason"]
    kept = {i["instance"]["id"]: i for i in report["kept"]}
    assert set(kept) == {live["instance_id"], idle["id"]}
    assert kept[live["instance_id"]]["job_state"] == "running"
    assert states(project) == {ended["instance_id"]: "running", live["instance_id"]: "running", idle["id"]: "running"}

    terminated = trainctl(*gc, "--yes", cwd=project)
    assert terminated.returncode == 0, terminated.stderr
    assert [i["terminated"] for i in json.loads(terminated.stdout)["garbage"]] == [True]
    assert states(project) == {ended["instance_id"]: "terminated", live["instance_id"]: "running", idle["id"]: "running"}
    assert "before the gate" in trainctl("logs", live["run_id"], cwd=project, env=env).stdout

    # the kept run goes on to the end untouched
    gate.open()
    wait_until(lambda: states(project)[live["instance_id"]] == "terminated", timeout=30, what="the live run to end")
    assert (
        json.loads(trainctl("status", live["run_id"], "--output", "json", cwd=project, env=env).stdout)["job"]["phase"]
        == "succeeded"
    )
    assert json.loads(trainctl(*gc, "--yes", cwd=project).stdout)["garbage"] == []
    trainctl("terminate", idle["id"], cwd=project)
    assert_nothing_running()
