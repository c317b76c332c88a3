"""Managed runs (``--recover``) on the local provider: real agents, a real supervisor, a real
``Trainer.fit`` with CheckpointSync and MetricsReporter, interrupted with a spot notice (the
LocalIMDS stand-in) and without one (SIGKILL of the agent and its job: the instance is lost)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.helpers.cli import TRAINCTL, Running, trainctl
from tests.helpers.leftovers import assert_nothing_running, end_local_instances_then_assert_nothing_running, live_agent_pids
from trainctl_lightning import launch as api
from trainctl_lightning.agent.attempts import PRICE_ENV
from trainctl_lightning.errors import ConfigError
from trainctl_lightning.jobs.spec import JobPhase, JobState, RecoverPolicy
from trainctl_lightning.metrics.read import read_metrics, read_status
from trainctl_lightning.providers.local import LocalProvider, process_alive
from trainctl_lightning.store.layout import run_id_of
from trainctl_lightning.store.run import RunStore
from trainctl_lightning.testing import LocalIMDS

SCRIPT = Path(__file__).parent / "scripts" / "recover_train.py"
REPO = Path(__file__).parent.parent


@pytest.fixture
def imds(monkeypatch: pytest.MonkeyPatch):
    with LocalIMDS() as server:
        monkeypatch.setenv("TRAINCTL_SPOT", "1")
        monkeypatch.setenv("TRAINCTL_IMDS_ENDPOINT", server.endpoint)
        monkeypatch.setenv("TRAINCTL_SPOT_POLL_S", "0.1")
        yield server


@pytest.fixture(autouse=True)
def _nothing_left():
    yield
    end_local_instances_then_assert_nothing_running()


def _launch(store: str, *args: str, **options) -> api.Run:
    run = api.launch(str(SCRIPT), args=list(args), sync_code=False, provider="local", store=store, detach=True, **options)
    assert isinstance(run, api.Run)
    return run


def _state(run: api.Run) -> JobState:
    state = run.state()
    assert state is not None
    return state


def _step(run: api.Run) -> int:
    status = read_status(run.run_url)
    return -1 if status is None or status.global_step is None else status.global_step


def _running_attempt(run: api.Run, number: int) -> bool:
    state = _state(run)
    return state.phase is JobPhase.RUNNING and len(state.attempts) == number


def _training(run: api.Run, number: int, ahead: int) -> bool:
    """Attempt ``number`` trains, ``ahead`` steps past where the attempt before it got (the
    status the run shows is the earlier attempt's until the new job's first report)."""
    state = _state(run)
    if state.phase is not JobPhase.RUNNING or len(state.attempts) != number:
        return False
    if "START step=" not in run.logs().rpartition(f"--- attempt {number} ")[2]:
        return False
    before = state.attempts[-2].last_step if number > 1 else None
    return _step(run) >= (before or 0) + ahead


def _agent(instance_id: str) -> dict:
    """The live agent (not the supervisor) on the instance."""
    record = LocalProvider().describe(instance_id)
    [agent] = [a for a in record.details["agents"] if a.get("role") is None and a["alive"]]
    return agent


def _kill_instance(run: api.Run) -> None:
    """What losing the instance does to it: the agent and its job are gone at once, no word said."""
    assert run.instance_id is not None
    agent = _agent(run.instance_id)
    job_pid = _state(run).pid
    assert job_pid is not None
    os.kill(agent["pid"], signal.SIGKILL)
    os.killpg(job_pid, signal.SIGKILL)


def _notice_and_wait(run: api.Run, imds: LocalIMDS, attempts: int) -> int:
    """Post a spot notice, wait for the attempt to end preempted; the step at the notice."""
    at = _step(run)
    imds.notice(in_s=3)
    wait_until(
        lambda: (s := _state(run)).phase is JobPhase.RECOVERING or len(s.attempts) > attempts or s.phase.is_terminal(),
        60,
        0.02,
        what="the preemption",
    )
    imds.clear()  # the replacement is another instance: no notice there
    return at


@pytest.mark.slow
def test_three_interruptions_and_the_steps_stay_continuous(file_store: str, imds: LocalIMDS) -> None:
    run = _launch(file_store, "--max-steps", "300", "--every", "10", recover=True, max_restarts=3)
    wait_until(lambda: _training(run, 1, 15), 120, 0.2, what="attempt 1 training")
    noticed = [_notice_and_wait(run, imds, 1)]

    wait_until(lambda: _training(run, 2, 12), 120, 0.2, what="attempt 2 training")
    _kill_instance(run)
    newest = RunStore(run.run_url).latest_checkpoint()
    assert newest is not None

    wait_until(lambda: _training(run, 3, 5), 120, 0.2, what="attempt 3 training")
    noticed.append(_notice_and_wait(run, imds, 3))

    final = wait_until(lambda: (s := _state(run)).phase.is_terminal() and s, 180, what="the run to end")
    assert final.phase is JobPhase.SUCCEEDED, final.error
    a = final.attempts
    assert [x.number for x in a] == [1, 2, 3, 4]
    assert [x.ended for x in a] == ["preempted", "lost", "preempted", "finished"]
    # a notice: the preempt checkpoint is taken after it, so the replacement loses nothing
    assert a[1].resumed_step is not None and a[1].resumed_step >= noticed[0]
    assert a[3].resumed_step is not None and a[3].resumed_step >= noticed[1]
    # no notice: the replacement starts from the newest checkpoint published before the kill
    assert a[2].resumed_from == newest.id and a[2].resumed_step == newest.global_step

    steps = [r.step for r in read_metrics(run.run_url) if "train_loss" in r.metrics]
    assert sorted(set(steps)) == list(range(min(steps), max(steps) + 1)), "a step was skipped"
    repeats = len(steps) - len(set(steps))
    redone = sum(
        x.last_step - y.resumed_step for x, y in itertools.pairwise(a) if x.last_step is not None and y.resumed_step is not None
    )
    assert repeats <= redone + 3 * 2, (repeats, redone)  # only steps past the checkpoint resumed from are trained again
    logs = run.logs()
    for number in (2, 3, 4):
        assert f"--- attempt {number} on {run.instance_id}, resuming from " in logs
    assert logs.index("--- attempt 2") < logs.index("--- attempt 3") < logs.index("--- attempt 4")
    assert "DONE step=300" in logs


@pytest.mark.slow
def test_max_restarts_reached_gives_a_clear_final_state(file_store: str) -> None:
    run = _launch(file_store, "--max-steps", "100000", recover=True, max_restarts=1)
    for number in (1, 2):
        wait_until(lambda n=number: _training(run, n, 1), 120, 0.2, what=f"attempt {number} training")
        _kill_instance(run)
    final = wait_until(lambda: (s := _state(run)).phase.is_terminal() and s, 60, what="the run to end")
    assert final.phase is JobPhase.FAILED
    assert final.error is not None and final.error.startswith("gave up after 1 restarts (max_restarts=1): last attempt lost")
    assert [x.ended for x in final.attempts] == ["lost", "lost"]
    assert "gave up after 1 restarts" in run.logs()


def test_a_user_error_is_not_retried(file_store: str) -> None:
    run = _launch(file_store, "--fail", recover=True)
    final = wait_until(lambda: (s := _state(run)).phase.is_terminal() and s, 120, what="the run to end")
    assert final.phase is JobPhase.FAILED and final.exit_code == 1
    assert [x.ended for x in final.attempts] == ["failed"]
    assert "user error: this script fails on purpose" in final.error_tail


def test_cancel_during_recovery_leaves_nothing(file_store: str) -> None:
    run = _launch(file_store, "--max-steps", "100000", recover=True)
    wait_until(lambda: _training(run, 1, 1), 120, 0.2, what="attempt 1 training")
    _kill_instance(run)
    run.cancel("cancelled during recovery")
    final = wait_until(lambda: (s := _state(run)).phase.is_terminal() and s, 90, what="the run to end")
    assert final.phase is JobPhase.CANCELLED
    assert not [a for a in final.attempts if a.ended is None]
    wait_until(lambda: not live_agent_pids(), 30, what="every agent and job to end")
    assert [i.id for i in LocalProvider().list()] == []


def test_terminate_ends_the_supervisor_and_the_run(file_store: str) -> None:
    run = _launch(file_store, "--max-steps", "100000", recover=True)
    wait_until(lambda: _running_attempt(run, 1), 120, what="attempt 1 running")
    assert run.instance_id is not None
    api.terminate(run.instance_id)
    assert _state(run).phase is JobPhase.CANCELLED
    record = LocalProvider().describe(run.instance_id)
    assert not [a for a in record.details["agents"] if process_alive(a["pid"], a.get("start_time"))]
    assert not live_agent_pids()


@pytest.mark.slow
def test_recovery_goes_on_with_the_launcher_gone(file_store: str, tmp_path: Path) -> None:
    project = tmp_path / "project"
    for rel in ("tests/__init__.py", "tests/helpers/__init__.py", "tests/helpers/models.py", "tests/scripts/recover_train.py"):
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, project / rel)
    out = subprocess.run(
        [*TRAINCTL, "launch", "tests/scripts/recover_train.py", "--store", file_store,
         "--detach", "--recover", "--max-restarts", "2", "--output", "json", "--", "--max-steps", "60"],
        cwd=project, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    run = api.get_run(json.loads(out.stdout)["run_url"])
    run.instance_id = json.loads(out.stdout)["instance_id"]
    wait_until(lambda: _training(run, 1, 5), 120, 0.2, what="attempt 1 training")
    _kill_instance(run)
    final = wait_until(lambda: (s := _state(run)).phase.is_terminal() and s, 180, what="the run to end")
    assert final.phase is JobPhase.SUCCEEDED, final.error
    assert [x.ended for x in final.attempts] == ["lost", "finished"]
    assert_nothing_running()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_restarts": 2}, "max_restarts = 2 needs recover=True"),
        ({"recover": True, "max_restarts": 0}, "max_restarts = 0 is not allowed"),
        ({"recover": RecoverPolicy(max_hours=1)}, None),
    ],
)
def test_recover_options_are_checked_before_anything_is_created(file_store: str, options: dict, message: str | None) -> None:
    if message is None:
        plan = api.launch(str(SCRIPT), sync_code=False, provider="local", store=file_store, dry_run=True, **options)
        assert isinstance(plan, api.LaunchPlan) and plan.job.recover == RecoverPolicy(max_hours=1)
        return
    with pytest.raises(ConfigError, match=message):
        api.launch(str(SCRIPT), sync_code=False, provider="local", store=file_store, **options)
    assert LocalProvider().list() == []


@pytest.mark.parametrize("bad", [{"max_hours": float("inf")}, {"max_cost": float("nan")}, {"max_restarts": True}])
def test_recover_policy_limits_are_finite_positive_numbers(bad: dict) -> None:
    with pytest.raises(ConfigError, match="is not allowed|must be"):
        RecoverPolicy(**bad)


def test_a_replacement_started_by_the_cloud_numbers_its_attempt_from_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """An AWS group's replacement boots the same script, with no attempt number of its own: it
    takes the next one after those the run's state records (and an explicit one wins)."""
    from trainctl_lightning.agent.attempts import current_attempt
    from trainctl_lightning.jobs.spec import Attempt
    from trainctl_lightning.timeutil import utc_now

    monkeypatch.delenv("TRAINCTL_ATTEMPT", raising=False)
    assert current_attempt(None) == 1
    previous = JobState(
        run_id="r-1", phase=JobPhase.RECOVERING, updated_at=utc_now(), attempts=[Attempt(number=1), Attempt(number=2)]
    )
    assert current_attempt(previous) == 3
    monkeypatch.setenv("TRAINCTL_ATTEMPT", "7")
    assert current_attempt(previous) == 7
    monkeypatch.setenv("TRAINCTL_ATTEMPT", "nonsense")
    assert current_attempt(previous) == 3


def _first_attempt_age_s(run: api.Run) -> float:
    from trainctl_lightning.timeutil import parse_time

    first = _state(run).attempts[0].started_at
    assert first is not None
    return time.time() - parse_time(first).timestamp()


@pytest.mark.slow
def test_max_hours_stops_a_managed_run_when_an_attempt_ends(file_store: str, imds: LocalIMDS) -> None:
    """max_hours is checked when an attempt ends: a preemption past it ends the run failed."""
    policy = RecoverPolicy(max_hours=0.001)  # 3.6 s
    run = _launch(file_store, "--max-steps", "100000", recover=policy)
    wait_until(lambda: _training(run, 1, 1), 120, 0.2, what="attempt 1 training")
    wait_until(lambda: _first_attempt_age_s(run) > policy.max_hours * 3600, 30, 0.1, what="max_hours to pass")
    _notice_and_wait(run, imds, 1)
    final = wait_until(lambda: (s := _state(run)).phase.is_terminal() and s, 60, what="the run to end")
    assert final.phase is JobPhase.FAILED, final.error
    assert final.error is not None and final.error.startswith("gave up after 0 restarts: "), final.error
    assert "h since the first attempt (max_hours=0.001): last attempt preempted" in final.error
    assert [x.ended for x in final.attempts] == ["preempted"]
    assert "(max_hours=0.001)" in run.logs()


@pytest.mark.slow
def test_max_cost_stops_a_managed_run_after_a_lost_attempt(file_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """max_cost with the price the supervisor is given: a lost attempt past it ends the run failed."""
    monkeypatch.setenv(PRICE_ENV, "3600")  # 1 per second
    policy = RecoverPolicy(max_cost=2.0)
    run = _launch(file_store, "--max-steps", "100000", recover=policy)
    wait_until(lambda: _training(run, 1, 1), 120, 0.2, what="attempt 1 training")
    wait_until(lambda: _first_attempt_age_s(run) > 2.0, 30, 0.1, what="max_cost to be spent")
    _kill_instance(run)
    final = wait_until(lambda: (s := _state(run)).phase.is_terminal() and s, 60, what="the run to end")
    assert final.phase is JobPhase.FAILED, final.error
    assert final.error is not None and final.error.startswith("gave up after 0 restarts: "), final.error
    assert " spent at 3600/h (max_cost=2): last attempt lost" in final.error
    assert [x.ended for x in final.attempts] == ["lost"]
    assert len(_state(run).attempts) == 1  # no replacement was started


def test_limits_under_the_cap_let_a_replacement_start() -> None:
    """The other side of the two tests above: within max_hours and max_cost a replacement may follow."""
    from trainctl_lightning.jobs.spec import Attempt
    from trainctl_lightning.timeutil import utc_now

    attempts = [Attempt(number=1, started_at=utc_now(), ended="preempted")]
    assert RecoverPolicy(max_hours=1, max_cost=10).gives_up(attempts, price_per_hour=1.0) is None
    assert RecoverPolicy(max_cost=10).gives_up(attempts, price_per_hour=None) is None  # no price: no cost cap
    later = time.time() + 7200
    assert "max_hours=1" in (RecoverPolicy(max_hours=1).gives_up(attempts, now=later) or "")
    assert "max_cost=1.5" in (RecoverPolicy(max_cost=1.5).gives_up(attempts, price_per_hour=1.0, now=later) or "")


def _write_run_between_attempts(url: str) -> None:
    """What a managed run between attempts leaves in the store: the preempted attempt's last
    status (its MetricsReporter's) and a job state that says ``recovering``."""
    from trainctl_lightning.jobs.spec import Attempt
    from trainctl_lightning.jobs.store import JobStore
    from trainctl_lightning.metrics.records import Phase, RunStatus
    from trainctl_lightning.timeutil import utc_now

    now = utc_now()
    notice = {"action": "terminate", "time": now, "seen_at": now}
    status = RunStatus(
        phase=Phase.INTERRUPTED, updated_at=now, started_at=now, refresh_interval_s=5.0, global_step=40, interruption=notice
    )
    RunStore(url).write_status(status.to_json())
    attempt = Attempt(number=1, instance_id="local-x", started_at=now, ended_at=now, ended="preempted", last_step=40)
    JobStore(url).write_state(
        JobState(
            run_id=run_id_of(url), phase=JobPhase.RECOVERING, updated_at=now, attempts=[attempt], error="attempt 1 preempted"
        )
    )


def _end_run(url: str) -> None:
    from trainctl_lightning.jobs.store import JobStore
    from trainctl_lightning.metrics.records import Phase, RunStatus
    from trainctl_lightning.timeutil import utc_now

    now = utc_now()
    RunStore(url).write_status(
        RunStatus(phase=Phase.FINISHED, updated_at=now, started_at=now, refresh_interval_s=5.0, global_step=100).to_json()
    )
    state = JobStore(url).read_state()
    assert state is not None
    state.phase, state.ended_at = JobPhase.SUCCEEDED, now
    state.touch()
    JobStore(url).write_state(state)


def test_runs_ls_and_monitor_show_recovering(file_store: str) -> None:
    url = f"{file_store.rstrip('/')}/managed"
    _write_run_between_attempts(url)
    [row] = json.loads(trainctl("runs", "ls", file_store, "--output", "json").stdout)["runs"]
    assert row["recovering"] is True
    table = trainctl("runs", "ls", file_store)
    assert table.returncode == 0 and "recovering" in table.stdout, table.stdout
    once = trainctl("monitor", url, "--once", "--output", "json")
    assert once.returncode == 0 and json.loads(once.stdout)["state"] == "recovering", once.stdout
    frame = trainctl("monitor", url, "--once")
    assert "recovering  (a replacement attempt is starting; the last attempt preempted)" in frame.stdout, frame.stdout

    # live: the last attempt's status has ended, but the run goes on, so the monitor watches on
    live_env = {"TTY_COMPATIBLE": "1", "TERM": "xterm", "NO_COLOR": "1"}
    with Running("monitor", url, "--interval", "0.2", env=live_env) as monitor:
        wait_until(lambda: monitor.stdout.count("recovering") >= 2, 30, what="two frames showing recovering")
        assert monitor.proc.poll() is None, (monitor.stdout, monitor.stderr)
        _end_run(url)
        assert monitor.wait(30) == 0, monitor.stderr
    assert "finished" in monitor.stdout


@pytest.mark.slow
def test_the_final_weights_equal_an_uninterrupted_run(file_store: str, imds: LocalIMDS, tmp_path: Path) -> None:
    """Fixed seed, resumable loader: a managed run interrupted by a notice and by a hard kill
    (the replacement resumes from the newest published checkpoint, taken at a step's end)
    ends with exactly the weights of one fit without interruption."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.helpers.models import ResumableRegressor, trainer_kwargs

    steps, every, lr = 120, 10, 0.01  # the default lr diverges to NaN over 120 steps, and NaN equals nothing
    args = ("--max-steps", str(steps), "--every", str(every), "--resumable", "--lr", str(lr))
    run = _launch(file_store, *args, recover=True, max_restarts=3)
    wait_until(lambda: _training(run, 1, 15), 120, 0.2, what="attempt 1 training")
    _notice_and_wait(run, imds, 1)
    wait_until(lambda: _training(run, 2, 12), 120, 0.2, what="attempt 2 training")
    before = _state(run).attempts[-1].resumed_step
    wait_until(
        lambda: (c := RunStore(run.run_url).latest_checkpoint()) is not None and c.global_step != before,
        60,
        0.05,
        what="a checkpoint published by attempt 2",
    )
    _kill_instance(run)
    final = wait_until(lambda: (s := _state(run)).phase.is_terminal() and s, 180, what="the run to end")
    assert final.phase is JobPhase.SUCCEEDED, final.error
    assert [x.ended for x in final.attempts] == ["preempted", "lost", "finished"]
    assert all(x.resumed_from for x in final.attempts[1:]), "each replacement resumed"

    store = RunStore(run.run_url)
    newest = store.latest_checkpoint()
    assert newest is not None and newest.global_step == steps
    path = store.download_checkpoint(newest, tmp_path / "final")
    got = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]

    torch.manual_seed(0)
    straight = ResumableRegressor(lr=lr)
    pl.Trainer(
        **trainer_kwargs(max_steps=steps, max_epochs=-1, limit_val_batches=0, default_root_dir=str(tmp_path / "straight")),
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "straight", every_n_train_steps=every, save_top_k=-1)],
    ).fit(straight)
    expected = straight.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs from the uninterrupted run"
    assert torch.isfinite(got["net.0.weight"]).all() and not torch.equal(
        ResumableRegressor().state_dict()["net.0.weight"], got["net.0.weight"]
    ), "it trained"


@pytest.mark.slow
def test_a_killed_supervisor_then_terminate_leaves_nothing(file_store: str) -> None:
    """The supervisor SIGKILLed: the current attempt's agent goes on (it is a process of its own);
    no replacement will follow it, and ``terminate`` ends the agent and the job, and says so."""
    run = _launch(file_store, "--max-steps", "100000", recover=True)
    wait_until(lambda: _training(run, 1, 1), 120, 0.2, what="attempt 1 training")
    assert run.instance_id is not None
    record = LocalProvider().describe(run.instance_id)
    [supervisor] = [a for a in record.details["agents"] if a.get("role") == "supervisor" and a["alive"]]
    os.kill(supervisor["pid"], signal.SIGKILL)
    wait_until(lambda: not process_alive(supervisor["pid"], supervisor.get("start_time")), 30, what="the supervisor to die")
    at = _step(run)
    wait_until(lambda: _step(run) > at + 3, 60, 0.1, what="the attempt to train on without its supervisor")
    assert _state(run).phase is JobPhase.RUNNING

    api.terminate(run.instance_id)
    final = _state(run)
    assert final.phase is JobPhase.CANCELLED, final
    assert [x.ended for x in final.attempts] == ["cancelled"]
    assert not live_agent_pids()
    assert [i.id for i in LocalProvider().list()] == []
