"""Managed multi-node runs (``--recover`` with ``nodes=2``) on the local provider: one supervisor on
node 0's instance starts both nodes' agents for every attempt, a real ``torchrun`` with gloo on each,
a real ``Trainer.fit(num_nodes=2)`` with CheckpointSync. A node's agent SIGKILLed (its instance
"lost") restarts the whole group from the newest checkpoint; past ``max_restarts`` the run gives
up; a script failing by itself on one node is not restarted.

The launch is done by hand as ``execute_plan`` does it for ``--nodes 2 --recover`` (instances
created together, signed spec, queued state, ``start_agent`` for each node), with fast intervals.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.helpers.leftovers import end_local_instances_then_assert_nothing_running, live_agent_pids
from tests.helpers.provider_contract import FAST
from trainctl_lightning import launch as api
from trainctl_lightning.agent.nodes import PeerFailure, attempt_of, attempt_outcome, of_attempt
from trainctl_lightning.jobs.spec import Attempt, EnvMode, JobPhase, JobSpec, JobState, RecoverPolicy, new_run_id
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.providers.api import AgentLaunch, InstanceSpec
from trainctl_lightning.providers.local import LocalProvider
from trainctl_lightning.runkey import new_key
from trainctl_lightning.store.layout import run_url_in
from trainctl_lightning.store.run import RunStore
from trainctl_lightning.timeutil import utc_now

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "scripts" / "multinode_train.py"
_START_STEP = re.compile(r"RANK global_rank=(\d+) .* step=(\d+)")


@pytest.fixture(autouse=True)
def _nothing_left():
    yield
    end_local_instances_then_assert_nothing_running()


def _launch(store: str, policy: RecoverPolicy, *args: str) -> tuple[JobStore, JobSpec]:
    provider = LocalProvider()
    instances = provider.create_nodes(InstanceSpec(nodes=2))
    run_id = new_run_id("mn-recover")
    spec = JobSpec(
        run_id=run_id,
        run_url=run_url_in(store, run_id),
        created_at=utc_now(),
        script=str(SCRIPT),
        args=["--nodes", "2", "--devices", "1", *args],
        env_mode=EnvMode.REUSE,
        provider="local",
        instance_id=instances[0].id,
        terminate_instance_after=True,
        nodes=2,
        nproc_per_node=1,
        node_instances=[i.id for i in instances],
        recover=policy,
        **FAST,
    )
    key = new_key()
    jobs = JobStore(spec.run_url)
    jobs.write_spec(spec, key)
    jobs.write_state(JobState(run_id=run_id, phase=JobPhase.QUEUED, updated_at=utc_now(), queued_at=spec.created_at, node=0))
    for node, instance in enumerate(instances):
        provider.start_agent(instance, AgentLaunch(run_id=run_id, run_url=spec.run_url, run_key=key, node=node))
    return jobs, spec


def _attempt_logs(jobs: JobStore, node: int, number: int) -> str:
    """Node ``node``'s output of attempt ``number`` (from its marker line on)."""
    text = jobs.for_node(node).read_logs().decode(errors="replace")
    _, found, after = text.partition(f"--- attempt {number} ")
    return after.partition(f"--- attempt {number + 1} ")[0] if found else ""


def _training(jobs: JobStore, number: int) -> bool:
    """Both nodes train in attempt ``number`` (each rank printed its start line there)."""
    return all(_START_STEP.search(_attempt_logs(jobs, k, number)) for k in (0, 1))


def _kill_agent(spec: JobSpec, node: int) -> None:
    """Node ``node``'s agent SIGKILLed without a word: what losing its instance does to it."""
    record = LocalProvider().describe(spec.node_instances[node])
    [agent] = [a for a in record.details["agents"] if a.get("role") is None and a["alive"]]
    os.kill(agent["pid"], signal.SIGKILL)


def _ended(jobs: JobStore) -> JobState | None:
    state = jobs.read_state()
    return state if state is not None and state.phase.is_terminal() else None


def _all_released(spec: JobSpec) -> None:
    """The supervisor released every node's instance (once the lead's agent and its own work ended)."""

    def states() -> dict[str, str]:
        return {i.id: i.state.value for i in LocalProvider().list(include_terminated=True) if i.id in spec.node_instances}

    wait_until(lambda: states() == dict.fromkeys(spec.node_instances, "terminated"), 30, 0.1, what="both instances released")
    wait_until(lambda: not live_agent_pids(), 30, 0.1, what="every agent, torchrun and worker gone")


def test_a_lost_node_restarts_the_group_from_the_newest_checkpoint(file_store: str) -> None:
    jobs, spec = _launch(file_store, RecoverPolicy(max_restarts=2), "--max-steps", "24", "--step-s", "0.1")
    store = RunStore(spec.run_url)
    wait_until(
        lambda: _training(jobs, 1) and (c := store.latest_checkpoint()) is not None and c.global_step >= 4,
        180,
        0.2,
        what="attempt 1 training on both nodes, a checkpoint published",
    )
    _kill_agent(spec, 1)

    final = wait_until(lambda: _ended(jobs), 240, 0.2, what="the run's end")
    assert final.phase is JobPhase.SUCCEEDED, (final.error, jobs.read_logs().decode()[-3000:])
    first, second = final.attempts
    assert (first.ended, second.ended) == ("lost", "finished")
    assert first.error is not None and first.error.startswith("node 1 lost: agent pid "), first.error
    # attempt 2 ran on both nodes, in a rendezvous of its own, from the newest checkpoint
    assert second.resumed_step is not None and second.resumed_step >= 4
    for node in (0, 1):
        starts = [int(step) for _, step in _START_STEP.findall(_attempt_logs(jobs, node, 2))]
        assert starts == [second.resumed_step], (node, starts)
    assert "rendezvous " + f"{spec.run_id}-a2 " in _attempt_logs(jobs, 1, 2)
    node1 = jobs.for_node(1).read_state()
    assert node1 is not None and attempt_of(node1) == 2 and node1.phase is JobPhase.SUCCEEDED
    assert [a.ended for a in node1.attempts] == ["lost", "finished"]
    assert max(c.global_step for c in store.list_checkpoints()) == 24
    _all_released(spec)


def test_max_restarts_reached_ends_the_group_failed(file_store: str) -> None:
    jobs, spec = _launch(file_store, RecoverPolicy(max_restarts=1), "--max-steps", "100000", "--step-s", "0.05")
    wait_until(lambda: _training(jobs, 1), 180, 0.2, what="attempt 1 training on both nodes")
    _kill_agent(spec, 1)
    wait_until(lambda: _training(jobs, 2), 180, 0.2, what="attempt 2 training on both nodes")
    _kill_agent(spec, 0)  # the lead this time: the supervisor stops node 1 and records the loss

    final = wait_until(lambda: _ended(jobs), 120, 0.2, what="the run's end")
    assert final.phase is JobPhase.FAILED
    assert final.error is not None and final.error.startswith("gave up after 1 restarts (max_restarts=1): last attempt lost")
    assert [a.ended for a in final.attempts] == ["lost", "lost"]
    assert "gave up after 1 restarts" in jobs.read_logs().decode()
    _all_released(spec)


def test_a_user_error_on_one_node_is_not_restarted(file_store: str) -> None:
    jobs, spec = _launch(file_store, RecoverPolicy(max_restarts=2), "--max-steps", "100000", "--fail-node", "1")
    final = wait_until(lambda: _ended(jobs), 180, 0.2, what="the run's end")
    assert final.phase is JobPhase.FAILED
    assert [a.ended for a in final.attempts] == ["failed"]
    assert final.failed_node is not None and final.error is not None and "node " in final.error
    assert "user error: this script fails on node 1 on purpose" in jobs.for_node(1).read_logs().decode()
    _all_released(spec)


def test_launched_with_recover_and_two_nodes_a_cancel_ends_every_node_and_no_attempt_follows(file_store: str) -> None:
    run = api.launch(
        str(SCRIPT),
        args=["--nodes", "2", "--devices", "1", "--max-steps", "100000", "--step-s", "0.05"],
        sync_code=False,
        provider="local",
        store=file_store,
        detach=True,
        nodes=2,
        nproc_per_node=1,
        recover=True,
    )
    assert isinstance(run, api.Run) and len(run.node_instances) == 2
    wait_until(lambda: _training(run.job, 1), 180, 0.2, what="attempt 1 training on both nodes")
    # one supervisor, on node 0's instance; node 1's agent was started by it, not by the launch
    roles = [[a.get("role") for a in LocalProvider().describe(i).details["agents"]] for i in run.node_instances]
    assert roles == [["supervisor", None], [None]]
    run.cancel("cancelled by the test")
    final = wait_until(lambda: _ended(run.job), 120, 0.2, what="the run's end")
    assert final.phase is JobPhase.CANCELLED, final.error
    assert [a.ended for a in final.attempts] == ["cancelled"]
    assert {s.phase for s in run.node_states() if s} == {JobPhase.CANCELLED}
    wait_until(
        lambda: {i.state.value for i in LocalProvider().list(include_terminated=True)} == {"terminated"},
        30,
        0.1,
        what="both instances released",
    )


# ---------------------------------------------------------------- how an attempt ended across nodes


def _node_state(phase: JobPhase, attempt: int = 1, ended: str | None = None, error: str | None = None) -> JobState:
    return JobState(
        run_id="r",
        phase=phase,
        updated_at=utc_now(),
        ended_at=utc_now(),
        error=error,
        attempts=[Attempt(number=n, ended=ended if n == attempt else "lost") for n in range(1, attempt + 1)],
    )


@pytest.mark.parametrize(
    ("own", "peer", "cause", "expected"),
    [
        # the lead's job failed first (its gloo connection reset), node 1 was lost: the attempt is lost
        (
            JobPhase.FAILED,
            _node_state(JobPhase.FAILED, ended="lost", error="agent pid 7 died"),
            None,
            ("lost", 1, "node 1 lost: agent pid 7 died"),
        ),
        (JobPhase.FAILED, None, None, ("lost", 1, "node 1 lost: it did not end within 20s of node 0")),
        (JobPhase.FAILED, _node_state(JobPhase.RUNNING), PeerFailure(1, "node 1 stopped reporting"), ("lost", 1, "node 1 lost")),
        (
            JobPhase.FAILED,
            _node_state(JobPhase.PREEMPTED, error="spot notice"),
            None,
            ("preempted", 1, "node 1 preempted: spot notice"),
        ),
        (JobPhase.PREEMPTED, _node_state(JobPhase.FAILED, ended="failed"), None, ("preempted", 0, "node 0 preempted")),
        # the script failed by itself somewhere: the run's failed-first node and error stand
        (JobPhase.FAILED, _node_state(JobPhase.FAILED, ended="failed", error="exit 1"), None, ("failed", 1, "RUN ERROR")),
        (JobPhase.CANCELLED, _node_state(JobPhase.CANCELLED, ended="cancelled"), None, ("cancelled", None, "RUN ERROR")),
        (JobPhase.SUCCEEDED, _node_state(JobPhase.SUCCEEDED, ended="finished"), None, ("finished", None, None)),
    ],
)
def test_a_lost_or_preempted_node_makes_the_attempt_lost_or_preempted(
    own: JobPhase, peer: JobState | None, cause: PeerFailure | None, expected: tuple
) -> None:
    run_phase = own if own in (JobPhase.SUCCEEDED, JobPhase.CANCELLED) else JobPhase.FAILED
    got = attempt_outcome(run_phase, "RUN ERROR", 1, own, "own error", cause, {1: peer}, 20.0)
    ended, node, error = expected
    assert (got.ended.value, got.node) == (ended, node)
    if error in (None, "RUN ERROR"):  # the run's own end stands
        assert got.error == error
    else:
        assert got.error is not None and got.error.startswith(error), got.error


def test_a_peer_state_of_another_attempt_counts_as_not_written() -> None:
    before = _node_state(JobPhase.FAILED, attempt=1, ended="lost")
    assert attempt_of(before) == 1 and attempt_of(None) is None
    assert of_attempt(before, 2) is None and of_attempt(before, 1) is before and of_attempt(before, None) is before
