"""Spot interruptions: the agent's metadata-service watcher, against a local IMDSv2 stand-in,
and the whole path on a real agent: notice -> checkpoint published -> preempted -> resume."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.agent import make_job, run, start
from tests.helpers.provider_contract import python_job, wait_for
from trainctl_lightning import CheckpointManifest, RunStore
from trainctl_lightning.agent.spot import (
    INTERRUPTION,
    REBALANCE,
    SpotWatcher,
    handles_signal,
    spot_watch_enabled,
)
from trainctl_lightning.jobs.spec import JobPhase
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.testing import LocalIMDS


@pytest.fixture
def imds():
    with LocalIMDS() as server:
        yield server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the stand-in


def test_local_imds_requires_a_token(imds: LocalIMDS) -> None:
    url = imds.endpoint + LocalIMDS.INSTANCE_ACTION_PATH
    with pytest.raises(urllib.error.HTTPError) as no_token:
        urllib.request.urlopen(url, timeout=2)
    assert no_token.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as no_ttl:
        urllib.request.urlopen(urllib.request.Request(imds.endpoint + "/latest/api/token", method="PUT"), timeout=2)
    assert no_ttl.value.code == 400
    put = urllib.request.Request(
        imds.endpoint + "/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}
    )
    token = urllib.request.urlopen(put, timeout=2).read().decode()
    get = urllib.request.Request(url, headers={"X-aws-ec2-metadata-token": token})
    with pytest.raises(urllib.error.HTTPError) as nothing_yet:
        urllib.request.urlopen(get, timeout=2)
    assert nothing_yet.value.code == 404
    when = imds.notice(in_s=120)
    assert json.loads(urllib.request.urlopen(get, timeout=2).read()) == {"action": "terminate", "time": when}


# ---------------------------------------------------------------- the watcher


def test_watcher_sees_nothing_then_the_notice_once(imds: LocalIMDS) -> None:
    seen = []
    watcher = SpotWatcher(seen.append, endpoint=imds.endpoint)
    assert watcher.check() == [] and seen == []
    assert imds.requests[LocalIMDS.INSTANCE_ACTION_PATH] == 1 and imds.requests[LocalIMDS.REBALANCE_PATH] == 1
    when = imds.notice(action="terminate", in_s=120)
    [notice] = watcher.check()
    assert seen == [notice]
    assert (notice.kind, notice.action, notice.time) == (INTERRUPTION, "terminate", when)
    assert 100 < notice.seconds_left() <= 120
    assert watcher.check() == [], "the same notice is reported once"
    assert len(imds.tokens) == 1, "the token is reused between polls"


def test_watcher_reports_a_rebalance_recommendation(imds: LocalIMDS) -> None:
    watcher = SpotWatcher(lambda n: None, endpoint=imds.endpoint)
    imds.rebalance()
    [notice] = watcher.check()
    assert notice.kind == REBALANCE and notice.seconds_left() is None and notice.time


def test_watcher_renews_a_token_the_service_no_longer_accepts(imds: LocalIMDS) -> None:
    watcher = SpotWatcher(lambda n: None, endpoint=imds.endpoint)
    watcher.check()
    imds.tokens.clear()  # as after an expiry or a restart of the service
    imds.notice()
    assert [n.kind for n in watcher.check()] == [INTERRUPTION]
    assert len(imds.tokens) == 1


def test_watcher_survives_an_unreachable_service_and_logs_it_once(caplog: pytest.LogCaptureFixture) -> None:
    port = _free_port()
    watcher = SpotWatcher(lambda n: None, endpoint=f"http://127.0.0.1:{port}", timeout_s=0.5)
    with caplog.at_level(logging.INFO, logger="trainctl_lightning.agent.spot"):
        assert watcher.check() == [] and watcher.check() == [] and watcher.check() == []
        unreachable = [r for r in caplog.records if "cannot reach" in r.message]
        assert len(unreachable) == 1 and f"127.0.0.1:{port}" in unreachable[0].message
        with LocalIMDS(port=port) as imds:  # the service comes (back): notices are seen again
            imds.notice()
            assert [n.kind for n in watcher.check()] == [INTERRUPTION]
    assert any("answers again" in r.message for r in caplog.records)


def test_watcher_thread_starts_and_stops(imds: LocalIMDS) -> None:
    import threading

    got = threading.Event()
    watcher = SpotWatcher(lambda n: got.set(), endpoint=imds.endpoint, interval_s=0.05).start()
    try:
        imds.notice()
        assert got.wait(5)
    finally:
        watcher.stop()
    assert not any(t.name == "agent-spot-watcher" for t in threading.enumerate())


def test_spot_watch_enabled() -> None:
    assert spot_watch_enabled(True, {}) and not spot_watch_enabled(False, {})
    assert spot_watch_enabled(False, {"TRAINCTL_SPOT": "1"})
    assert not spot_watch_enabled(True, {"TRAINCTL_SPOT": "0"})


def test_handles_signal_reads_the_process_signal_mask() -> None:
    import os
    import subprocess
    import sys

    code = "import signal, sys, time; signal.signal(signal.SIGUSR1, lambda *a: None); print('ready', flush=True); time.sleep(30)"
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
        try:
            proc.stdout.readline()
            assert handles_signal(proc.pid, signal.SIGUSR1) is True
            assert handles_signal(proc.pid, signal.SIGUSR2) is False
        finally:
            proc.kill()
    assert handles_signal(os.getpid() + 10**7, signal.SIGUSR1) is None


# ---------------------------------------------------------------- checkpoint now (CheckpointSync)

SCRIPTS = Path(__file__).parent / "scripts"


def _train(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """save_now_train.py in its own process: its signal handlers never touch pytest's."""
    return subprocess.Popen(
        [sys.executable, str(SCRIPTS / "save_now_train.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def _wait_line(proc: subprocess.Popen[str], text: str, seen: list[str]) -> None:
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return
    raise AssertionError(f"{text!r} never printed:\n{''.join(seen)[-3000:]}")


def _wait_checkpoint(url: str, prefix: str, timeout: float) -> tuple[CheckpointManifest, float]:
    """The first published checkpoint whose name starts with ``prefix``, and how long it took to appear."""
    started = time.monotonic()
    store = RunStore(url)
    while time.monotonic() - started < timeout:
        found = [m for m in store.list_checkpoints() if m.name.startswith(prefix)]
        if found:
            return found[0], time.monotonic() - started
        time.sleep(0.05)
    logs = JobStore(url).read_logs().decode(errors="replace")[-3000:] if JobStore(url).exists() else ""
    raise AssertionError(
        f"no {prefix}* checkpoint in {url} after {timeout}s: {[m.name for m in store.list_checkpoints()]}\n{logs}"
    )


@pytest.mark.slow
def test_sigusr1_saves_and_publishes_now_and_chains_to_the_previous_handler(s3, tmp_path: Path) -> None:
    url = s3.url()
    proc = _train(url, str(tmp_path / "c"), "--max-steps", "60", "--chain", env=s3.env())
    out: list[str] = []
    try:
        _wait_line(proc, "TRAINING", out)
        proc.send_signal(signal.SIGUSR1)
        manifest, took = _wait_checkpoint(url, "preempt-step=", timeout=30)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(out) + rest
    assert proc.returncode == 0, text[-3000:]
    assert took < 10, f"published {took:.1f}s after SIGUSR1"
    assert manifest.name == f"preempt-step={manifest.global_step}.ckpt" and 3 <= manifest.global_step < 60
    RunStore(url).verify_checkpoint(manifest)
    assert (tmp_path / "c" / manifest.name).is_file(), "saved beside ModelCheckpoint's files"
    assert f"published as {url}/checkpoints/{manifest.id}" in text, "the published id is logged"
    assert "PREVIOUS HANDLER" in text and "HANDLER RESTORED" in text


@pytest.mark.slow
def test_request_checkpoint_from_the_training_loop(file_url: str, tmp_path: Path) -> None:
    proc = _train(file_url, str(tmp_path / "c"), "--max-steps", "12", "--request-at", "5")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    names = {m.name: m for m in RunStore(file_url).list_checkpoints()}
    # asked for by a callback that runs before CheckpointSync's hook: saved at the end of that very batch
    assert names["requested-step=5.ckpt"].global_step == 5, out[-3000:]
    assert "requested-step=5.ckpt (step 5) published as" in out
    assert "HANDLER RESTORED" in out


@pytest.mark.slow
def test_sigusr1_to_rank_zero_alone_saves_on_every_rank_under_ddp(file_url: str, tmp_path: Path) -> None:
    # the agent signals the job's main process only: rank zero shares the request with the others
    proc = _train(file_url, str(tmp_path / "c"), "--ddp", "--max-steps", "40")
    out: list[str] = []
    try:
        _wait_line(proc, "TRAINING", out)
        proc.send_signal(signal.SIGUSR1)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(out) + rest
    assert proc.returncode == 0, text[-3000:]
    assert "RANK 0 DONE step=40" in text and "RANK 1 DONE step=40" in text, "no rank hung or died"
    [manifest] = [m for m in RunStore(file_url).list_checkpoints() if m.name.startswith("preempt-step=")]
    RunStore(file_url).verify_checkpoint(manifest)


# ---------------------------------------------------------------- the agent on a spot instance


def _spot_env(imds: LocalIMDS) -> dict[str, str]:
    return {"TRAINCTL_SPOT": "1", "TRAINCTL_IMDS_ENDPOINT": imds.endpoint, "TRAINCTL_SPOT_POLL_S": "0.2"}


def _wait_logs(jobs: JobStore, text: bytes, agent: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in jobs.read_logs():
        if agent.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the job's log: {jobs.read_logs().decode()[-3000:]}")
        time.sleep(0.1)


def _stop_agent(agent: subprocess.Popen) -> None:
    if agent.poll() is None:
        agent.kill()
    agent.communicate(timeout=30)


@pytest.mark.slow
def test_notice_mid_training_publishes_a_checkpoint_marks_preempted_and_resume_continues(
    s3, imds: LocalIMDS, tmp_path: Path, workdir: Path
) -> None:
    store = f"s3://{s3.bucket}/store"
    # "-": the script syncs to $TRAINCTL_RUN_URL, which the agent sets
    jobs = make_job(store, script=str(SCRIPTS / "save_now_train.py"), args=["-", str(tmp_path / "c")])
    url = jobs.url
    agent = start(jobs, workdir, _spot_env(imds))
    try:
        _wait_logs(jobs, b"TRAINING", agent)
        noticed = time.monotonic()
        when = imds.notice(action="terminate", in_s=120)
        manifest, took = _wait_checkpoint(url, "preempt-step=", timeout=60)
        print(f"\nnotice -> checkpoint published: {took:.2f}s (deadline 120s)")
        assert took < 30, f"published {took:.1f}s after the notice: too close to EC2's two minutes"
        running = jobs.read_state()
        assert running.phase is JobPhase.RUNNING and running.interruption["time"] == when
        assert running.interruption["action"] == "terminate"
        # the instance goes down: the OS SIGTERMs the agent
        agent.send_signal(signal.SIGTERM)
        agent.communicate(timeout=60)
    finally:
        _stop_agent(agent)
    state = jobs.read_state()
    assert state.phase is JobPhase.PREEMPTED and state.state() == "preempted"
    assert state.error.startswith(f"spot interruption notice at {when}"), state.error
    logs = jobs.read_logs().decode()
    assert "spot interruption notice: terminate at" in logs and "sent SIGUSR1 to the job" in logs
    assert time.monotonic() - noticed < 120
    RunStore(url).verify_checkpoint(manifest)

    # a second attempt picks up where the preempted one saved
    resumed = _train(url, str(tmp_path / "c2"), "--resume", "--max-steps", str(manifest.global_step + 3), env=s3.env())
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, out[-3000:]
    assert f"START step={manifest.global_step}" in out, out[-3000:]


def test_the_agent_stops_the_job_when_the_notice_time_comes(file_store: str, imds: LocalIMDS, workdir: Path) -> None:
    # a job that handles no SIGUSR1 is never sent one (it would kill it): it runs until the notice's time
    jobs = make_job(file_store, **python_job("import time; print('up', flush=True); time.sleep(60)"))
    agent = start(jobs, workdir, _spot_env(imds))
    try:
        _wait_logs(jobs, b"up", agent)
        when = imds.notice(in_s=3)
        done = wait_for(jobs, timeout=30)
        agent.communicate(timeout=30)
    finally:
        _stop_agent(agent)
    assert done.phase is JobPhase.PREEMPTED and done.error == f"spot interruption notice at {when}"
    logs = jobs.read_logs().decode()
    assert "does not handle SIGUSR1" in logs and "sent SIGUSR1" not in logs
    assert agent.returncode != 0


def test_a_rebalance_recommendation_asks_for_a_checkpoint_without_preempting(
    file_store: str, imds: LocalIMDS, workdir: Path
) -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGUSR1, lambda *a: print('SAVE NOW', flush=True)); "
        "print('up', flush=True); time.sleep(3)"
    )
    jobs = make_job(file_store, **python_job(code))
    agent = start(jobs, workdir, _spot_env(imds))
    try:
        _wait_logs(jobs, b"up", agent)
        imds.rebalance()
        agent.communicate(timeout=30)
    finally:
        _stop_agent(agent)
    state = jobs.read_state()
    assert state.phase is JobPhase.SUCCEEDED and state.interruption is None
    logs = jobs.read_logs().decode()
    assert "rebalance recommendation" in logs and "SAVE NOW" in logs


def test_no_watcher_unless_the_instance_is_spot(file_store: str, imds: LocalIMDS, workdir: Path) -> None:
    jobs = make_job(file_store, **python_job("print('done')"))
    done = run(jobs, workdir, {"TRAINCTL_IMDS_ENDPOINT": imds.endpoint, "TRAINCTL_SPOT_POLL_S": "0.1"})
    assert done.returncode == 0 and imds.requests == {}
    jobs = make_job(file_store, spot=True, **python_job("import time; time.sleep(0.5)"))
    done = run(jobs, workdir, {"TRAINCTL_IMDS_ENDPOINT": imds.endpoint, "TRAINCTL_SPOT_POLL_S": "0.1"})
    assert done.returncode == 0 and imds.requests.get(LocalIMDS.INSTANCE_ACTION_PATH, 0) >= 1
