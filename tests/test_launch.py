"""`trainctl launch` end to end on the local provider: a real Lightning script, a real agent
process, a file:// store and moto's S3; logs, status, exit code, checkpoints and metrics all
arrive, and nothing is left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers.leftovers import assert_nothing_running
from trainctl_lightning import launch as api
from trainctl_lightning.errors import ConfigError, IntegrityError
from trainctl_lightning.jobs.spec import JobPhase
from trainctl_lightning.providers import get_provider

TRAIN_PY = textwrap.dedent(
    '''
    """A real Lightning script that knows nothing about where it runs."""
    import os
    import sys

    import torch
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from trainctl_lightning import CheckpointSync, MetricsReporter


    class Tiny(LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(32, 4, generator=g)
            return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


    if __name__ == "__main__":
        print("hello from train.py", sys.argv[1:], flush=True)
        if "--fail" in sys.argv:
            raise RuntimeError("deliberate failure in train.py")
        steps = int(os.environ.get("STEPS", "12"))
        trainer = Trainer(
            max_steps=steps,
            accelerator="cpu",
            logger=MetricsReporter(),
            callbacks=[ModelCheckpoint(dirpath="ckpts", every_n_train_steps=4, save_top_k=-1), CheckpointSync()],
            log_every_n_steps=1,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Tiny())
        print("done training at step", trainer.global_step, flush=True)
    '''
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "train.py").write_text(TRAIN_PY)
    (root / "sleepy.py").write_text("import time\nprint('sleeping', flush=True)\ntime.sleep(120)\n")
    (root / ".gitignore").write_text("ckpts/\nlightning_logs/\n")
    return root


def trainctl(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainctl_lightning.cli.app", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def check_run_arrived(project: Path, store: str, result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["state"] == "succeeded" and out["exit_code"] == 0
    assert out["code_bytes_uploaded"] > 0
    run_id = out["run_id"]
    assert out["run_url"].startswith(store.rstrip("/"))
    assert "hello from train.py ['--tag', 'x']" in result.stderr  # streamed live (to stderr in JSON mode)

    logs = trainctl("logs", run_id, cwd=project)
    assert "hello from train.py" in logs.stdout and "done training at step 12" in logs.stdout

    status = json.loads(trainctl("status", run_id, "--output", "json", cwd=project).stdout)
    assert status["job"]["phase"] == "succeeded" and status["job"]["exit_code"] == 0
    assert set(status["job"]["timings"]) >= {"fetch", "setup", "run", "total"}
    assert status["training"]["phase"] == "finished" and status["training"]["global_step"] == 12

    ckpts = json.loads(trainctl("ckpt", "ls", run_id, "--output", "json", cwd=project).stdout)["checkpoints"]
    assert [c["global_step"] for c in ckpts] == [4, 8, 12]
    metrics = json.loads(trainctl("metrics", run_id, "--output", "json", cwd=project).stdout)
    assert len([r for r in metrics if "train_loss" in r["metrics"]]) == 12
    return out


@pytest.mark.slow
def test_launch_a_lightning_script_with_a_file_store(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = f"file://{tmp_path}/store"
    monkeypatch.setenv("TRAINCTL_STORE", store)
    result = trainctl(
        "launch", "train.py", "--store", store, "--output", "json", "--", "--tag", "x", cwd=project, env={"TRAINCTL_STORE": store}
    )
    out = check_run_arrived(project, store, result)
    instances = json.loads(trainctl("ls", "--all", "--output", "json", cwd=project).stdout)["instances"]
    assert [(i["id"], i["state"]) for i in instances] == [(out["instance_id"], "terminated")]
    assert_nothing_running()

    # the same project again: nothing changed, so no file contents are uploaded
    again = trainctl("launch", "train.py", "--output", "json", "--", "--tag", "x", cwd=project, env={"TRAINCTL_STORE": store})
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)
    assert second["code_bytes_uploaded"] == 0 and second["code_bytes_total"] > 0
    assert second["run_id"] != out["run_id"]
    assert_nothing_running()


@pytest.mark.slow
def test_launch_with_an_s3_store(project: Path, s3, monkeypatch: pytest.MonkeyPatch) -> None:
    store = f"s3://{s3.bucket}/trainctl"
    monkeypatch.setenv("TRAINCTL_STORE", store)
    result = trainctl("launch", "train.py", "--output", "json", "--", "--tag", "x", cwd=project, env={"TRAINCTL_STORE": store})
    check_run_arrived(project, store, result)
    assert_nothing_running()


@pytest.mark.slow
def test_a_failing_script_gives_its_exit_code_and_error_tail(project: Path, tmp_path: Path) -> None:
    store = f"file://{tmp_path}/store"
    result = trainctl("launch", "train.py", "--output", "json", "--", "--fail", cwd=project, env={"TRAINCTL_STORE": store})
    assert result.returncode == 1  # Python's exit code for an uncaught exception
    out = json.loads(result.stdout)
    assert out["state"] == "failed" and out["exit_code"] == 1
    status = json.loads(trainctl("status", out["run_id"], "--output", "json", cwd=project, env={"TRAINCTL_STORE": store}).stdout)
    assert "RuntimeError: deliberate failure in train.py" in status["job"]["error_tail"]
    human = trainctl("status", out["run_id"], cwd=project, env={"TRAINCTL_STORE": store})
    assert "deliberate failure" in human.stdout
    assert_nothing_running()


@pytest.mark.slow
def test_python_api_create_train_monitor_terminate(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    store = f"file://{tmp_path}/store"
    inst = api.create_instance("local")
    assert [i.id for i in api.list_resources()] == [inst.id]

    chunks: list[bytes] = []
    run = api.train(inst, "train.py", args=["--tag", "api"], store=store, on_output=chunks.append)
    assert run.exit_code == 0 and run.state().phase is JobPhase.SUCCEEDED
    assert b"hello from train.py ['--tag', 'api']" in b"".join(chunks)
    # the instance was given, not created: it is kept for the next job
    assert api.list_resources()[0].state.value == "running"

    detached = api.train(inst.id, "train.py", store=store, detach=True, env={"STEPS": "4"})
    final = api.monitor(detached, on_output=lambda _: None)
    assert final.phase is JobPhase.SUCCEEDED
    assert "done training at step 4" in detached.logs()
    assert api.get_run(detached.run_id, store=store).run_url == detached.run_url

    assert api.terminate(inst.id).state.value == "terminated"
    assert api.terminate(inst.id).state.value == "terminated"  # idempotent
    assert api.list_resources() == []
    assert_nothing_running()


def test_plan_then_execute(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python API in two steps: the plan says what would happen and creates nothing; executing it runs exactly that."""
    monkeypatch.chdir(project)
    monkeypatch.setenv("MY_TOKEN", "s3cr3t")
    store = tmp_path / "store"
    settings = api.resolve_settings(project, store=f"file://{store}", tags={"team": "vision"})
    plan = api.plan_launch(api.LaunchRequest("train.py", env={"STEPS": "2", "MY_TOKEN": None}, detach=True), settings)
    assert plan.settings is settings and plan.creates_instance and plan.instance.spec.tags["team"] == "vision"
    assert plan.job.env == {"STEPS": "2"} and plan.forward_env == ["MY_TOKEN"] and "s3cr3t" not in repr(plan)
    assert plan.command == ["python", "-u", "train.py"] and plan.code_files == 3
    assert get_provider("local").list(include_terminated=True) == [] and not store.exists()

    run = api.execute_plan(plan)
    assert (run.run_id, run.run_url, run.created_instance) == (plan.run_id, plan.run_url, True)
    assert run.wait(timeout=120).phase is JobPhase.SUCCEEDED
    assert "done training at step 2" in run.logs()
    assert_nothing_running()


def test_a_launch_that_fails_after_creating_its_instance_terminates_it(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    plan = api.plan_launch(
        api.LaunchRequest("train.py", detach=True), api.resolve_settings(project, store=f"file://{tmp_path}/store")
    )
    (project / "train.py").write_text("print('edited after planning')\n")  # the scanned file changed
    with pytest.raises(IntegrityError, match="changed after it was scanned"):
        api.execute_plan(plan)
    assert [i.state.value for i in get_provider("local").list(include_terminated=True)] == ["terminated"]
    assert_nothing_running()


def test_launch_options_are_request_fields_or_settings(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    plan = api.launch("train.py", dry_run=True, args=["--x", 1], max_hours=2, setup=["echo hi"], env=["A=1"])
    assert isinstance(plan, api.LaunchPlan)
    assert plan.job.args == ["--x", "1"] and plan.job.env == {"A": "1"} and plan.job.setup == ["echo hi"]
    assert plan.settings.max_hours == 2 and plan.job.max_runtime_s == 7200
    with pytest.raises(ConfigError, match="unknown launch option 'instance_typo'; did you mean 'instance_type'"):
        api.launch("train.py", instance_typo="x")
    with pytest.raises(ConfigError, match="a script to run .* or a module"):
        api.LaunchRequest("train.py", module="pkg.train")
    assert get_provider("local").list(include_terminated=True) == []


def test_ctrl_c_without_a_terminal_cancels_and_cleans_up(project: Path, tmp_path: Path) -> None:
    store = f"file://{tmp_path}/store"
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainctl_lightning.cli.app", "launch", "sleepy.py", "--output", "json"],
        cwd=project,
        env={**os.environ, "TRAINCTL_STORE": store},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        # a test run started in the background (CI, `cmd &`) has SIGINT ignored, and children
        # inherit that: give the CLI the default, as a terminal would
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 60
        seen = ""
        while "sleeping" not in seen and time.monotonic() < deadline:
            seen += proc.stderr.readline()
        assert "sleeping" in seen
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    data = json.loads(out)
    assert data["state"] == "cancelled"
    assert_nothing_running()


@pytest.mark.parametrize(
    "args, message",
    [
        (["launch", "train.py", "--provider", "nope"], "provider = 'nope' is not a provider: choose one of aws, local"),
        (["launch", "train.py", "--instance-type", "g5.xlarge"], "the local provider has one instance type"),
        (["launch", "missing.py"], "script 'missing.py' not found"),
        (["launch", "train.py", "--env", "API_KEY=hunter2"], "API_KEY looks like a secret"),
        (["launch", "train.py", "--store", "nope://x"], "unknown storage protocol 'nope'"),
    ],
)
def test_bad_input_is_one_line_and_creates_nothing(project: Path, tmp_path: Path, args: list[str], message: str) -> None:
    store = tmp_path / "store"
    result = trainctl(*args, cwd=project, env={"TRAINCTL_STORE": f"file://{store}"})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    assert get_provider("local").list(include_terminated=True) == []
    assert not store.exists() or not any(p.name != "_code" for p in store.iterdir())


def test_an_unreachable_store_is_refused_before_anything_is_created(project: Path, s3) -> None:
    result = trainctl("launch", "train.py", "--store", "s3://no-such-bucket/x", cwd=project)
    assert result.returncode == 1
    assert "no-such-bucket" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert get_provider("local").list(include_terminated=True) == []


def test_invalid_config_is_refused(project: Path) -> None:
    (project / "trainctl.toml").write_text('provider = "local"\ninstance_typ = "x"\n')
    result = trainctl("launch", "train.py", cwd=project)
    assert result.returncode == 1 and "instance_typ" in result.stderr and "instance_type" in result.stderr
    assert get_provider("local").list(include_terminated=True) == []


def test_dry_run_shows_what_would_happen_and_creates_nothing(project: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    result = trainctl(
        "launch", "train.py", "--dry-run", "--output", "json", cwd=project, env={"TRAINCTL_STORE": f"file://{store}"}
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["dry_run"] and plan["command"][-1] == "train.py" and plan["code_files"] == 3
    assert plan["instance"]["tags"]["trainctl:managed-by"] == "trainctl-lightning"
    assert get_provider("local").list(include_terminated=True) == []
    assert not store.exists()


def test_oversized_project_is_refused_naming_the_directory(project: Path) -> None:
    data = project / "data"
    data.mkdir()
    (data / "big.bin").write_bytes(os.urandom(3 * 2**20))
    (project / "trainctl.toml").write_text("code_max_mb = 1\n")
    result = trainctl("launch", "train.py", cwd=project)
    assert result.returncode == 1 and "data/" in result.stderr and ".trainctlignore" in result.stderr
    assert get_provider("local").list(include_terminated=True) == []


def test_with_nothing_configured_launch_uses_the_local_provider_and_the_default_store(project: Path) -> None:
    result = trainctl("launch", "train.py", "--output", "json", cwd=project, env={"STEPS": "2"})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    home = os.environ["TRAINCTL_HOME"]
    assert out["provider"] == "local" and out["store_url"] == f"file://{home}/store"
    assert out["run_url"] == f"file://{home}/store/{out['run_id']}"
    assert_nothing_running()


@pytest.mark.slow
def test_instance_commands_create_ls_stop_terminate(project: Path) -> None:
    plan = json.loads(trainctl("create", "--dry-run", "--tag", "team=vision", "--output", "json", cwd=project).stdout)
    assert plan["dry_run"] and plan["tags"]["team"] == "vision"
    assert json.loads(trainctl("ls", "--output", "json", cwd=project).stdout)["instances"] == []

    created = json.loads(trainctl("create", "--tag", "team=vision", "--output", "json", cwd=project).stdout)
    assert created["state"] == "running" and created["tags"]["team"] == "vision"
    listed = json.loads(trainctl("ls", "--output", "json", cwd=project).stdout)["instances"]
    assert [i["id"] for i in listed] == [created["id"]]
    assert created["id"] in trainctl("ls", cwd=project).stdout  # the table

    stopped = json.loads(trainctl("stop", created["id"], "--output", "json", cwd=project).stdout)
    assert stopped["state"] == "stopped"
    for _ in range(2):  # idempotent
        ended = trainctl("terminate", created["id"], "--output", "json", cwd=project)
        assert ended.returncode == 0 and json.loads(ended.stdout)["state"] == "terminated"
    assert json.loads(trainctl("ls", "--output", "json", cwd=project).stdout)["instances"] == []

    missing = trainctl("terminate", "local-00000000", cwd=project)
    assert missing.returncode == 1 and "no local instance 'local-00000000'" in missing.stderr
