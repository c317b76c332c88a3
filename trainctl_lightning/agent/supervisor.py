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
from trainctl_lightning.agent.runner import NOTE_PREFIX, one_line
from trainctl_lightning.errors import TrainctlError
from trainctl_lightning.jobs.spec import Attempt, AttemptEnd, JobPhase, JobSpec, JobState
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.retry import RetryPolicy
from trainctl_lightning.runkey import RUN_KEY_ENV
from trainctl_lightning.store.layout import run_id_of
from trainctl_lightning.timeutil import utc_now

__all__ = ["POLL_S", "Supervisor", "run_supervisor"]

log = logging.getLogger("trainctl_lightning.supervisor")

#: How often the supervisor looks at its agent (a /proc read) and, between attempts, at the store.
POLL_S = 0.1


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
        self._stop = threading.Event()
        self._stop_reason = ""

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        key = os.environ.get(RUN_KEY_ENV)
        spec = self.jobs.read_signed_spec(run_id_of(self.run_url), key) if key else self.jobs.read_spec()
        if spec.recover is None:
            raise TrainctlError(f"run {spec.run_id} is not a managed run (no recover policy in its job.json)")
        price = self.provider.describe(self.instance_id).price_per_hour
        if price:
            os.environ[PRICE_ENV] = str(price)
        state = self.jobs.read_state()
        number = len(state.attempts) + 1 if state is not None and state.attempts else 1
        while True:
            why = self._stop_why()
            if why is not None:
                self._end_between_attempts(spec, number - 1, JobPhase.CANCELLED, why)
                break
            try:
                pid, start_time = self.provider.start_attempt(self.instance_id, spec.run_id, self.run_url, number)
            except TrainctlError as exc:  # the instance is being stopped or terminated
                self._end_between_attempts(spec, number - 1, JobPhase.CANCELLED, one_line(exc))
                break
            log.info("run %s: attempt %d: agent pid %d", spec.run_id, number, pid)
            self._wait_for(pid, start_time)
            state = self._read_state()
            if state is not None and state.phase is JobPhase.RECOVERING and self._stop_why() is None:
                number += 1
                continue
            if state is not None and state.phase.is_terminal():
                break
            if state is not None and state.phase is JobPhase.RECOVERING:
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
        for job in read_job_records(self.workdir):
            if job.run_id == spec.run_id:
                try:
                    done = job.end(0.0)  # the instance is gone: its job goes with it, at once
                except TimeoutError as exc:
                    log.error("the job of attempt %d outlived SIGKILL: %s", number, exc)
                    raise
                if done:
                    log.info("attempt %d: the job's %s", number, done)
                remove_job_record(self.workdir, spec.run_id)
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
        try:
            self.provider.release_from_agent(self.instance_id)
        except TrainctlError as exc:  # the run is over and recorded; a stuck instance is reported
            log.error("could not release instance %s: %s", self.instance_id, one_line(exc))

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
