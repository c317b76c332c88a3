"""Typed records of a job: what to run (``job.json``) and how it is going (``job-state.json``).

The launcher writes ``job.json`` once; the agent on the instance reads it and rewrites
``job-state.json`` as the job moves on. Both are JSON in the run store (``docs/run-store.md``);
readers ignore fields they do not know, writers never remove one.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from trainctl_lightning import timeutil
from trainctl_lightning.errors import ConfigError
from trainctl_lightning.limits import MAX_RUNTIME_LIMIT_S, check_limit
from trainctl_lightning.timeutil import parse_time, utc_now

__all__ = [
    "JOB_FORMAT",
    "JOB_STATE_FORMAT",
    "LOST_AFTER_S",
    "MAX_NODES",
    "QUEUED_LOST_AFTER_S",
    "SAVE_NOW_SIGNAL",
    "Attempt",
    "AttemptEnd",
    "CodeRef",
    "EnvMode",
    "JobPhase",
    "JobSpec",
    "JobState",
    "RecoverPolicy",
    "check_nodes",
    "looks_secret",
    "new_run_id",
    "validate_run_id",
]

#: The signal that asks a job's training process to checkpoint now: the agent sends it on a spot
#: interruption notice, and CheckpointSync saves and publishes a checkpoint at the next batch end.
SAVE_NOW_SIGNAL = signal.SIGUSR1

JOB_FORMAT = "trainctl.job/1"
JOB_STATE_FORMAT = "trainctl.job-state/1"
#: A job whose agent has not refreshed its heartbeat for this long is shown as lost.
LOST_AFTER_S = 60.0
#: A job still queued (no agent picked it up) after this long is shown as lost.
QUEUED_LOST_AFTER_S = 30 * 60.0
_RUN_ID_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SECRET_NAME = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)


def new_run_id(stem: str) -> str:
    """``<script stem>-<UTC yyyymmdd-hhmmss>-<4 hex>``: sorts by time, says what ran, never reused."""
    clean = re.sub(r"[^A-Za-z0-9]+", "-", stem).strip("-").lower()[:40] or "run"
    return f"{clean}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def validate_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID_OK.match(run_id):
        raise ConfigError(
            f"run id {run_id!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return run_id


#: The most instances one multi-node run may use (a typo guard; raise it if you need more).
MAX_NODES = 256


def check_nodes(nodes: object, nproc_per_node: object = None) -> None:
    """Refuse a node count or processes-per-node that is not a whole number in range (one line)."""
    if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= MAX_NODES:
        raise ConfigError(f"nodes = {nodes!r} is not allowed: give a whole number of instances from 1 to {MAX_NODES}")
    if nproc_per_node is not None and (
        isinstance(nproc_per_node, bool) or not isinstance(nproc_per_node, int) or not 1 <= nproc_per_node <= 1024
    ):
        raise ConfigError(
            f"processes per node = {nproc_per_node!r} is not allowed: give a whole number >= 1 (devices per node), "
            "or leave it out for one per GPU"
        )


def looks_secret(name: str) -> bool:
    """Whether an environment variable's name suggests a credential (never stored in a job spec)."""
    return bool(_SECRET_NAME.search(name))


class JobPhase(str, Enum):
    """Where a job is, as its agent last reported."""

    QUEUED = "queued"
    """Written by the launcher: the job spec is in the store, the agent has not picked it up."""
    FETCHING = "fetching"
    """The agent is downloading and verifying the job and its code."""
    SETTING_UP = "setting_up"
    """The agent is preparing the Python environment (setup commands, dependencies)."""
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    """The script exited non-zero, or the agent could not start it (``error`` says which)."""
    CANCELLED = "cancelled"
    """Stopped on request (``trainctl stop``/Ctrl-C then cancel, or a SIGTERM to the agent)."""
    TIMED_OUT = "timed_out"
    """Stopped by the agent at the job's max runtime."""
    PREEMPTED = "preempted"
    """The instance was reclaimed (spot interruption); the job saved what it could."""
    RECOVERING = "recovering"
    """A managed run (``--recover``) between attempts: the last one ended with its instance
    (preempted or lost) and a replacement is being started; ``attempts`` says what happened."""

    def is_terminal(self) -> bool:
        return self in (JobPhase.SUCCEEDED, JobPhase.FAILED, JobPhase.CANCELLED, JobPhase.TIMED_OUT, JobPhase.PREEMPTED)


class EnvMode(str, Enum):
    """How the agent gets a Python environment for the job."""

    AUTO = "auto"
    """Reuse ``python`` if it already satisfies the project's requirements, else build one."""
    REUSE = "reuse"
    """Run with ``python`` as it is, installing nothing."""
    ISOLATED = "isolated"
    """Always build a fresh environment (uv when available, else venv + pip)."""


@dataclass(frozen=True)
class CodeRef:
    """The code bundle of a job: a content-addressed manifest in the store."""

    manifest_url: str
    """URL of the bundle manifest (JSON: relative path -> sha256, size, mode)."""
    manifest_sha256: str
    """SHA-256 of the manifest's bytes; the agent refuses a manifest that does not match."""
    blobs_url: str
    """Prefix holding file contents by SHA-256, shared by every run in the store."""
    files: int = 0
    bytes: int = 0


class AttemptEnd(str, Enum):
    """Why one attempt of a managed run ended."""

    FINISHED = "finished"
    """The script exited 0: the run is done."""
    FAILED = "failed"
    """The script failed (not a preemption), or the agent could not run it."""
    PREEMPTED = "preempted"
    """The instance was reclaimed (a spot notice, or the agent stopped on a notice's deadline)."""
    LOST = "lost"
    """The instance or its agent went away without a final word (killed, crashed, powered off)."""
    CANCELLED = "cancelled"
    """Stopped on request, or at the max runtime."""


@dataclass(frozen=True)
class RecoverPolicy:
    """When a managed run (``--recover``) starts a replacement attempt, and when it gives up.

    Enforced where the run lives (the local provider's supervisor, the cloud instance), not by
    the launcher, so it holds with the launcher gone. Every limit counts from the run's first
    attempt; each is a finite positive number (one ``ConfigError`` line otherwise).
    """

    max_restarts: int = 3
    """Replacement attempts at most (attempt ``max_restarts + 1`` is the last one)."""
    max_hours: float | None = None
    """No replacement is started once this many hours passed since the first attempt began.

    Checked when an attempt ends (by its agent, or by the supervisor for a lost one), not while
    it trains: a running attempt is not cut short at the limit (``max_hours`` of the launch,
    the job's max runtime, does that for each attempt)."""
    max_cost: float | None = None
    """No replacement is started once the hours so far times the instance's hourly price reach
    this (in the price's currency); ignored where the provider knows no price. Like
    ``max_hours``, checked when an attempt ends."""
    retry_user_errors: bool = False
    """Also start a replacement when the script itself failed (a non-zero exit that is not a preemption)."""

    def __post_init__(self) -> None:
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) or self.max_restarts < 1:
            raise ConfigError(
                f"max_restarts = {self.max_restarts!r} is not allowed: it must be a whole number >= 1 "
                "(leave --recover out for a run that is never restarted)"
            )
        check_limit("max_restarts", self.max_restarts, "restarts", maximum=1000)
        if self.max_hours is not None:
            check_limit("max_hours", self.max_hours, "hours", maximum=MAX_RUNTIME_LIMIT_S / 3600)
        if self.max_cost is not None:
            check_limit("max_cost", self.max_cost, "currency units")
        if not isinstance(self.retry_user_errors, bool):
            raise ConfigError(f"retry_user_errors = {self.retry_user_errors!r} must be true or false")

    def gives_up(self, attempts: list[Attempt], price_per_hour: float | None = None, now: float | None = None) -> str | None:
        """Why no replacement may follow the last of ``attempts`` (one line), or None when one may.

        ``attempts`` must end with the attempt that just ended (its ``ended`` set).
        """
        if not attempts:
            return None
        last = attempts[-1]
        how = f"last attempt {last.ended or 'ended'}" + (f" ({last.error})" if last.error else "")
        restarts = len(attempts) - 1
        if restarts >= self.max_restarts:
            return f"gave up after {restarts} restarts (max_restarts={self.max_restarts}): {how}"
        first = next((a.started_at for a in attempts if a.started_at), None)
        if first is not None and (self.max_hours is not None or self.max_cost is not None):
            hours = ((now if now is not None else time.time()) - parse_time(first).timestamp()) / 3600
            if self.max_hours is not None and hours >= self.max_hours:
                return f"gave up after {restarts} restarts: {hours:.3g} h since the first attempt (max_hours={self.max_hours:g}): {how}"
            if self.max_cost is not None and price_per_hour and hours * price_per_hour >= self.max_cost:
                return (
                    f"gave up after {restarts} restarts: {hours * price_per_hour:.3g} spent at {price_per_hour:g}/h "
                    f"(max_cost={self.max_cost:g}): {how}"
                )
        return None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecoverPolicy:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class Attempt:
    """One start of a managed run's job on an instance (``JobState.attempts``)."""

    number: int
    """1 for the first start, 2 for the first replacement, ..."""
    instance_id: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    ended: str | None = None
    """Why it ended (an :class:`AttemptEnd` value); None while it runs."""
    error: str | None = None
    """One line on how it ended, when not finished."""
    steps: int | None = None
    """Global steps trained in this attempt (from the run's status), when known."""
    last_step: int | None = None
    """The run's global step when the attempt ended, when known."""
    resumed_from: str | None = None
    """The newest published checkpoint when the attempt started (None: from scratch)."""
    resumed_step: int | None = None
    """The global step of that checkpoint, when known."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attempt:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class JobSpec:
    """What to run, written once by the launcher to ``<run>/job.json``."""

    run_id: str
    run_url: str
    created_at: str
    script: str | None = None
    """Path of the script relative to the code root (``python SCRIPT ARGS...``)."""
    module: str | None = None
    """Or a module to run (``python -m MODULE ARGS...``)."""
    args: list[str] = field(default_factory=list)
    code: CodeRef | None = None
    """None: no code is synced (the module must already be importable)."""
    workdir: str = "."
    """Directory, relative to the code root, the job runs in."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables for the job (no secrets; see ``forward_env``)."""
    forward_env: list[str] = field(default_factory=list)
    """Names of variables passed from the launcher's environment without being stored."""
    setup: list[str] = field(default_factory=list)
    """Shell commands run (in the code root) before the job, e.g. ``apt-get install -y ...``."""
    env_mode: EnvMode = EnvMode.AUTO
    python: str | None = None
    """Interpreter to reuse (local provider: the launcher's own); None: the instance's ``python3``."""
    max_runtime_s: float | None = None
    """The agent stops the job (SIGTERM, then SIGKILL after ``stop_grace_s``) after this long."""
    stop_grace_s: float = 60.0
    provider: str = "local"
    instance_id: str | None = None
    terminate_instance_after: bool = False
    """The agent terminates its instance once the job ends (set for instances a launch created)."""
    log_interval_s: float = 1.0
    """Log chunks are shipped at most this long after the job prints them."""
    heartbeat_interval_s: float = 5.0
    spot: bool = False
    """The instance is a spot instance: the agent watches the instance metadata service for an
    interruption notice and asks the job to checkpoint at once (``TRAINCTL_SPOT`` overrides)."""
    launcher_grace_s: float | None = None
    """An attached launcher refreshes ``control/launcher.json``; when it has not for this long, the
    agent cancels the job (and releases an instance its launch created). None: no such watchdog
    (detached launches)."""
    recover: RecoverPolicy | None = None
    """A managed run (``--recover``): lost or preempted attempts are replaced, within these limits."""
    nodes: int = 1
    """Instances the job runs across. Above 1 the agent on each runs the job under ``torchrun``
    (c10d rendezvous at node 0, the run id as rendezvous id); see ``docs/multi-node.md``."""
    nproc_per_node: int | None = None
    """Processes ``torchrun`` starts on each node (a multi-node run); None: the node's CUDA
    device count, or 1 without CUDA."""
    node_instances: list[str] = field(default_factory=list)
    """A multi-node run: the instance id of each node, by node index (node 0 first; ``instance_id``
    is node 0's). An agent started without ``$TRAINCTL_NODE`` finds its index here."""
    trainctl_version: str = ""
    format: str = JOB_FORMAT

    def __post_init__(self) -> None:
        validate_run_id(self.run_id)
        if (self.script is None) == (self.module is None):
            raise ConfigError("a job runs exactly one of a script or a module")
        for name, value in self.env.items():
            if looks_secret(name):
                raise ConfigError(
                    f"env {name} looks like a secret and would be stored with the job: forward it instead "
                    f"(--env {name} without a value passes it from your environment)"
                )
            if not isinstance(value, str):
                raise ConfigError(f"env {name} must be a string, got {value!r}")
        # finite and > 0: an inf or nan here would reach the agent's timers and the boot script
        if self.max_runtime_s is not None:
            check_limit("JobSpec.max_runtime_s", self.max_runtime_s, maximum=MAX_RUNTIME_LIMIT_S)
        if self.launcher_grace_s is not None:
            check_limit("JobSpec.launcher_grace_s", self.launcher_grace_s)
        for name in ("stop_grace_s", "log_interval_s", "heartbeat_interval_s"):
            check_limit(f"JobSpec.{name}", getattr(self, name))
        check_nodes(self.nodes, self.nproc_per_node)
        if self.node_instances and len(self.node_instances) != self.nodes:
            raise ConfigError(f"JobSpec.node_instances names {len(self.node_instances)} instances for {self.nodes} nodes")

    def command(self, python: str) -> list[str]:
        """The job's argv with ``python`` as the interpreter."""
        head = [python, "-u", self.script] if self.script else [python, "-u", "-m", str(self.module)]
        return head + list(self.args)

    def to_json(self) -> bytes:
        data = asdict(self)
        data["env_mode"] = self.env_mode.value
        return json.dumps(data, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> JobSpec:
        data = json.loads(raw)
        if not str(data.get("format", "")).startswith("trainctl.job/"):
            raise ConfigError(f"not a trainctl job spec (format {data.get('format')!r})")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if known.get("recover") is not None:
            known["recover"] = RecoverPolicy.from_dict(known["recover"])
        if known.get("code"):
            code = known["code"]
            known["code"] = CodeRef(**{k: v for k, v in code.items() if k in CodeRef.__dataclass_fields__})
        known["env_mode"] = EnvMode(known.get("env_mode", "auto"))
        return cls(**known)


@dataclass
class JobState:
    """How a job is going, rewritten by the agent to ``<run>/job-state.json``."""

    run_id: str
    phase: JobPhase
    updated_at: str
    """UTC time of the last heartbeat; a job whose agent stops refreshing is shown as lost."""
    instance_id: str | None = None
    host: str | None = None
    pid: int | None = None
    """The job's process id on the instance, while it runs."""
    exit_code: int | None = None
    error: str | None = None
    """One line: why the job failed, was cancelled or timed out (agent-level, not the script's)."""
    error_tail: str = ""
    """The last lines of the job's output when it failed (its traceback, usually)."""
    queued_at: str | None = None
    started_at: str | None = None
    """When the agent picked the job up."""
    running_at: str | None = None
    """When the script itself started."""
    ended_at: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent in ``fetch``, ``setup``, ``run`` and ``total``."""
    python: str | None = None
    env_mode: str | None = None
    """What the agent did about the environment: ``reused`` or ``isolated (uv)`` / ``isolated (venv)``."""
    heartbeat_interval_s: float = 5.0
    interruption: dict[str, Any] | None = None
    """The spot interruption notice the agent saw (``action``, ``time``, ``seen_at``), if any."""
    attempts: list[Attempt] = field(default_factory=list)
    """A managed run's attempts, oldest first (empty for other runs, and in states written before)."""
    node: int | None = None
    """A multi-node run: the node whose agent wrote this state (0: the lead, whose state is the run's)."""
    failed_node: int | None = None
    """A multi-node run that failed: the node that failed first (the lead fills it in)."""
    format: str = JOB_STATE_FORMAT

    @property
    def age_s(self) -> float:
        return (timeutil.now() - parse_time(self.updated_at)).total_seconds()

    @property
    def lost(self) -> bool:
        """The agent stopped refreshing while the job was not finished (by this machine's clock;
        ``trainctl gc`` goes by the store's, see :meth:`silent_limit_s`)."""
        limit = self.silent_limit_s()
        return limit is not None and self.age_s > limit

    def silent_limit_s(self) -> float | None:
        """How long this state may go unrefreshed before the job counts as lost; None when it
        never does (the job ended).

        A queued job has no agent yet (a cloud instance may take minutes to boot): it counts as
        lost only after :data:`QUEUED_LOST_AFTER_S`.
        """
        if self.phase.is_terminal():
            return None
        if self.phase is JobPhase.QUEUED:
            return QUEUED_LOST_AFTER_S
        return max(LOST_AFTER_S, 6 * self.heartbeat_interval_s)

    def state(self) -> str:
        """The phase to show: ``lost`` when the agent went quiet before the job ended, or
        ``preempted`` when it did so after a spot interruption notice (the instance was reclaimed
        before the agent could write the final state)."""
        if self.lost:
            return JobPhase.PREEMPTED.value if self.interruption else "lost"
        return self.phase.value

    def touch(self) -> None:
        self.updated_at = utc_now()

    def to_json(self) -> bytes:
        data = asdict(self)
        data["phase"] = self.phase.value
        return json.dumps(data, indent=2, sort_keys=True).encode()

    def to_dict(self) -> dict[str, Any]:
        data = json.loads(self.to_json())
        data["state"] = self.state()
        return data

    @classmethod
    def from_json(cls, raw: bytes | str) -> JobState:
        data = json.loads(raw)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["phase"] = JobPhase(known["phase"])
        known["attempts"] = [Attempt.from_dict(a) for a in known.get("attempts") or []]
        known["updated_at"] = str(known["updated_at"])
        parse_time(known["updated_at"])  # every reader compares it to now: refuse it here
        return cls(**known)
