"""The local provider's supervisor of a managed run (``--recover``): the cloud's replacement machinery, on this machine.

On AWS a lost or reclaimed instance is replaced by the cloud; a local "instance" has nobody
to do that, so :class:`~trainctl_lightning.providers.local.LocalProvider` starts this detached
process instead of the agent when the job spec has a :class:`~trainctl_lightning.jobs.spec.RecoverPolicy`.
It does not depend on the launcher (which may exit at once) and does what the cloud would:

- starts the agent for attempt 1 (``$TRAINCTL_ATTEMPT=1``) and waits for it to exit;
- the agent ended the attempt ``recovering`` (preempted, or a user error with
  ``retry_user_errors``, within the limits): it starts attempt N+1;
- the agent died without a final state (killed with its "instance"): it ends what is left of the
  job's process group (:mod:`.jobproc`), records the attempt as ``lost``, and, within the limits,
  sets ``recovering`` and starts the next attempt; past them, ``failed`` with one line saying so;
- anything terminal (finished, failed, cancelled, gave up) ends it, and it releases an instance
  its launch created.

A cancel request (``control/cancel.json``) or a SIGTERM (``trainctl stop``/``terminate``, which
also signal the agent it recorded on the instance) stops it relaunching: the current agent ends
its job as cancelled, and a run between attempts is ended ``cancelled`` here.

**A multi-node run** (``JobSpec.nodes`` > 1) has this one supervisor, on node 0's instance; the
provider starts nothing on the others. For each attempt it starts the agents of all nodes (each
with ``$TRAINCTL_NODE`` and ``$TRAINCTL_ATTEMPT``), and waits until every one has ended:

- a node k >= 1 whose agent died without a final state of this attempt is lost: its job group is
  ended and its state written ``failed`` with the attempt ``lost``, at once, so that the lead
  (whose peer watch reads it) stops its own job and records the attempt as lost;
- the lead's agent dying without a final state loses the attempt: the other agents are stopped
  (SIGTERM) and the attempt recorded lost here, as for one node;
- agents still alive :func:`group_end_bound_s` after the first one ended are killed, their job
  groups ended;

then it decides from the lead's state, as for one node, and at the end releases every node's instance.

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

from trainctl_lightning.agent.attempts import PRICE_ENV, end_attempt, price_per_hour
from trainctl_lightning.agent.jobproc import read_job_records, remove_job_record
from trainctl_lightning.agent.nodes import attempt_of, peers_end_wait_s
from trainctl_lightning.agent.runner import NOTE_PREFIX, one_line
from trainctl_lightning.errors import TrainctlError
from trainctl_lightning.jobs.spec import Attempt, AttemptEnd, JobPhase, JobSpec, JobState
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.retry import RetryPolicy
from trainctl_lightning.runkey import RUN_KEY_ENV
from trainctl_lightning.store.layout import run_id_of
from trainctl_lightning.timeutil import utc_now

__all__ = ["POLL_S", "Supervisor", "group_end_bound_s", "run_supervisor"]

log = logging.getLogger("trainctl_lightning.supervisor")

#: How often the supervisor looks at its agent (a /proc read) and, between attempts, at the store.
POLL_S = 0.1


def group_end_bound_s(spec: JobSpec) -> float:
    """How long the other agents of a multi-node attempt may outlive the first one that ended
    before they are killed: the lead's own wait for its peers (:func:`~.nodes.peers_end_wait_s`),
    then its final writes and the job's grace, and a margin."""
    return peers_end_wait_s(spec) + spec.stop_grace_s + 30.0


class Supervisor:
    """Runs the attempts of the managed run at ``run_url`` on local instance ``instance_id``."""

    def __init__(self, run_url: str, workdir: Path, instance_id: str) -> None:
        from trainctl_lightning.providers.local import LocalProvider

        self.run_url = run_url
        self.workdir = Path(workdir).resolve()
        self.instance_id = instance_id
        self.provider = LocalProvider()
        self.jobs = JobStore(run_url)
        self.jobs.objects.retry = RetryPolicy(deadline_s=60.0)
        self.instances = [instance_id]  # by node: node 0's is this one; a multi-node run's others from its spec
        self._stop = threading.Event()
        self._stop_reason = ""

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        key = os.environ.get(RUN_KEY_ENV)
        spec = self.jobs.read_signed_spec(run_id_of(self.run_url), key) if key else self.jobs.read_spec()
        if spec.recover is None:
            raise TrainctlError(f"run {spec.run_id} is not a managed run (no recover policy in its job.json)")
        if spec.nodes > 1:
            if len(spec.node_instances) != spec.nodes or spec.node_instances[0] != self.instance_id:
                raise TrainctlError(
                    f"run {spec.run_id} runs on {spec.nodes} nodes but its job.json names the instances "
                    f"{spec.node_instances} for a supervisor on {self.instance_id}: launch it again with trainctl"
                )
            self.instances = list(spec.node_instances)
        price = sum(self.provider.describe(i).price_per_hour or 0.0 for i in self.instances)  # the group's
        if price:
            os.environ[PRICE_ENV] = str(price)
        state = self.jobs.read_state()
        number = len(state.attempts) + 1 if state is not None and state.attempts else 1
        while True:
            why = self._stop_why()
            if why is not None:
                self._end_between_attempts(spec, number - 1, JobPhase.CANCELLED, why)
                break
            agents: dict[int, tuple[int, int | None]] = {}
            try:
                for node, instance_id in enumerate(self.instances):
                    agents[node] = self.provider.start_attempt(
                        instance_id, spec.run_id, self.run_url, number, node=node if spec.nodes > 1 else None
                    )
            except TrainctlError as exc:  # an instance is being stopped or terminated
                self._stop_agents(spec, agents)
                self._end_between_attempts(spec, number - 1, JobPhase.CANCELLED, one_line(exc))
                break
            log.info("run %s: attempt %d: agent pid(s) %s", spec.run_id, number, [pid for pid, _ in agents.values()])
            if spec.nodes > 1:
                self._wait_for_group(spec, number, agents)
            else:
                self._wait_for(*agents[0])
            pid = agents[0][0]
            state = self._read_state()
            # the lead's word on this attempt (a state of the attempt before: its agent died before writing)
            said = state if state is not None and attempt_of(state) == number else None
            if said is not None and said.phase is JobPhase.RECOVERING and self._stop_why() is None:
                number += 1
                continue
            if said is not None and said.phase.is_terminal():
                break
            if said is not None and said.phase is JobPhase.RECOVERING:
                self._end_between_attempts(spec, number, JobPhase.CANCELLED, self._stop_why() or "cancelled")
                break
            if not self._after_lost_agent(spec, state, number, pid):
                break
            number += 1
        self._release(spec)
        return 0

    # ------------------------------------------------------------ the steps

    def _after_lost_agent(self, spec: JobSpec, state: JobState | None, number: int, pid: int) -> bool:
        """The agent of attempt ``number`` died without a final state: end its job, record the
        attempt as lost; whether a replacement follows (the state says ``recovering`` then)."""
        assert spec.recover is not None
        self._end_job(spec, self.workdir, number)
        if state is None:
            state = JobState(run_id=spec.run_id, phase=JobPhase.FAILED, updated_at=utc_now(), instance_id=self.instance_id)
        attempt = next((a for a in state.attempts if a.number == number), None)
        if attempt is None:  # it died before recording its attempt
            attempt = Attempt(number=number, instance_id=self.instance_id, started_at=utc_now())
            state.attempts.append(attempt)
        error = f"agent pid {pid} died while the job was {state.phase.value}, without a final state"
        end_attempt(attempt, AttemptEnd.LOST, error, self.run_url)
        why = self._stop_why()
        gave_up = None if why else spec.recover.gives_up(state.attempts, price_per_hour())
        if why is not None:
            phase, line = JobPhase.CANCELLED, why
        elif gave_up is not None:
            phase, line = JobPhase.FAILED, gave_up
        else:
            phase, line = JobPhase.RECOVERING, f"attempt {number} lost: {error}"
        self._note(number, line)
        state.phase, state.error, state.pid = phase, line, None
        if phase is not JobPhase.RECOVERING:
            state.ended_at = utc_now()
        state.touch()
        self.jobs.write_state(state)
        return phase is JobPhase.RECOVERING

    def _end_job(self, spec: JobSpec, workdir: Path, number: int) -> None:
        """End the job a dead agent left in ``workdir``: the instance is gone, its job goes with it.
        At once for one node; a multi-node job (torchrun, which got SIGTERM when its agent died) gets
        its grace to end the workers it started in sessions of their own."""
        grace = spec.stop_grace_s if spec.nodes > 1 else 0.0
        for job in read_job_records(workdir):
            if job.run_id == spec.run_id:
                try:
                    done = job.end(grace)
                except TimeoutError as exc:
                    log.error("the job of attempt %d outlived SIGKILL: %s", number, exc)
                    raise
                if done:
                    log.info("attempt %d: the job's %s", number, done)
                remove_job_record(workdir, spec.run_id)

    # ------------------------------------------------------------ multi-node attempts

    def _wait_for_group(self, spec: JobSpec, number: int, agents: dict[int, tuple[int, int | None]]) -> None:
        """Wait until the agents of every node have ended (see the module docs): a lost node is
        recorded at once, a lost lead stops the others, and none outlives the bound."""
        from trainctl_lightning.providers.local import process_alive

        alive = dict(agents)
        deadline: float | None = None  # set when the first agent ended
        signalled = False
        while alive:
            if self._stop.is_set() and not signalled:  # trainctl stop/terminate: every agent stops its job
                signalled = True
                self._signal(alive, signal.SIGTERM)
            for node, (pid, start_time) in list(alive.items()):
                if process_alive(pid, start_time):
                    continue
                del alive[node]
                if deadline is None:
                    deadline = time.monotonic() + group_end_bound_s(spec)
                if node != 0:
                    self._after_lost_node(spec, number, node, pid)
                elif not self._ended_by_lead(number) and alive:
                    log.warning(
                        "attempt %d: the lead's agent pid %d died without a final state: stopping the others", number, pid
                    )
                    self._signal(alive, signal.SIGTERM)
            if alive and deadline is not None and time.monotonic() > deadline:
                log.error(
                    "attempt %d: node(s) %s did not end within %.0fs: killing their agents",
                    number,
                    sorted(alive),
                    group_end_bound_s(spec),
                )
                self._signal(alive, signal.SIGKILL)
                deadline = float("inf")  # once: their ends are handled as they go
            time.sleep(POLL_S)

    def _ended_by_lead(self, number: int) -> bool:
        """Whether the lead wrote how attempt ``number`` ended (a terminal state, or ``recovering``)."""
        state = self._read_state()
        return (
            state is not None
            and attempt_of(state) == number
            and (state.phase.is_terminal() or state.phase is JobPhase.RECOVERING)
        )

    def _after_lost_node(self, spec: JobSpec, number: int, node: int, pid: int) -> None:
        """Node ``node``'s agent has ended: if it wrote no final state of attempt ``number``, its
        instance counts as lost: end its job, and record that as its state (the lead reads it)."""
        jobs = self.jobs.for_node(node)
        try:
            state = jobs.read_state()
        except TrainctlError as exc:  # damaged: replaced by what is known
            log.warning("could not read node %d's state: %s", node, one_line(exc))
            state = None
        if state is not None and attempt_of(state) == number and state.phase.is_terminal():
            return
        try:
            workdir = Path(self.provider.describe(self.instances[node]).details["workdir"])
            self._end_job(spec, workdir, number)
        except TrainctlError as exc:  # its instance is gone: so is its job
            log.warning("node %d: %s", node, one_line(exc))
        if state is None:
            state = JobState(run_id=spec.run_id, phase=JobPhase.FAILED, updated_at=utc_now(), node=node)
        attempt = next((a for a in state.attempts if a.number == number), None)
        if attempt is None:  # it died before recording its attempt
            attempt = Attempt(number=number, instance_id=self.instances[node], started_at=utc_now())
            state.attempts.append(attempt)
        error = f"agent pid {pid} of node {node} died while its job was {state.phase.value}, without a final state"
        end_attempt(attempt, AttemptEnd.LOST, error, self.run_url)
        state.phase, state.error, state.pid, state.failed_node, state.ended_at = JobPhase.FAILED, error, None, node, utc_now()
        state.instance_id, state.node = self.instances[node], node
        state.touch()
        try:
            jobs.write_state(state)
        except TrainctlError as exc:  # the lead then finds it stale, later
            log.error("could not record that node %d is lost: %s", node, one_line(exc))
        log.info("run %s: attempt %d: node %d lost (%s)", spec.run_id, number, node, error)

    def _stop_agents(self, spec: JobSpec, agents: dict[int, tuple[int, int | None]]) -> None:
        """Stop agents already started for an attempt that cannot go on (SIGTERM, SIGKILL after the bound)."""
        from trainctl_lightning.providers.local import process_alive

        self._signal(agents, signal.SIGTERM)
        deadline = time.monotonic() + group_end_bound_s(spec)
        while any(process_alive(*a) for a in agents.values()):
            if time.monotonic() > deadline:
                self._signal(agents, signal.SIGKILL)
                break
            time.sleep(POLL_S)

    @staticmethod
    def _signal(agents: dict[int, tuple[int, int | None]], sig: int) -> None:
        from trainctl_lightning.providers.local import process_alive

        for pid, start_time in agents.values():
            if process_alive(pid, start_time):  # checked first: a reused pid is never hit
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    continue

    def _end_between_attempts(self, spec: JobSpec, number: int, phase: JobPhase, why: str) -> None:
        """End a run that is between attempts (no agent runs) in ``phase``."""
        state = self._read_state()
        if state is not None and state.phase.is_terminal():
            return
        if state is None:
            state = JobState(run_id=spec.run_id, phase=phase, updated_at=utc_now(), instance_id=self.instance_id)
        self._note(max(number, 1), f"{phase.value} between attempts: {why}")
        state.phase, state.error, state.ended_at, state.pid = phase, why, utc_now(), None
        state.touch()
        self.jobs.write_state(state)

    def _release(self, spec: JobSpec) -> None:
        if not spec.terminate_instance_after:
            return
        for instance_id in self.instances:  # every node's: its agents leave that to this supervisor
            try:
                self.provider.release_from_agent(instance_id)
            except TrainctlError as exc:  # the run is over and recorded; a stuck instance is reported
                log.error("could not release instance %s: %s", instance_id, one_line(exc))

    # ------------------------------------------------------------ helpers

    def _wait_for(self, pid: int, start_time: int | None) -> None:
        from trainctl_lightning.providers.local import process_alive

        signalled = False
        while process_alive(pid, start_time):
            if self._stop.is_set() and not signalled:  # trainctl stop/terminate signal it too; a kill of ours alone may not
                signalled = True
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    break
            time.sleep(POLL_S)

    def _read_state(self) -> JobState | None:
        try:
            return self.jobs.read_state()
        except TrainctlError as exc:
            log.warning("could not read the job state: %s", one_line(exc))
            return None

    def _stop_why(self) -> str | None:
        if self._stop.is_set():
            return self._stop_reason
        try:
            reason = self.jobs.cancel_requested()
        except Exception as exc:  # looked at again before the next attempt
            log.warning("could not check for a cancel request: %s", one_line(exc))
            return None
        return one_line(reason) if reason else None

    def _note(self, number: int, text: str) -> None:
        """A supervisor line in the run's log, after attempt ``number``'s output."""
        try:
            self.jobs.log_writer(attempt=number, part=2).write(f"{NOTE_PREFIX}{text}\n".encode())
        except Exception as exc:  # the state says it too
            log.warning("could not write to the run's log: %s", one_line(exc))

    def _on_signal(self, signum: int, frame: object) -> None:
        if not self._stop.is_set():
            self._stop_reason = f"supervisor received {signal.Signals(signum).name}: the instance is stopping"
            self._stop.set()


def run_supervisor(run_url: str, workdir: Path, instance_id: str) -> int:
    """Supervise the managed run at ``run_url``; the exit code for the supervisor's process."""
    return Supervisor(run_url, workdir, instance_id).run()
