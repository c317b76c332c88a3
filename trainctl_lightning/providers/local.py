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
"""

from __future__ import annotations

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

from trainctl_lightning.errors import ConfigError, InstanceNotFoundError, ProviderError
from trainctl_lightning.paths import trainctl_home
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
from trainctl_lightning.store.files import write_atomic
from trainctl_lightning.store.layout import TAG_MANAGED_BY, TAG_NAME
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


def process_start_time(pid: int) -> int | None:
    """Start time of a live process (clock ticks since boot, from /proc), None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def process_alive(pid: int, start_time: int | None) -> bool:
    """Whether the process ``pid`` started at ``start_time`` still runs (not a reuse of its pid)."""
    return start_time is not None and process_start_time(pid) == start_time


def _processes() -> Iterator[tuple[int, int, int]]:
    """(pid, parent pid, session id) of every live process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        if fields[0] not in ("Z", "X"):
            yield int(entry), int(fields[1]), int(fields[3])


def _children(pids: set[int]) -> set[int]:
    return {pid for pid, ppid, _ in _processes() if ppid in pids}


def _session_alive(sid: int) -> bool:
    return any(s == sid for _, _, s in _processes())


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


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
        self.root.mkdir(parents=True, exist_ok=True)
        inst_dir.mkdir()  # a new id: never an existing instance's directory
        try:
            (inst_dir / WORK_DIR).mkdir()
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
        self._stop_agents(instance)
        instance = self._end(instance_id, InstanceState.STOPPED, "stopped_at")
        log.info("stopped local instance %s", instance_id)
        return instance

    def terminate(self, instance_id: str) -> Instance:
        instance = self._begin(instance_id, InstanceState.TERMINATING)
        if instance.state.is_terminal():
            return instance
        self._stop_agents(instance)
        self._remove_work(instance)
        instance = self._end(instance_id, InstanceState.TERMINATED, "terminated_at")
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

    def _end(self, instance_id: str, state: InstanceState, stamp: str) -> Instance:
        with self._locked(instance_id):
            instance = self._read_known(instance_id)
            if not instance.state.is_terminal():
                instance.state = state
                instance.details[stamp] = utc_now()
                self._write(instance)
        return self._with_liveness(instance)

    def release_from_agent(self, instance_id: str) -> None:
        """Terminate the instance from its own agent, unless other agents still run jobs on it."""
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
        """Start a detached agent for ``launch`` in the instance's working directory.

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
        agent_log = work / f"agent-{launch.run_id}.log"
        argv = [
            sys.executable,
            "-m",
            "trainctl_lightning.agent",
            "run",
            "--run-url",
            launch.run_url,
            "--workdir",
            str(work),
            "--daemon",
            "--log-file",
            str(agent_log),
        ]
        env = {**os.environ, **current.details.get("env", {}), **launch.forward_env, ROOT_ENV: str(self.root)}
        env.pop(RUN_KEY_ENV, None)  # never another run's key (a launch from inside a job)
        if launch.run_key:
            env[RUN_KEY_ENV] = launch.run_key  # the process environment: never written to disk or the store
        try:
            proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ProviderError(f"could not start the agent on local instance {instance.id}: {exc}") from None
        lines = proc.stdout.split()
        if proc.returncode != 0 or not lines or not lines[-1].isdigit():
            detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ProviderError(
                f"the agent on local instance {instance.id} did not start (exit code {proc.returncode}): {detail}"
            )
        pid = int(lines[-1])
        agent = {
            "run_id": launch.run_id,
            "pid": pid,
            "start_time": process_start_time(pid),
            "started_at": utc_now(),
            "log_file": str(agent_log),
        }
        with self._locked(instance.id):
            record = self._read_known(instance.id)
            record.details.setdefault("agents", []).append(agent)
            self._write(record)
        log.info("started agent pid %d for run %s on %s", pid, launch.run_id, instance.id)

    # ------------------------------------------------------------ helpers

    def _stop_agents(self, instance: Instance) -> None:
        """SIGTERM every live agent (each stops its job), wait, then SIGKILL agents and jobs left.

        Called without the instance lock: an agent that ends may take it to release the instance.
        """
        live = [a for a in instance.details.get("agents", []) if process_alive(a["pid"], a.get("start_time"))]
        if not live:
            return
        # the agent starts its job in a session of its own: remember it, in case the agent must be killed
        jobs = _children({a["pid"] for a in live})
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
        for job in jobs:
            if _session_alive(job):
                _kill_group(job, signal.SIGKILL)

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
        write_atomic(self.root / instance.id / RECORD_NAME, json.dumps(data, indent=2, sort_keys=True).encode())

    @contextlib.contextmanager
    def _locked(self, instance_id: str) -> Iterator[None]:
        lock_path = self.root / instance_id / "lock"
        if not lock_path.parent.is_dir():
            raise InstanceNotFoundError(
                f"no local instance {instance_id!r} created by trainctl; `trainctl ls --provider local` lists them"
            )
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
