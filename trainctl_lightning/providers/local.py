"""The local provider: each "instance" is a working directory on this machine.

Nothing to pay for and nothing to configure, which makes it the default and the provider the
tests run end to end. An instance lives in ``$TRAINCTL_HOME/local/instances/<id>/``::

    instance.json     the Instance record, with the agents started on it (pid + start time)
    lock              guards read-modify-write of instance.json across processes
    work/             the agents' working directory (code, environments, logs)

The agent runs detached (``--daemon``): it is not a child of the CLI that started it and
outlives it. State lives on disk, so ``trainctl ls``/``stop``/``terminate`` from a later
process see and control what an earlier one created. A process is only ever signalled after
its start time is checked against the one recorded, so a reused pid is never hit.

A dead agent does not leave its job behind: the agent records each job's process group in
``work/jobs/<run id>.json`` (:mod:`trainctl_lightning.agent.jobproc`), and ``stop``/``terminate``
end every recorded group whose agent is gone (SIGTERM, the job's grace, SIGKILL) and wait for
it before anything is deleted. What they had to do is kept in the record's ``details.notes``
and, for a run whose agent died before writing its final state, in the run's job state.

Everything under ``$TRAINCTL_HOME`` is private to the user: folders 0700, files 0600.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainctl_lightning.agent.jobproc import JobProcess, processes, read_job_records
from trainctl_lightning.agent.jobproc import process_start_time as process_start_time
from trainctl_lightning.errors import ConfigError, InstanceNotFoundError, ProviderError
from trainctl_lightning.paths import PRIVATE_FILE_MODE, make_private_dir, trainctl_home
from trainctl_lightning.providers.api import (
    AgentLaunch,
    CreatePlan,
    Instance,
    InstanceSpec,
    InstanceState,
    Provider,
    standard_tags,
)
from trainctl_lightning.runkey import RUN_KEY_ENV
from trainctl_lightning.store.files import atomic_file
from trainctl_lightning.store.layout import NODE_ENV, TAG_MANAGED_BY, TAG_NAME
from trainctl_lightning.timeutil import utc_now

__all__ = [
    "INSTANCE_TYPE",
    "RECORD_NAME",
    "ROOT_ENV",
    "STOP_WAIT_S",
    "WORK_DIR",
    "LocalProvider",
    "process_alive",
    "process_start_time",
]

log = logging.getLogger(__name__)

INSTANCE_TYPE = "local"
RECORD_NAME = "instance.json"
WORK_DIR = "work"
#: How long ``stop``/``terminate`` wait for agents to stop their jobs before SIGKILL: longer than
#: a job's default ``stop_grace_s`` (60 s), so that a job saving and publishing its checkpoint on
#: SIGTERM is never killed halfway. Jobs that exit at once end the wait at once.
STOP_WAIT_S = 75.0
#: Set for the agents a provider starts, so that their own LocalProvider (which releases the
#: instance when a job ends) finds the instances where the launcher's did.
ROOT_ENV = "TRAINCTL_LOCAL_INSTANCES"
_ID = re.compile(r"^local-[0-9a-f]{8}$")


# ---------------------------------------------------------------- processes


def process_alive(pid: int, start_time: int | None) -> bool:
    """Whether the process ``pid`` started at ``start_time`` still runs (not a reuse of its pid)."""
    return start_time is not None and process_start_time(pid) == start_time


def _children(pids: set[int]) -> set[int]:
    return {pid for pid, ppid, _, _ in processes() if ppid in pids}


def _session_alive(sid: int) -> bool:
    return any(s == sid for _, _, _, s in processes())


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _is_managed(run_url: str) -> bool:
    """Whether the run's job spec asks for recovery (``--recover``): then a supervisor starts its agents."""
    from trainctl_lightning.jobs.store import JobStore

    return JobStore(run_url).read_spec().recover is not None


# ---------------------------------------------------------------- provider


class LocalProvider(Provider):
    """Instances are working directories under ``$TRAINCTL_HOME/local/instances``.

    Args:
        home: where to keep instances; default ``$TRAINCTL_LOCAL_INSTANCES``, else
            ``trainctl_home()/local/instances``.
    """

    name = "local"
    # memory:// is private to one process: the agent (another process) could not see the job
    store_protocols = ("file", "s3", "gs", "gcs", "az", "abfs")

    def __init__(self, home: str | os.PathLike[str] | None = None) -> None:
        if home is None:
            home = os.environ.get(ROOT_ENV) or trainctl_home() / "local" / "instances"
        self.root = Path(home).resolve()

    def __repr__(self) -> str:
        return f"LocalProvider({str(self.root)!r})"

    # ------------------------------------------------------------ create

    def create_dryrun(self, spec: InstanceSpec) -> CreatePlan:
        if spec.instance_type not in (None, INSTANCE_TYPE):
            raise ConfigError(
                f"the local provider has one instance type, {INSTANCE_TYPE!r}; got {spec.instance_type!r} "
                "(use --provider aws for EC2 types)"
            )
        if spec.spot:
            raise ConfigError("the local provider has no spot capacity: drop --spot, or use --provider aws")
        if spec.image is not None:
            raise ConfigError(f"the local provider runs on this machine and takes no image; got {spec.image!r}")
        if spec.region is not None:
            raise ConfigError(f"the local provider runs on this machine and has no regions; got {spec.region!r}")
        unknown = sorted(spec.options)
        if unknown:
            raise ConfigError(f"the local provider takes no provider options; got {', '.join(unknown)}")
        instance_id = f"local-{secrets.token_hex(4)}"
        workdir = self.root / instance_id / WORK_DIR
        tags = standard_tags(spec.tags)
        if spec.name:
            tags.setdefault(TAG_NAME, spec.name)
        return CreatePlan(
            provider=self.name,
            spec=spec,
            instance_type=INSTANCE_TYPE,
            region=None,
            tags=tags,
            resources=[f"working directory {workdir}"],
            request={"id": instance_id, "workdir": str(workdir)},
            price_per_hour=0.0,
        )

    def _create(self, plan: CreatePlan) -> Instance:
        instance_id = plan.request["id"]
        inst_dir = self.root / instance_id
        make_private_dir(self.root)
        inst_dir.mkdir(mode=0o700)  # a new id: never an existing instance's directory
        try:
            (inst_dir / WORK_DIR).mkdir(mode=0o700)
            instance = Instance(
                id=instance_id,
                provider=self.name,
                state=InstanceState.RUNNING,
                instance_type=INSTANCE_TYPE,
                created_at=utc_now(),
                name=plan.spec.name,
                tags=dict(plan.tags),
                price_per_hour=0.0,
                address="localhost",
                details={"workdir": plan.request["workdir"], "env": dict(plan.spec.env), "agents": []},
            )
            with self._locked(instance_id):
                self._write(instance)
        except BaseException:
            shutil.rmtree(inst_dir, ignore_errors=True)
            raise
        log.info("created local instance %s at %s", instance_id, inst_dir)
        return instance

    # ------------------------------------------------------------ records

    def list(self, include_terminated: bool = False) -> list[Instance]:
        found = []
        if self.root.is_dir():
            for record in self.root.glob(f"*/{RECORD_NAME}"):
                try:
                    instance = self._read(record.parent.name)
                except (OSError, ValueError, KeyError) as exc:
                    log.warning("skipping unreadable local instance record %s: %s", record, exc)
                    continue
                if instance.tags.get(TAG_MANAGED_BY) is None:
                    continue
                if instance.state.is_terminal() and not include_terminated:
                    continue
                found.append(self._with_liveness(instance))
        return sorted(found, key=lambda i: i.created_at or "", reverse=True)

    # ------------------------------------------------------------ stop, terminate

    def stop(self, instance_id: str) -> Instance:
        instance = self._begin(instance_id, InstanceState.STOPPING)
        if instance.state.is_terminal():
            raise ProviderError(f"local instance {instance_id} is terminated; there is nothing to stop")
        notes = self._stop_agents(instance)
        instance = self._end(instance_id, InstanceState.STOPPED, "stopped_at", notes)
        log.info("stopped local instance %s", instance_id)
        return instance

    def terminate(self, instance_id: str) -> Instance:
        instance = self._begin(instance_id, InstanceState.TERMINATING)
        if instance.state.is_terminal():
            return instance
        notes = self._stop_agents(instance)  # returns once every job process is gone
        self._remove_work(instance)
        instance = self._end(instance_id, InstanceState.TERMINATED, "terminated_at", notes)
        log.info("terminated local instance %s", instance_id)
        return instance

    def _begin(self, instance_id: str, state: InstanceState) -> Instance:
        """Mark a stop/terminate in progress (agents then leave the instance alone); the record before."""
        with self._locked(self._check_id(instance_id)):
            instance = self._read_known(instance_id)
            if not instance.state.is_terminal():
                before = instance.state
                instance.state = state
                self._write(instance)
                instance.state = before
        return self._with_liveness(instance)

    def _end(self, instance_id: str, state: InstanceState, stamp: str, notes: builtins.list[str]) -> Instance:
        with self._locked(instance_id):
            instance = self._read_known(instance_id)
            changed = bool(notes)
            if notes:
                instance.details.setdefault("notes", []).extend(notes)
            if not instance.state.is_terminal():
                instance.state = state
                instance.details[stamp] = utc_now()
                changed = True
            if changed:
                self._write(instance)
        return self._with_liveness(instance)

    def release_from_agent(self, instance_id: str, *, run_over: bool = True) -> None:
        """Terminate the instance from its own agent, unless other agents still run jobs on it.

        ``run_over=False`` (a managed run is recovering): keep it; the run's supervisor starts the
        next attempt's agent on it."""
        if not run_over:
            return
        with self._locked(self._check_id(instance_id)):
            instance = self._read_known(instance_id)
            if instance.state is not InstanceState.RUNNING:
                return  # terminated already, or a stop/terminate is under way and finishes the job
            others = [
                a
                for a in instance.details.get("agents", [])
                if a.get("pid") != os.getpid() and process_alive(a["pid"], a.get("start_time"))
            ]
            if others:
                log.info("not terminating %s: %d other agent(s) still run on it", instance_id, len(others))
                return
            self._remove_work(instance)
            instance.state = InstanceState.TERMINATED
            instance.details["terminated_at"] = utc_now()
            instance.details["terminated_by"] = "agent"
            self._write(instance)

    # ------------------------------------------------------------ jobs

    def start_agent(self, instance: Instance, launch: AgentLaunch) -> None:
        """Start a detached agent for ``launch`` in the instance's working directory; for a managed
        run (a job spec with ``recover``), the supervisor that starts the agent of each attempt
        (:mod:`trainctl_lightning.agent.supervisor`).

        A managed multi-node run has one supervisor, on node 0's instance: it starts every node's
        agent for each attempt, so for a node ``launch.node >= 1`` of such a run nothing starts here.

        Raises:
            ProviderError: the instance is not running, or the agent did not start.
        """
        current = self.describe(instance.id)
        if not current.state.is_usable():
            raise ProviderError(
                f"local instance {instance.id} is {current.state.value}: start jobs on a running instance "
                "(`trainctl create` makes a new one)"
            )
        work = Path(current.details["workdir"])
        command = ["run"]
        role = "agent"
        if _is_managed(launch.run_url):
            if launch.node:
                log.info("run %s: node %d's agents are started by the supervisor on node 0", launch.run_id, launch.node)
                return
            command, role = ["supervise", "--instance", instance.id], "supervisor"
        env = {**os.environ, **current.details.get("env", {}), **launch.forward_env, ROOT_ENV: str(self.root)}
        env.pop(RUN_KEY_ENV, None)  # never another run's key (a launch from inside a job)
        env[NODE_ENV] = str(launch.node)  # a multi-node run's node (the agent ignores it otherwise)
        if launch.run_key:
            env[RUN_KEY_ENV] = launch.run_key  # the process environment: never written to disk or the store
        with self._locked(instance.id):
            self._spawn(instance.id, work, command, role, launch.run_id, launch.run_url, env)

    def start_attempt(
        self, instance_id: str, run_id: str, run_url: str, attempt: int, node: int | None = None
    ) -> tuple[int, int | None]:
        """Start the agent of attempt ``attempt`` of a managed run (the supervisor calls this, with
        the run's key and forwarded variables in its own environment); (pid, start time). ``node``:
        the agent's node of a multi-node run (``$TRAINCTL_NODE``).

        Raises:
            ProviderError: the instance is being stopped or terminated: no attempt may start.
        """
        from trainctl_lightning.store.layout import ATTEMPT_ENV

        with self._locked(self._check_id(instance_id)):
            current = self._read_known(instance_id)
            if current.state is not InstanceState.RUNNING:
                raise ProviderError(f"local instance {instance_id} is {current.state.value}: no attempt {attempt} starts on it")
            env = {**os.environ, ATTEMPT_ENV: str(attempt)}
            if node is not None:
                env[NODE_ENV] = str(node)
            agent = self._spawn(instance_id, Path(current.details["workdir"]), ["run"], "agent", run_id, run_url, env)
        return agent["pid"], agent["start_time"]

    def _spawn(
        self, instance_id: str, work: Path, command: builtins.list[str], role: str, run_id: str, run_url: str, env: dict[str, str]
    ) -> dict[str, Any]:
        """Start ``python -m trainctl_lightning.agent COMMAND`` detached and record it. Call under the lock:
        a stop or terminate then either sees it in the record or has marked the instance first."""
        agent_log = work / f"{role}-{run_id}.log"
        argv = [
            sys.executable,
            "-m",
            "trainctl_lightning.agent",
            *command[:1],
            "--run-url",
            run_url,
            "--workdir",
            str(work),
            *command[1:],
            "--daemon",
            "--log-file",
            str(agent_log),
        ]
        try:
            proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ProviderError(f"could not start the {role} on local instance {instance_id}: {exc}") from None
        lines = proc.stdout.split()
        if proc.returncode != 0 or not lines or not lines[-1].isdigit():
            detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ProviderError(
                f"the {role} on local instance {instance_id} did not start (exit code {proc.returncode}): {detail}"
            )
        pid = int(lines[-1])
        agent = {
            "run_id": run_id,
            "pid": pid,
            "start_time": process_start_time(pid),
            "run_url": run_url,
            "started_at": utc_now(),
            "log_file": str(agent_log),
        }
        if role != "agent":
            agent["role"] = role
        record = self._read_known(instance_id)
        record.details.setdefault("agents", []).append(agent)
        self._write(record)
        log.info("started %s pid %d for run %s on %s", role, pid, run_id, instance_id)
        return agent

    # ------------------------------------------------------------ helpers

    def _stop_agents(self, instance: Instance) -> builtins.list[str]:
        """End every job on the instance and wait until none of their processes is left.

        Live agents get SIGTERM (each stops its job), and SIGKILL if they outlast
        :data:`STOP_WAIT_S`. A job whose agent is dead is ended here, through the process group
        its agent recorded: SIGTERM, the job's grace, SIGKILL. Returns notes on what had to be
        done beyond the agents' own stop (a dead agent, a group that needed killing).

        Called without the instance lock: an agent that ends may take it to release the instance.

        Raises:
            ProviderError: a job's processes survived SIGKILL; nothing was deleted.
        """
        work = self.root / instance.id / WORK_DIR
        agents = instance.details.get("agents", [])
        live = [a for a in agents if process_alive(a["pid"], a.get("start_time"))]
        live_pids = {a["pid"] for a in live}
        notes: builtins.list[str] = []
        failures: builtins.list[str] = []
        # jobs whose agent is gone first: nobody else will stop them
        for job in read_job_records(work):
            if job.agent_pid not in live_pids:
                self._end_job(job, f"agent pid {job.agent_pid} of run {job.run_id} was dead", None, notes, failures)
        # the agent starts its job in a session of its own: remember it, in case the agent must be killed
        jobs = _children(live_pids)
        for agent in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(agent["pid"], signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S
        while time.monotonic() < deadline:
            live = [a for a in live if process_alive(a["pid"], a.get("start_time"))]
            if not live:
                break
            time.sleep(0.05)
        if live:
            log.warning("%d agent(s) did not stop within %.0fs; killing them and their jobs", len(live), STOP_WAIT_S)
            jobs |= _children({a["pid"] for a in live})
            for agent in live:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(agent["pid"], signal.SIGKILL)
                notes.append(
                    f"agent pid {agent['pid']} of run {agent.get('run_id')} did not stop within {STOP_WAIT_S:.0f}s: killed"
                )
        # what a killed agent (or a job that outlived its agent's stop) left running
        for job in read_job_records(work):
            if job.agent_pid in live_pids:
                self._end_job(job, f"the job of run {job.run_id} outlived its agent", 0.0, notes, failures)
        for pgid in jobs:
            if _session_alive(pgid):
                _kill_group(pgid, signal.SIGKILL)
        notes += self._record_dead_agents(agents)
        if failures:
            raise ProviderError(
                f"local instance {instance.id}: {'; '.join(failures)}; its working directory was kept. "
                "Run the command again once they are gone"
            )
        return notes

    def _end_job(
        self, job: JobProcess, why: str, grace_s: float | None, notes: builtins.list[str], failures: builtins.list[str]
    ) -> None:
        try:
            done = job.end(grace_s)
        except TimeoutError as exc:
            failures.append(str(exc))
            log.error("%s; %s", why, exc)
            return
        if done is not None:
            note = f"{why}; its job's {done}"
            notes.append(note)
            log.warning("%s", note)
            self._fail_run(job.run_url, job.run_id, note)

    def _record_dead_agents(self, agents: builtins.list[dict[str, Any]]) -> builtins.list[str]:
        """A run whose agent died before writing its final state gets one now, saying so."""
        notes = []
        for agent in agents:
            run_url = agent.get("run_url")
            if not run_url or process_alive(agent["pid"], agent.get("start_time")):
                continue
            note = f"agent pid {agent['pid']} of run {agent.get('run_id')} died before the job ended"
            if self._fail_run(run_url, str(agent.get("run_id")), note):
                notes.append(note)
        return notes

    @staticmethod
    def _fail_run(run_url: str, run_id: str, note: str) -> bool:
        """End a run's job state as failed with ``note`` unless it is terminal already; whether it was written."""
        from trainctl_lightning.jobs.spec import JobPhase
        from trainctl_lightning.jobs.store import JobStore
        from trainctl_lightning.retry import RetryPolicy

        try:
            jobs = JobStore(run_url)
            jobs.objects.retry = RetryPolicy(deadline_s=10.0)
            state = jobs.read_state()
            if state is None or state.phase.is_terminal():
                return False
            state.phase = JobPhase.FAILED
            state.error = note
            state.ended_at = utc_now()
            state.touch()
            jobs.write_state(state)
            return True
        except Exception as exc:  # the processes are dealt with; a store we cannot reach only costs the note
            log.warning("could not record in %s that %s: %s", run_url, note, " ".join(str(exc).split()))
            return False

    def _remove_work(self, instance: Instance) -> None:
        work = self.root / instance.id / WORK_DIR

        def report(function: Any, path: str, exc_info: Any) -> None:
            log.warning("could not remove %s: %s; delete it by hand", path, exc_info[1])

        if work.exists():
            shutil.rmtree(work, onerror=report)

    def _with_liveness(self, instance: Instance) -> Instance:
        for agent in instance.details.get("agents", []):
            agent["alive"] = process_alive(agent["pid"], agent.get("start_time"))
        return instance

    def _check_id(self, instance_id: str) -> str:
        if not isinstance(instance_id, str) or not _ID.match(instance_id):
            raise InstanceNotFoundError(
                f"no local instance {instance_id!r}: local instance ids look like 'local-1a2b3c4d'; "
                "`trainctl ls --provider local` lists them"
            )
        return instance_id

    def _read_known(self, instance_id: str) -> Instance:
        try:
            return self._read(self._check_id(instance_id))
        except FileNotFoundError:
            raise InstanceNotFoundError(
                f"no local instance {instance_id!r} created by trainctl; `trainctl ls --provider local` lists them"
            ) from None

    def _read(self, instance_id: str) -> Instance:
        return Instance.from_dict(json.loads((self.root / instance_id / RECORD_NAME).read_text()))

    def _write(self, instance: Instance) -> None:
        """Replace the record atomically (readers never see half a file). Call under the lock."""
        data = instance.to_dict()
        for agent in data["details"].get("agents", []):
            agent.pop("alive", None)  # computed on read, never stored
        with atomic_file(self.root / instance.id / RECORD_NAME, PRIVATE_FILE_MODE) as tmp:
            tmp.write_bytes(json.dumps(data, indent=2, sort_keys=True).encode())

    @contextlib.contextmanager
    def _locked(self, instance_id: str) -> Iterator[None]:
        lock_path = self.root / instance_id / "lock"
        if not lock_path.parent.is_dir():
            raise InstanceNotFoundError(
                f"no local instance {instance_id!r} created by trainctl; `trainctl ls --provider local` lists them"
            )
        with open(os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE_MODE), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
