"""How the agents of a multi-node run meet, run the job under ``torchrun``, and end together.

A run with ``JobSpec.nodes`` above 1 has one agent per instance. Each learns its node index
(:func:`resolve_node`: ``$TRAINCTL_NODE`` from the provider that started it, else its instance id's
place in ``JobSpec.node_instances``) and writes its own state and logs (``JobStore.for_node``;
node 0, the lead, writes the run's own). Then:

- **Discovery.** The lead picks a free port on its node address (``Provider.node_address()``)
  and writes ``control/rendezvous.json`` (:class:`Rendezvous`: host, port, rendezvous id,
  attempt; signed with the run's key when the agent has one). The others wait for it, up to
  :data:`NODE_START_WAIT_S`, and give up at once if the run is cancelled or the lead ended.
  The record is store content: it is validated (:meth:`Rendezvous.from_json`) and nothing in it
  is executed.
- **The job.** Every node runs ``python -m torch.distributed.run`` (:func:`torchrun_argv`) with
  the c10d rendezvous at that endpoint, hosted by the lead's torchrun (``is_host=1``). torchrun
  builds the process group; Lightning inside picks up ``TorchElasticEnvironment`` itself. Which
  torch node rank each node gets is torchrun's choice (join order): it need not equal the node
  index, which names instances, states and logs.
- **Failures.** torchrun ends by itself when a worker dies (``--max-restarts=0``; the others see
  their gloo/NCCL connections reset). As a backstop each agent watches its peers in the store
  (:class:`PeerWatch`; the lead watches every node, the others the lead): a peer that ended
  other than succeeded, whose heartbeat is older than :func:`stale_after_s`, or (the lead) whose
  job ended with a non-zero exit code, makes the agent stop its own job and end failed, naming
  the node. The lead writes the run's final state only after the other nodes ended (bounded by
  :func:`peers_end_wait_s`), with ``failed_node`` the node that failed first
  (:func:`run_outcome`).

See ``docs/multi-node.md`` ("How the nodes meet and end"). Internal: not part of the public API.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TypeGuard

from trainctl_lightning.agent.jobproc import children_of
from trainctl_lightning.errors import AgentFailure, IntegrityError
from trainctl_lightning.jobs.spec import AttemptEnd, JobPhase, JobSpec, JobState
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.runkey import sign, verify
from trainctl_lightning.store.layout import NODE_ENV, RENDEZVOUS
from trainctl_lightning.timeutil import parse_time

__all__ = [
    "NODE_START_WAIT_S",
    "RENDEZVOUS_FORMAT",
    "STALE_BEATS",
    "STALE_MIN_S",
    "AttemptOutcome",
    "PeerFailure",
    "PeerWatch",
    "Rendezvous",
    "attempt_of",
    "attempt_outcome",
    "become_subreaper",
    "device_count",
    "end_orphans",
    "free_port",
    "of_attempt",
    "peers_end_wait_s",
    "rendezvous_id",
    "resolve_node",
    "run_outcome",
    "stale_after_s",
    "torchrun_argv",
    "torchrun_root_cause",
]

log = logging.getLogger("trainctl_lightning.agent")

RENDEZVOUS_FORMAT = "trainctl-rendezvous/1"
#: A peer is lost when its heartbeat is older than STALE_BEATS heartbeat intervals, and never
#: before STALE_MIN_S seconds (a slow store write must not end a healthy run).
STALE_BEATS = 3
STALE_MIN_S = 15.0
#: How long a node waits for the lead's rendezvous record, a peer's first state, and torchrun's
#: rendezvous (its ``join_timeout``) for all nodes to join: instances of one run may boot minutes apart.
NODE_START_WAIT_S = 600.0
#: The longest rendezvous record read (it holds a few short fields).
_MAX_RECORD = 4096
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_RDZV_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PR_SET_CHILD_SUBREAPER = 36


def stale_after_s(heartbeat_interval_s: float) -> float:
    """Seconds without a new heartbeat after which a peer node counts as lost."""
    return max(STALE_BEATS * heartbeat_interval_s, STALE_MIN_S)


def peers_end_wait_s(spec: JobSpec) -> float:
    """How long the lead waits, once its own job ended, for the other nodes to end theirs: a
    peer's own stop (its job's grace), its noticing (a stale lead at worst), and a margin."""
    return spec.stop_grace_s + stale_after_s(spec.heartbeat_interval_s) + 10.0


def rendezvous_id(spec: JobSpec, attempt: int | None) -> str:
    """torchrun's ``--rdzv-id``: the run id, with the attempt of a managed run."""
    return spec.run_id if attempt is None else f"{spec.run_id}-a{attempt}"


# ---------------------------------------------------------------- node index


def resolve_node(spec: JobSpec, env_value: str | None, own_instance_id: Callable[[], str | None]) -> int:
    """This agent's node index: ``$TRAINCTL_NODE`` (``env_value``), else the place of this
    instance's id (``own_instance_id()``, asked only then) in ``spec.node_instances``.

    Raises:
        AgentFailure: neither tells, or the value is not a node of this run (one line).
    """
    if env_value is not None and env_value.strip() != "":
        text = env_value.strip()
        if not text.isdigit() or not 0 <= int(text) < spec.nodes:
            raise AgentFailure(
                f"${NODE_ENV} = {env_value!r} is not a node of this {spec.nodes}-node run: "
                f"give a whole number from 0 to {spec.nodes - 1} (the provider sets it)"
            )
        return int(text)
    own = own_instance_id()
    if own and own in spec.node_instances:
        return spec.node_instances.index(own)
    raise AgentFailure(
        f"cannot tell which node of this {spec.nodes}-node run this agent is: ${NODE_ENV} is not set and "
        + (f"this instance ({own}) is not in the job's node_instances" if own else "the provider cannot tell this instance's id")
        + "; start agents through trainctl (the provider sets it)"
    )


# ---------------------------------------------------------------- the rendezvous record


@dataclass(frozen=True)
class Rendezvous:
    """Where the nodes' torchrun meet: ``control/rendezvous.json``, written by the lead's agent."""

    host: str
    """The lead's node address (an IP address or a host name): torchrun's c10d store listens there."""
    port: int
    """The TCP port of that store (1-65535), free on the lead when it was picked."""
    rdzv_id: str
    """torchrun's ``--rdzv-id``: the run id (and ``-a<attempt>`` for a managed run's attempt)."""
    attempt: int
    """The attempt this record is for (1 outside managed runs): a record of an earlier one is not used."""
    nodes: int
    """How many nodes meet there (the job's ``nodes``)."""
    written_at: str = ""
    format: str = RENDEZVOUS_FORMAT

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address
        return f"{host}:{self.port}"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Rendezvous:
        """Parse and check a record read from the store.

        Raises:
            IntegrityError: not a record of this format, or a field out of range (one line naming
                ``where`` and the field; nothing in it was used).
        """

        def bad(what: str) -> IntegrityError:
            return IntegrityError(
                f"{where} is not a valid rendezvous record: {what}; it is written by the run's node 0 agent, "
                "so something else changed it: check who can write to the store, then launch again"
            )

        if len(raw) > _MAX_RECORD:
            raise bad(f"{len(raw)} bytes, more than {_MAX_RECORD}")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise bad(f"not JSON ({' '.join(str(exc).split())[:80]})") from None
        if not isinstance(data, dict):
            raise bad(f"a JSON {type(data).__name__}, not an object")
        if data.get("format") != RENDEZVOUS_FORMAT:
            raise bad(f"format {str(data.get('format'))[:40]!r}, not {RENDEZVOUS_FORMAT!r}")
        host, port, rdzv_id = data.get("host"), data.get("port"), data.get("rdzv_id")
        attempt, nodes, written_at = data.get("attempt"), data.get("nodes"), data.get("written_at", "")
        if not isinstance(host, str) or not _valid_host(host):
            raise bad(f"host {str(host)[:80]!r} is not an IP address or a host name")
        if not _whole(port, 1, 65535):
            raise bad(f"port {str(port)[:20]!r} is not a whole number from 1 to 65535")
        if not isinstance(rdzv_id, str) or not _RDZV_ID.match(rdzv_id):
            raise bad(f"rdzv_id {str(rdzv_id)[:80]!r} is not a run id")
        if not _whole(attempt, 1, 10**6):
            raise bad(f"attempt {str(attempt)[:20]!r} is not a whole number >= 1")
        if not _whole(nodes, 2, 10**4):
            raise bad(f"nodes {str(nodes)[:20]!r} is not a whole number >= 2")
        if not isinstance(written_at, str) or len(written_at) > 40:
            raise bad("written_at is not a time")
        return cls(host=host, port=port, rdzv_id=rdzv_id, attempt=attempt, nodes=nodes, written_at=written_at)


def _whole(value: object, low: int, high: int) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOSTNAME.match(host))


def write_rendezvous(jobs: JobStore, record: Rendezvous, key: str | None, run_id: str) -> None:
    """Publish ``record`` (replacing an earlier attempt's), signed with the run's key when there is one."""
    data = record.to_json()
    jobs.objects.write(RENDEZVOUS, sign(key, data, purpose="rendezvous", run_id=run_id) if key else data)


def read_rendezvous(jobs: JobStore, key: str | None, run_id: str) -> Rendezvous | None:
    """The lead's record, or None before it wrote one.

    Raises:
        AuthenticationError: this agent has the run's key and the record is not signed with it.
        IntegrityError: the record does not parse or a field is out of range.
    """
    raw = jobs.objects.read(RENDEZVOUS)
    if raw is None:
        return None
    where = jobs.objects.url_of(RENDEZVOUS)
    if key:
        raw = verify(key, raw, purpose="rendezvous", name=where, run_id=run_id)
    return Rendezvous.from_json(raw, where)


def free_port(host: str) -> int:
    """A TCP port free on ``host`` right now (the OS picks it). torchrun binds it moments later;
    should something else take it in between, torchrun fails with the port named."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- the command


def device_count(python: str) -> int:
    """Processes per node when the job does not say: the CUDA devices the job's torch sees (asked only on a
    machine with an NVIDIA or ROCm driver), or 1.

    Raises:
        AgentFailure: torch cannot be imported by the job's Python (torchrun comes with it).
    """
    if not any(os.path.exists(dev) for dev in ("/dev/nvidiactl", "/dev/kfd")):
        return 1  # no NVIDIA or ROCm driver here: no CUDA device torch could see (and no import of torch to wait for)
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AgentFailure(f"could not ask {python} for its CUDA devices: {' '.join(str(exc).split())}") from None
    lines = done.stdout.split()
    if done.returncode != 0 or not lines or not lines[-1].isdigit():
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise AgentFailure(
            f"a multi-node run needs torch (torchrun) in the job's Python {python}, and importing it failed: {why[:200]}"
        )
    return max(1, int(lines[-1]))


def torchrun_argv(
    python: str,
    job_argv: list[str],
    *,
    nodes: int,
    nproc_per_node: int,
    rendezvous: Rendezvous,
    lead: bool,
    local_addr: str,
    log_dir: str,
) -> list[str]:
    """The job under torchrun: ``job_argv`` is ``JobSpec.command``'s (``[python, -u, script, *args]``
    or ``[python, -u, -m, module, *args]``); torchrun takes the same tail (``-m`` is its own flag),
    and runs its workers with ``$PYTHONUNBUFFERED`` from the agent instead of ``-u``. ``log_dir``
    is where torchrun keeps its per-run files (its error files): without it, it makes a
    ``/tmp/torchelastic_*`` folder per run and never removes it; the agent removes this one."""
    tail = job_argv[2:] if job_argv[1:2] == ["-u"] else job_argv[1:]
    return [
        python,
        "-u",
        "-m",
        "torch.distributed.run",
        f"--nnodes={nodes}",
        f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={rendezvous.endpoint}",
        f"--rdzv-id={rendezvous.rdzv_id}",
        f"--rdzv-conf=is_host={1 if lead else 0},join_timeout={int(NODE_START_WAIT_S)}",
        f"--local-addr={local_addr}",
        "--max-restarts=0",
        f"--log-dir={log_dir}",
        *tail,
    ]


_ROOT_FIELD = re.compile(r"^\s*(rank|exitcode|traceback)\s*:\s*(.*)$")


def torchrun_root_cause(output: str) -> str | None:
    """torchrun's "Root Cause (first observed failure)" in the job's output, as one short phrase
    (``rank 1 (local_rank: 0) exit code -9 (SIGKILL)``); None when there is none."""
    _, found, block = output.rpartition("Root Cause (first observed failure):")
    if not found:
        return None
    fields: dict[str, str] = {}
    for line in block.splitlines()[:12]:
        if (m := _ROOT_FIELD.match(line)) and m.group(1) not in fields:
            fields[m.group(1)] = " ".join(m.group(2).split())
    if "exitcode" not in fields:
        return None
    code = re.sub(r"\(pid: \d+\)\s*", "", fields["exitcode"]).strip()
    return f"rank {fields.get('rank', '?')} exit code {code}"[:200]


# ---------------------------------------------------------------- watching the other nodes


def attempt_of(state: JobState | None) -> int | None:
    """The managed-run attempt a node's state is of (its newest recorded attempt); None: none recorded."""
    return max((a.number for a in state.attempts), default=None) if state is not None else None


def of_attempt(state: JobState | None, attempt: int | None) -> JobState | None:
    """``state`` when it is of ``attempt`` (or no attempt is asked for); else None, as if the node had
    not written yet: an earlier attempt's end is no news about this one."""
    if attempt is None or state is None or attempt_of(state) == attempt:
        return state
    return None


@dataclass(frozen=True)
class PeerFailure:
    """A node that ended the run for everyone: its index and why (one line)."""

    node: int
    reason: str


class PeerWatch:
    """The other nodes as this agent sees them in the store: which one failed, if any.

    The lead watches every other node; the others watch the lead. A heartbeat counts as stale by
    this agent's own clock (the time since the peer's ``updated_at`` last changed), so clock skew
    between instances does not matter; after a gap in this agent's own reads (the store was
    unreachable) the clocks restart, since the peer could not write either.

    In a managed run (``attempt`` given) a peer's state counts only once it is of the same attempt
    (:func:`of_attempt`): until the peer's new agent writes, the store still holds how it ended the
    attempt before, which says nothing about this one.
    """

    def __init__(
        self,
        jobs: JobStore,
        node: int,
        nodes: int,
        heartbeat_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        attempt: int | None = None,
    ) -> None:
        self.jobs = jobs
        self.node = node
        self.attempt = attempt
        self.peers = list(range(1, nodes)) if node == 0 else [0]
        self.stale_after_s = stale_after_s(heartbeat_interval_s)
        self.poll_s = max(0.2, min(heartbeat_interval_s, 5.0))
        self._clock = clock
        self._started = clock()
        self._seen: dict[int, tuple[str, float]] = {}  # node: (updated_at, when it last changed)
        self._last_read: float | None = None

    def check(self) -> PeerFailure | None:
        """Read the peers' states once; the first failed or lost one, or None."""
        now = self._clock()
        if self._last_read is not None and now - self._last_read > 3 * self.poll_s + 5.0:
            self._seen = {k: (seen, now) for k, (seen, _) in self._seen.items()}
        states: dict[int, JobState | None] = {}
        for k in self.peers:
            try:
                states[k] = of_attempt(self.jobs.for_node(k).read_state(), self.attempt)
            except IntegrityError as exc:  # damaged: skipped, said; its heartbeat ages meanwhile
                log.warning("node %d's state is damaged (skipped): %s", k, " ".join(str(exc).split()))
                states[k] = None
            except Exception as exc:  # the store is unreachable: judge nothing this time
                log.warning("could not read node %d's state (will retry): %s", k, " ".join(str(exc).split()))
                return None
        self._last_read = now
        for k, state in states.items():
            if failure := self._judge(k, state, now):
                return failure
        return None

    def _judge(self, k: int, state: JobState | None, now: float) -> PeerFailure | None:
        if state is not None and state.phase.is_terminal() and state.phase is not JobPhase.SUCCEEDED:
            return PeerFailure(k, f"node {k} {state.phase.value}: {state.error or 'no reason recorded'}")
        if state is not None and k == 0 and state.exit_code not in (None, 0) and not state.phase.is_terminal():
            # the lead's job ended; the lead waits for the others before it writes the run's end
            return PeerFailure(0, f"node 0 failed: {state.error or f'its job exited with code {state.exit_code}'}")
        if state is None or state.phase is JobPhase.QUEUED:  # its agent has not written yet
            if now - self._started > NODE_START_WAIT_S:
                return PeerFailure(k, f"node {k} did not start within {NODE_START_WAIT_S:.0f}s")
            return None
        if state.phase.is_terminal():
            return None
        seen = self._seen.get(k)
        if seen is None or seen[0] != state.updated_at:
            self._seen[k] = (state.updated_at, now)
            return None
        if now - seen[1] > self.stale_after_s:
            return PeerFailure(
                k, f"node {k} stopped reporting: no heartbeat for {now - seen[1]:.0f}s (its instance or agent is gone)"
            )
        return None


# ---------------------------------------------------------------- the run's end


def _time(value: str | None) -> datetime | None:
    try:
        return parse_time(value) if value else None
    except ValueError:
        return None


def run_outcome(
    own_phase: JobPhase,
    own_error: str | None,
    own_exit: int | None,
    own_ended_at: str,
    own_cause: PeerFailure | None,
    peers: dict[int, JobState | None],
    waited_s: float,
) -> tuple[JobPhase, int | None, str | None, int | None]:
    """The run's end, as the lead writes it: (phase, exit code, error, failed node).

    Args:
        own_phase, own_error, own_exit, own_ended_at: how the lead's own job ended, and when.
        own_cause: the peer failure that made the lead stop its job, if that is why it ended.
        peers: every other node's last state (None: none readable).
        waited_s: how long the lead waited for them (named for a node that had not ended).

    A node that stopped because of another (its state's ``failed_node`` names that one) did not
    fail first; among the others the earliest ``ended_at`` wins. A cancel (the run's cancel
    request) or the max runtime ends the run as the lead ended.
    """
    if own_phase in (JobPhase.CANCELLED, JobPhase.TIMED_OUT) and own_cause is None:
        return own_phase, own_exit, own_error, None
    first: list[tuple[datetime, int, str, int | None]] = []  # (when, node, reason, exit code)
    late = datetime.max.replace(tzinfo=timezone.utc)
    if own_phase is not JobPhase.SUCCEEDED and own_cause is None:
        first.append((_time(own_ended_at) or late, 0, f"{own_phase.value}: {own_error or 'no reason recorded'}", own_exit))
    for k, state in sorted(peers.items()):
        if state is None or not state.phase.is_terminal():
            first.append((late, k, f"did not end within {waited_s:.0f}s of node 0", None))
        elif state.phase is not JobPhase.SUCCEEDED and state.failed_node in (None, k):
            first.append(
                (_time(state.ended_at) or late, k, f"{state.phase.value}: {state.error or 'no reason recorded'}", state.exit_code)
            )
    if first:
        _, k, reason, code = min(first, key=lambda f: (f[0], f[1]))
        return JobPhase.FAILED, code, f"node {k} {reason}", k
    if own_cause is not None:  # only nodes that stopped because of another: the lead's view stands
        return JobPhase.FAILED, own_exit, own_error, own_cause.node
    return JobPhase.SUCCEEDED, own_exit, None, None


@dataclass(frozen=True)
class AttemptOutcome:
    """How a managed multi-node run's attempt ended across its nodes, as the lead records it."""

    ended: AttemptEnd
    node: int | None
    """The node the end is put down to (None: it finished, or was cancelled as a whole)."""
    error: str | None
    """One line naming that node and why (None when it finished)."""


def attempt_outcome(
    run_phase: JobPhase,
    run_error: str | None,
    failed_node: int | None,
    own_phase: JobPhase,
    own_error: str | None,
    own_cause: PeerFailure | None,
    peers: dict[int, JobState | None],
    waited_s: float,
) -> AttemptOutcome:
    """Why a managed multi-node run's attempt ended, from the run's end (:func:`run_outcome`) and
    every node's: what decides whether the group is restarted.

    One lost node (its agent gone without a final state: no state of this attempt that ended, or the
    supervisor recorded its attempt ``lost``) or one preempted node makes the whole attempt lost or
    preempted, whichever node's collective failed first: with a node gone, every other node's job
    fails too (a reset connection, a c10d store that went away), often before the gone node's end
    is known. Otherwise the run's end stands: a job failing by itself on some node is a failure
    (``retry_user_errors`` decides), a cancel or the max runtime cancels.

    Args:
        run_phase, run_error, failed_node: what :func:`run_outcome` made of the run's end.
        own_phase, own_error, own_cause: how the lead's own job ended, and the peer failure that
            made it stop, if that is why.
        peers: every other node's last state of this attempt (None: none of this attempt).
        waited_s: how long the lead waited for them.
    """
    if run_phase is JobPhase.SUCCEEDED:
        return AttemptOutcome(AttemptEnd.FINISHED, None, None)
    if run_phase in (JobPhase.CANCELLED, JobPhase.TIMED_OUT) and own_cause is None:
        return AttemptOutcome(AttemptEnd.CANCELLED, None, run_error)
    lost: list[tuple[int, str]] = []
    preempted: list[tuple[int, str]] = []
    if own_phase is JobPhase.PREEMPTED:
        preempted.append((0, f"preempted: {own_error or 'no reason recorded'}"))
    for k, state in sorted(peers.items()):
        newest = max(state.attempts, key=lambda a: a.number) if state is not None and state.attempts else None
        if state is None or not state.phase.is_terminal():
            lost.append((k, f"lost: it did not end within {waited_s:.0f}s of node 0 (its agent or instance is gone)"))
        elif newest is not None and newest.ended == AttemptEnd.LOST.value:
            lost.append((k, f"lost: {newest.error or state.error or 'no reason recorded'}"))
        elif state.phase is JobPhase.PREEMPTED:
            preempted.append((k, f"preempted: {state.error or 'no reason recorded'}"))
    for ended, found in ((AttemptEnd.LOST, lost), (AttemptEnd.PREEMPTED, preempted)):
        if found:
            k, reason = found[0]
            return AttemptOutcome(ended, k, f"node {k} {reason}")
    return AttemptOutcome(AttemptEnd.FAILED, failed_node, run_error)


# ---------------------------------------------------------------- torchrun's workers


def become_subreaper() -> bool:
    """Make this (agent) process adopt its orphaned descendants (Linux ``PR_SET_CHILD_SUBREAPER``).

    torchrun starts each worker in a session of its own, so a signal to torchrun's group does not
    reach them; when torchrun is killed, its workers become this agent's children, and
    :func:`end_orphans` ends them. False where that cannot be done (then none are adopted)."""
    if not sys.platform.startswith("linux") or (libc := ctypes.util.find_library("c")) is None:
        return False
    return ctypes.CDLL(libc, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def end_orphans(known: Iterable[int] = (), wait_s: float = 10.0) -> list[int]:
    """SIGKILL the process group of every child this agent adopted (what a killed torchrun left),
    and reap them; the pids that were ended. ``known``: children the caller reaps itself."""
    skip = set(known)
    ended: list[int] = []
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        children = [pid for pid in children_of(os.getpid(), zombies=True) if pid not in skip]
        if not children:
            break
        for pid in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    ended.append(pid)
        time.sleep(0.05)
    return ended
