"""One run on an instance: fetch the job and its code, set up Python, run it, watch it, report.

Everything the launcher and ``trainctl status``/``logs`` see comes from here, through the run
store: ``job-state.json`` (rewritten on every phase change and every heartbeat) and the job's
output as immutable log chunks. The order of the last two writes is a promise to readers: the
final log chunk is in the store before the terminal state is.

The agent outlives store trouble: a failed write during the run is retried on the next tick
and never stops the job.

On a spot instance (``JobSpec.spot`` or ``TRAINCTL_SPOT=1``) the agent watches the metadata
service (:mod:`.spot`). On an interruption notice it records the notice in the job state, sends
SIGUSR1 to the job's process once that process handles it (``CheckpointSync`` saves and
publishes a checkpoint at once), stops the job when the notice's time comes, and ends the job
as ``preempted``: also when it ends any other way but success after the notice (the instance
going down SIGTERMs the agent). A rebalance recommendation asks for a checkpoint too.

With ``JobSpec.launcher_grace_s`` the agent cancels the job when the attached launcher's
heartbeat stops (:mod:`.watchdog`).

The job runs in a process group of its own, recorded in ``<workdir>/jobs/<run id>.json`` while
it runs, and gets SIGTERM if the agent dies (:mod:`.jobproc`): a provider can then end the
whole group without the agent, and no job runs on unsupervised.

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from trainctl_lightning.agent.attempts import (
    attempt_marker,
    begin_attempt,
    current_attempt,
    end_attempt,
    end_of,
    price_per_hour,
)
from trainctl_lightning.agent.environment import prepare_environment
from trainctl_lightning.agent.jobproc import (
    JobProcess,
    children_of,
    die_with_parent,
    process_start_time,
    remove_job_record,
    write_job_record,
)
from trainctl_lightning.agent.nodes import (
    NODE_START_WAIT_S,
    AttemptOutcome,
    PeerFailure,
    PeerWatch,
    Rendezvous,
    attempt_outcome,
    become_subreaper,
    device_count,
    end_orphans,
    free_port,
    of_attempt,
    peers_end_wait_s,
    read_rendezvous,
    rendezvous_id,
    resolve_node,
    run_outcome,
    torchrun_argv,
    torchrun_root_cause,
    write_rendezvous,
)
from trainctl_lightning.agent.spot import (
    INTERRUPTION,
    SpotNotice,
    SpotWatcher,
    handles_signal,
    spot_watch_enabled,
)
from trainctl_lightning.agent.watchdog import LauncherWatchdog
from trainctl_lightning.errors import (
    AgentFailure,
    AuthenticationError,
    ConflictError,
    IntegrityError,
    RunNotFoundError,
    SetupError,
    SetupStopped,
    TrainctlError,
)
from trainctl_lightning.humanize import human_duration
from trainctl_lightning.jobs.spec import (
    SAVE_NOW_SIGNAL,
    Attempt,
    AttemptEnd,
    JobPhase,
    JobSpec,
    JobState,
    validate_run_id,
)
from trainctl_lightning.jobs.store import JobStore, LogChunkWriter
from trainctl_lightning.retry import RetryPolicy
from trainctl_lightning.runkey import RUN_KEY_ENV
from trainctl_lightning.store.layout import ATTEMPT_ENV, JOB, NODE_ENV, RECOVER_ENV, RUN_URL_ENV, run_id_of
from trainctl_lightning.timeutil import utc_now

__all__ = [
    "CANCEL_POLL_S",
    "INSTANCE_ID_ENV",
    "NOTE_PREFIX",
    "NOTICE_LEAD_S",
    "RUN_ID_ENV",
    "TAIL_LINES",
    "Agent",
    "LogPump",
    "Outcome",
    "one_line",
    "run_agent",
]

log = logging.getLogger("trainctl_lightning.agent")

RUN_ID_ENV = "TRAINCTL_RUN_ID"
INSTANCE_ID_ENV = "TRAINCTL_INSTANCE_ID"
#: How often the agent looks for a cancel request (one small GET).
CANCEL_POLL_S = 1.0
#: Lines of output kept for the error tail of a job that did not succeed.
TAIL_LINES = 50
NOTE_PREFIX = "[trainctl agent] "
#: Seconds an interruption notice without a readable time is assumed to leave (EC2 gives two minutes).
NOTICE_LEAD_S = 120.0
# During the run a write that keeps failing is retried on the next tick instead of blocking
# heartbeats and cancel checks; the final writes ride out longer trouble.
_TICK_RETRY = RetryPolicy(deadline_s=5.0, initial_backoff_s=0.2, max_backoff_s=2.0)
_FINAL_RETRY = RetryPolicy(deadline_s=60.0)


@dataclass
class Outcome:
    phase: JobPhase
    exit_code: int | None
    error: str | None = None


def one_line(text: object) -> str:
    return " ".join(str(text).split())


class LogPump:
    """The job's output on its way to the store: buffered, shipped as chunks, kept locally too.

    ``feed`` never blocks on the store (the job must not stall on a full pipe while an upload
    is slow); ``ship`` writes what has accumulated as one chunk and keeps it for the next
    attempt when the write fails.
    """

    MAX_CHUNK = 8 * 2**20

    def __init__(self, writer: LogChunkWriter, local_path: Path, tail_bytes: int = 64 * 1024) -> None:
        self.writer = writer
        self.local_path = local_path
        local_path.parent.mkdir(parents=True, exist_ok=True)
        self._local = open(local_path, "ab")
        self._buf = bytearray()
        self._unshipped: bytes | None = None  # a chunk whose write failed, retried as it is
        self._tail = bytearray()
        self._tail_bytes = tail_bytes
        self._lock = threading.Lock()
        self._ship_lock = threading.Lock()

    def feed(self, data: bytes) -> None:
        with self._lock:
            self._buf += data
            self._tail += data
            del self._tail[: -self._tail_bytes]
            self._write_local(data)

    def note(self, text: str) -> None:
        """An agent line in the job's log (what it did, why it stopped)."""
        self.feed(f"{NOTE_PREFIX}{text}\n".encode())

    def note_local(self, text: str) -> None:
        """An agent line only in the local log (the store could not be written)."""
        with self._lock:
            self._write_local(f"{NOTE_PREFIX}{text}\n".encode())

    def _write_local(self, data: bytes) -> None:
        try:
            self._local.write(data)
            self._local.flush()
        except OSError:  # a full disk must not stop the job; the store copy is what matters
            pass

    def ship(self) -> bool:
        """Write the buffered output to the store; False (data kept) when that failed.

        A chunk whose write failed is retried unchanged under the same name before anything
        newer: when the failed write had landed (its reply was lost), the store finds the same
        bytes there and the retry succeeds, so no output is lost or written twice.
        """
        with self._ship_lock:
            while True:
                data = self._unshipped
                if data is None:
                    with self._lock:
                        data = bytes(self._buf[: self.MAX_CHUNK])
                        del self._buf[: len(data)]
                if not data:
                    return True
                try:
                    self.writer.write(data)
                except ConflictError:
                    # another object holds that name (not our bytes): ours go under the next one
                    self._unshipped = data
                    self.writer.seq += 1
                    continue
                except Exception as exc:
                    self._unshipped = data
                    log.warning("could not ship %d bytes of output (will retry): %s", len(data), one_line(exc))
                    return False
                self._unshipped = None

    def tail(self, lines: int = TAIL_LINES) -> str:
        with self._lock:
            text = self._tail.decode(errors="replace")
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])

    def close(self) -> None:
        self._local.close()


class Agent:
    """Runs the job at ``run_url`` with ``workdir`` as its scratch space.

    Layout of ``workdir``: ``runs/<run id>/`` (the code root when no code is synced, else its
    ``code/``), ``envs/<digest>/`` (cached isolated environments), ``logs/<run id>.log``.
    """

    def __init__(self, run_url: str, workdir: Path) -> None:
        self.run_url = run_url
        self.workdir = Path(workdir).resolve()
        self.jobs = JobStore(run_url)
        self.jobs.objects.retry = _TICK_RETRY
        self.spec: JobSpec | None = None
        self.state: JobState | None = None
        self.pump: LogPump | None = None
        self.timings: dict[str, float] = {}
        self._stop_request: tuple[JobPhase, str] | None = None
        self._stop_event = threading.Event()
        self._done = threading.Event()
        self._state_lock = threading.Lock()  # held across snapshot *and* write: writes land in order
        self._t0 = time.monotonic()
        self._spot: SpotWatcher | None = None
        self._notice: SpotNotice | None = None
        self._notice_deadline: float | None = None  # monotonic time the interruption happens
        self._save_pending = False  # a checkpoint was asked for and the job has not been signalled yet
        self._save_wait_noted = False
        self._key_error: str | None = None  # why the run's key could not be fetched, for the run's log
        self.attempt: Attempt | None = None  # a managed run's attempt this agent runs
        # a multi-node run (JobSpec.nodes > 1): this agent's node, its peers, why it stopped (see .nodes)
        self.node = 0
        self.instance_id: str | None = None  # this node's own instance
        self._peers: PeerWatch | None = None
        self._peer_failure: PeerFailure | None = None
        self._attempt_outcome: AttemptOutcome | None = None  # the lead's view of a managed attempt across nodes

    # ------------------------------------------------------------ entry point

    def _wait_for_spec(self) -> JobSpec:
        """The job spec. A provider that starts the agent at boot (AWS) may boot it before the
        launcher has written ``job.json``: wait for it, up to ``$TRAINCTL_AGENT_SPEC_WAIT_S`` (300 s)."""
        deadline = time.monotonic() + float(os.environ.get("TRAINCTL_AGENT_SPEC_WAIT_S", "300"))
        while True:
            try:
                return self.jobs.read_spec()
            except RunNotFoundError:
                if time.monotonic() > deadline or self._stop_event.is_set():
                    raise
                time.sleep(2.0)

    def run(self) -> int:
        """Run the job to its end; the job's exit code (1 when the agent itself failed)."""
        self._install_signal_handlers()
        try:
            spec = self._wait_for_spec()
            self._resolve_run_key(spec)
            spec = self._authenticated(spec)
            self.spec = spec
        except Exception as exc:
            return self._fail_without_spec(exc)
        self.instance_id = spec.instance_id
        if spec.nodes > 1:
            try:
                self._join_nodes(spec)
            except AgentFailure as exc:
                return self._fail_without_spec(exc, what=f"node {self.node} of this {spec.nodes}-node run cannot start")
        previous = self._earlier_state() if spec.recover is not None else None
        number = current_attempt(previous) if spec.recover is not None else None
        self.pump = LogPump(self.jobs.log_writer(attempt=number), self.workdir / "logs" / f"{spec.run_id}.log")
        if not os.environ.get(RUN_KEY_ENV):
            why = self._key_error or "the AWS shared instance profile, or an agent started by hand"
            self.pump.note(
                f"{JOB} is not authenticated: this agent has no run key ({why}); the run's remote calls will be refused"
            )
        now = utc_now()
        self.state = JobState(
            run_id=spec.run_id,
            phase=JobPhase.FETCHING,
            updated_at=now,
            instance_id=self.instance_id,
            host=socket.gethostname(),
            queued_at=spec.created_at,
            started_at=now,
            heartbeat_interval_s=spec.heartbeat_interval_s,
            node=self.node if spec.nodes > 1 else None,
        )
        if number is not None:
            self._begin_attempt(number, previous)
        if spec.nodes > 1:  # only states of this attempt count (a managed run's peers may still show the last one's end)
            self._peers = PeerWatch(self.jobs, self.node, spec.nodes, spec.heartbeat_interval_s, attempt=number)
        log.info("run %s: picked up from %s", spec.run_id, self.jobs.url)
        self._write_state()
        if spot_watch_enabled(spec.spot):
            self._spot = SpotWatcher(self._on_spot_notice).start()
            log.info("run %s: watching for spot interruption notices (%r)", spec.run_id, self._spot)
        supervisor = threading.Thread(target=self._supervise, name="agent-supervisor", daemon=True)
        supervisor.start()
        try:
            outcome = self._run_job()
        except AgentFailure as exc:
            outcome = Outcome(JobPhase.FAILED, None, one_line(exc))
        except Exception as exc:  # a bug of ours: still end the job in a terminal state
            log.exception("agent error")
            outcome = Outcome(JobPhase.FAILED, None, one_line(f"agent error: {type(exc).__name__}: {exc}"))
        finally:
            self._done.set()
            supervisor.join(timeout=30)
            if self._spot is not None:
                self._spot.stop()
        outcome = self._after_notice(outcome)
        if spec.nodes > 1:  # the run's end across nodes first: a managed run's restart is decided on it
            outcome = self._end_node(outcome)
        if self.attempt is not None:
            outcome = self._end_attempt(outcome)
        self._finish(outcome)
        # RECOVERING: a replacement takes over the run. Locally the supervisor starts it on this instance;
        # on AWS this instance powers off and the run's Auto Scaling group starts a new one. The instances
        # of a managed multi-node run are all released by the supervisor that starts every node's attempts.
        managed_nodes = spec.recover is not None and spec.nodes > 1
        self._release_instance(run_over=outcome.phase is not JobPhase.RECOVERING and not managed_nodes)
        self.pump.close()
        return outcome.exit_code if outcome.exit_code is not None else 1

    def request_stop(self, phase: JobPhase, reason: str) -> None:
        """Stop the job (SIGTERM, then SIGKILL after the grace period) and end in ``phase``.

        Safe from a signal handler: takes no lock. The first request wins.
        """
        if self._stop_request is None:
            self._stop_request = (phase, reason)
            self._stop_event.set()

    # ------------------------------------------------------------ phases

    def _run_job(self) -> Outcome:
        spec = self.spec
        assert spec is not None and self.pump is not None
        run_dir = self.workdir / "runs" / spec.run_id
        start = time.monotonic()
        if spec.code is not None:
            code_root = run_dir / "code"
            try:
                from trainctl_lightning.jobs.codesync import fetch_bundle

                stats = fetch_bundle(spec.code, code_root)
            except TrainctlError as exc:
                raise AgentFailure(f"could not fetch the code bundle: {one_line(exc)}") from exc
            log.info("code: %s files, %s bytes downloaded, %s reused", stats.files, stats.bytes_downloaded, stats.bytes_reused)
        else:
            code_root = run_dir
            code_root.mkdir(parents=True, exist_ok=True)
        self.timings["fetch"] = round(time.monotonic() - start, 3)
        if self._stop_request:
            return self._stopped(None)

        self._set_phase(JobPhase.SETTING_UP)
        start = time.monotonic()
        try:
            prepared = prepare_environment(spec, code_root, self.workdir, self.pump.feed, stop=self._stop_event.is_set)
        except SetupStopped:
            return self._stopped(None)
        except SetupError as exc:
            return Outcome(JobPhase.FAILED, None, one_line(exc))
        finally:
            self.timings["setup"] = round(time.monotonic() - start, 3)
        log.info("environment: %s", prepared.description)
        with self._state_lock:
            self._live_state().python = prepared.python
            self._live_state().env_mode = prepared.mode
        if self._stop_request:
            return self._stopped(None)
        return self._run_process(prepared.python, code_root)

    def _run_process(self, python: str, code_root: Path) -> Outcome:
        spec = self.spec
        assert spec is not None and self.pump is not None
        cwd = code_root / spec.workdir
        if not cwd.is_dir():
            return Outcome(
                JobPhase.FAILED, None, f"the job's working directory {spec.workdir!r} is not in the code at {code_root}"
            )
        argv = spec.command(python)
        if spec.script:
            script = code_root / spec.script
            if not script.is_file():
                return Outcome(JobPhase.FAILED, None, f"script {spec.script!r} is not in the code at {code_root}")
            argv[2] = os.path.relpath(script, cwd)
        if spec.nodes > 1:
            try:
                group_argv = self._torchrun_command(python, argv)
            except AgentFailure as exc:
                return Outcome(JobPhase.FAILED, None, one_line(exc))
            if group_argv is None:  # stopped while waiting for the lead
                return self._stopped(None)
            argv = group_argv
        env = {
            **os.environ,
            **spec.env,
            RUN_URL_ENV: spec.run_url,
            RUN_ID_ENV: spec.run_id,
            "PYTHONUNBUFFERED": "1",
        }
        if self.instance_id:
            env[INSTANCE_ID_ENV] = self.instance_id
        if spec.nodes > 1:
            env[NODE_ENV] = str(self.node)
        else:  # the provider may set it for every agent; a single-node job runs as it always did
            env.pop(NODE_ENV, None)
        if self.attempt is not None:  # a managed run: CheckpointSync resumes from the newest checkpoint
            env[RECOVER_ENV] = "1"
            env[ATTEMPT_ENV] = str(self.attempt.number)
        # The run's key comes only from the agent's own environment (out of band), never from job.json.
        env.pop(RUN_KEY_ENV, None)
        if os.environ.get(RUN_KEY_ENV):
            env[RUN_KEY_ENV] = os.environ[RUN_KEY_ENV]
        unset = [name for name in spec.forward_env if name not in os.environ]
        if unset:  # names only: values are never logged
            self.pump.note(f"forwarded variables not set for the agent: {', '.join(unset)}")
        try:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a stop reaches its children too
                preexec_fn=die_with_parent(),  # SIGTERM if the agent dies: never an unsupervised job
            )
        except OSError as exc:
            return Outcome(JobPhase.FAILED, None, one_line(f"could not start {argv[0]}: {exc}"))
        try:
            return self._supervise_process(proc, argv)
        finally:
            remove_job_record(self.workdir, spec.run_id)
            if spec.nodes > 1:
                shutil.rmtree(self._torchrun_log_dir(spec), ignore_errors=True)  # its workers have ended with it

    def _supervise_process(self, proc: subprocess.Popen, argv: list[str]) -> Outcome:
        spec = self.spec
        assert spec is not None
        job = JobProcess(
            run_id=spec.run_id,
            run_url=spec.run_url,
            pid=proc.pid,
            start_time=process_start_time(proc.pid),
            agent_pid=os.getpid(),
            stop_grace_s=spec.stop_grace_s,
        )
        try:  # so that `trainctl stop`/`terminate` can end the job's group if this agent dies
            write_job_record(self.workdir, job)
        except OSError as exc:
            log.warning("could not record the job's process group %d: %s", proc.pid, one_line(exc))
        start = time.monotonic()
        with self._state_lock:
            self._live_state().pid = proc.pid
            self._live_state().running_at = utc_now()
        self._set_phase(JobPhase.RUNNING)
        log.info("run %s: started pid %d: %s", spec.run_id, proc.pid, " ".join(argv[:4]))
        reader = threading.Thread(target=self._read_output, args=(proc,), name="job-output", daemon=True)
        reader.start()

        deadline = start + spec.max_runtime_s if spec.max_runtime_s else None
        stopped: tuple[JobPhase, str] | None = None
        while True:
            try:
                returncode = proc.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                pass
            if deadline is not None and self._stop_request is None and time.monotonic() >= deadline:
                self.request_stop(JobPhase.TIMED_OUT, f"stopped after the max runtime of {human_duration(spec.max_runtime_s)}")
            if self._save_pending:
                self._ask_job_to_save(proc)
            if self._stop_request is not None:
                stopped = self._stop_request
                log.info("run %s: stopping (%s)", spec.run_id, stopped[1])
                returncode = self._stop_process(proc, spec.stop_grace_s)
                break
        if spec.nodes > 1:  # workers a killed torchrun left (in sessions of their own): adopted, ended here
            if orphans := end_orphans(known=(proc.pid,)):
                log.warning("run %s: ended %d worker process(es) torchrun left: %s", spec.run_id, len(orphans), orphans)
        reader.join(timeout=2.0)
        if reader.is_alive():  # a process the job left behind holds the pipe: its group goes too
            _signal_group(proc.pid, signal.SIGKILL)
            reader.join(timeout=5.0)
        self.timings["run"] = round(time.monotonic() - start, 3)
        exit_code = returncode if returncode >= 0 else 128 - returncode
        if stopped is not None:
            return Outcome(stopped[0], exit_code, stopped[1])
        if returncode == 0:
            return Outcome(JobPhase.SUCCEEDED, 0)
        if spec.nodes > 1 and returncode > 0 and (cause := torchrun_root_cause(self.pump.tail(200) if self.pump else "")):
            return Outcome(JobPhase.FAILED, exit_code, f"the job exited with code {exit_code}; torchrun's first failure: {cause}")
        if returncode == -signal.SIGKILL:
            return Outcome(
                JobPhase.FAILED,
                exit_code,
                "the job was killed by SIGKILL, not by trainctl (the out-of-memory killer, or a kill -9): "
                "look for 'Killed process' in the kernel log (dmesg)",
            )
        if returncode < 0:
            return Outcome(JobPhase.FAILED, exit_code, f"the job was killed by {_signal_name(-returncode)}")
        return Outcome(JobPhase.FAILED, exit_code, f"the job exited with code {exit_code}")

    def _read_output(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None and self.pump is not None
        fd = proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            self.pump.feed(chunk)
        proc.stdout.close()

    @staticmethod
    def _stop_process(proc: subprocess.Popen, grace_s: float) -> int:
        """SIGTERM to the job's process group (Lightning saves and stops), SIGKILL after ``grace_s``."""
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning("the job did not stop within %s of SIGTERM; sending SIGKILL", human_duration(grace_s))
            _signal_group(proc.pid, signal.SIGKILL)
            return proc.wait()

    def _stopped(self, exit_code: int | None) -> Outcome:
        assert self._stop_request is not None
        return Outcome(self._stop_request[0], exit_code, self._stop_request[1])

    # ------------------------------------------------------------ multi-node runs (see .nodes)

    def _join_nodes(self, spec: JobSpec) -> None:
        """Find this agent's node; from here on its state and logs are the node's own.

        Raises:
            AgentFailure: the node cannot be told, or the run asks for what multi-node runs lack.
        """
        from trainctl_lightning.providers import get_provider

        provider = get_provider(spec.provider)
        self.node = resolve_node(spec, os.environ.get(NODE_ENV), provider.own_instance_id)
        self.jobs = self.jobs.for_node(self.node)
        if spec.node_instances:
            self.instance_id = spec.node_instances[self.node]
        elif self.node != 0:
            self.instance_id = None  # not told which instance is this node's: it is not released from here

    def _torchrun_command(self, python: str, argv: list[str]) -> list[str] | None:
        """The job under torchrun, once the nodes know where to meet; None if stopped meanwhile.

        Raises:
            AgentFailure: torch is missing, the lead cannot publish its address, or the record
                found is not the lead's (one line).
        """
        from trainctl_lightning.providers import get_provider

        spec = self.spec
        assert spec is not None and self.pump is not None
        provider = get_provider(spec.provider)
        nproc = spec.nproc_per_node or device_count(python)
        key = os.environ.get(RUN_KEY_ENV) or None
        address = provider.node_address()
        attempt = self.attempt.number if self.attempt is not None else None
        rdzv_id = rendezvous_id(spec, attempt)
        if self.node == 0:
            try:
                record = Rendezvous(
                    host=address,
                    port=free_port(address),
                    rdzv_id=rdzv_id,
                    attempt=attempt or 1,
                    nodes=spec.nodes,
                    written_at=utc_now(),
                )
                self.jobs.objects.retry = _FINAL_RETRY
                write_rendezvous(self.jobs, record, key, spec.run_id)
            except (OSError, TrainctlError) as exc:
                raise AgentFailure(f"node 0 could not publish where the nodes meet: {one_line(exc)}") from exc
            finally:
                self.jobs.objects.retry = _TICK_RETRY
        else:
            found = self._wait_for_rendezvous(key, rdzv_id, attempt or 1)
            if found is None:
                return None
            record = found
        self.pump.note(
            f"node {self.node} of {spec.nodes}: torchrun with {nproc} process(es), rendezvous {record.rdzv_id} at {record.endpoint}"
        )
        become_subreaper()
        return torchrun_argv(
            python,
            argv,
            nodes=spec.nodes,
            nproc_per_node=nproc,
            rendezvous=record,
            lead=self.node == 0,
            local_addr=address,
            log_dir=str(self._torchrun_log_dir(spec)),
        )

    def _torchrun_log_dir(self, spec: JobSpec) -> Path:
        """torchrun's own files for this run (removed when the job ends; see torchrun_argv)."""
        return self.workdir / "runs" / spec.run_id / "torchelastic"

    def _wait_for_rendezvous(self, key: str | None, rdzv_id: str, attempt: int) -> Rendezvous | None:
        """The lead's record for this attempt, waited for up to NODE_START_WAIT_S; None when this
        agent was asked to stop meanwhile (a cancel, or the lead ended: the peer watch says so).
        An earlier attempt's record (still there until the lead of this one replaces it) is never joined."""
        spec = self.spec
        assert spec is not None
        deadline = time.monotonic() + NODE_START_WAIT_S
        while not self._stop_event.is_set():
            try:
                record = read_rendezvous(self.jobs, key, spec.run_id)
            except (IntegrityError, AuthenticationError) as exc:
                raise AgentFailure(one_line(exc)) from exc
            except Exception as exc:  # the store is unreachable: ask again
                log.warning("could not read the rendezvous record (will retry): %s", one_line(exc))
                record = None
            if record is not None and (record.rdzv_id, record.attempt, record.nodes) == (rdzv_id, attempt, spec.nodes):
                return record
            if time.monotonic() > deadline:
                raise AgentFailure(f"node 0 did not publish where the nodes meet within {NODE_START_WAIT_S:.0f}s")
            self._stop_event.wait(0.2)
        return None

    def _end_node(self, outcome: Outcome) -> Outcome:
        """This node's end as it is recorded. The lead first waits (bounded) for the other nodes to
        end, then makes the run's outcome: which node failed first, and why."""
        spec, state = self.spec, self._live_state()
        assert spec is not None and self.pump is not None
        if outcome.phase is not JobPhase.SUCCEEDED:
            state.failed_node = self._peer_failure.node if self._peer_failure is not None else self.node
        if self.node != 0:
            return outcome
        ended_at = utc_now()
        with self._state_lock:  # the others see the lead's job has ended (phase unchanged until they have)
            state.exit_code, state.error = (outcome.exit_code if outcome.exit_code is not None else 1), outcome.error
            if outcome.phase is JobPhase.SUCCEEDED:
                state.exit_code, state.error = 0, None
        waited = self._wait_for_peers(peers_end_wait_s(spec))
        phase, code, error, failed = run_outcome(
            outcome.phase, outcome.error, outcome.exit_code, ended_at, self._peer_failure, waited, peers_end_wait_s(spec)
        )
        if self.attempt is not None:  # a managed run: a lost or preempted node makes the attempt lost or preempted
            self._attempt_outcome = attempt_outcome(
                phase, error, failed, outcome.phase, outcome.error, self._peer_failure, waited, peers_end_wait_s(spec)
            )
            if self._attempt_outcome.node is not None:
                failed, error = self._attempt_outcome.node, self._attempt_outcome.error
        state.failed_node = failed
        if failed is not None and failed != 0:
            self.pump.note(error or f"node {failed} failed")
        return Outcome(phase, code, error)

    def _wait_for_peers(self, wait_s: float) -> dict[int, JobState | None]:
        """Every other node's state once all have ended, or as they are after ``wait_s``; the lead's
        heartbeat goes on meanwhile."""
        spec = self.spec
        assert spec is not None
        deadline = time.monotonic() + wait_s
        states: dict[int, JobState | None] = {}
        next_beat = 0.0
        while True:
            for k in range(1, spec.nodes):
                if (seen := states.get(k)) is not None and seen.phase.is_terminal():
                    continue
                try:  # a managed run's peer that has not written this attempt yet has not ended it
                    states[k] = of_attempt(self.jobs.for_node(k).read_state(), self.attempt.number if self.attempt else None)
                except Exception as exc:  # damaged or unreachable: asked again until the deadline
                    log.warning("could not read node %d's state: %s", k, one_line(exc))
                    states.setdefault(k, None)
            if all(s is not None and s.phase.is_terminal() for s in states.values()) or time.monotonic() > deadline:
                return states
            if time.monotonic() >= next_beat:
                self._write_state()
                next_beat = time.monotonic() + spec.heartbeat_interval_s
            time.sleep(0.1)

    # ------------------------------------------------------------ managed runs

    def _begin_attempt(self, number: int, previous: JobState | None) -> None:
        """Carry the earlier attempts over from the run's state as the previous attempt left it
        (``previous``: None when there is none or it was damaged), record this one, mark the log."""
        spec, state = self.spec, self._live_state()
        assert spec is not None and self.pump is not None
        self.attempt = begin_attempt(state, previous, number, spec.instance_id, spec.run_url)
        self.pump.feed(f"{attempt_marker(self.attempt)}\n".encode())

    def _end_attempt(self, outcome: Outcome) -> Outcome:
        """Record how this attempt ended; RECOVERING when the run's policy wants a replacement."""
        spec, attempt = self.spec, self.attempt
        assert spec is not None and spec.recover is not None and attempt is not None and self.state is not None
        ended = end_of(outcome.phase)
        if self._attempt_outcome is not None:  # the lead of a multi-node run: the attempt's end across nodes
            ended = self._attempt_outcome.ended
        end_attempt(attempt, ended, outcome.error, spec.run_url)
        if spec.nodes > 1 and self.node != 0:  # the lead decides for the whole group; this node's own end stands
            return outcome
        restart = ended in (AttemptEnd.PREEMPTED, AttemptEnd.LOST) or (
            ended is AttemptEnd.FAILED and spec.recover.retry_user_errors
        )
        if not restart:
            return outcome
        try:
            cancelled = self.jobs.cancel_requested()
        except Exception as exc:  # the supervisor (or the next agent) looks again
            log.warning("could not check for a cancel request: %s", one_line(exc))
            cancelled = None
        if cancelled:  # cancelled while it was ending: nothing follows
            return Outcome(JobPhase.CANCELLED, outcome.exit_code, outcome.error)
        gave_up = spec.recover.gives_up(self.state.attempts, price_per_hour())
        if gave_up is not None:
            return Outcome(JobPhase.FAILED, outcome.exit_code, gave_up)
        return Outcome(JobPhase.RECOVERING, outcome.exit_code, f"attempt {attempt.number} {ended.value}: {outcome.error}")

    # ------------------------------------------------------------ spot interruptions

    def _on_spot_notice(self, notice: SpotNotice) -> None:
        """On the watcher's thread: record the notice, ask the job for a checkpoint."""
        assert self.pump is not None and self.state is not None
        if notice.kind == INTERRUPTION:
            left = notice.seconds_left()
            with self._state_lock:
                self._notice = notice
                self._notice_deadline = time.monotonic() + (left if left is not None else NOTICE_LEAD_S)
                self.state.interruption = notice.to_dict()
            when = f"{notice.time} (in {max(0.0, left):.0f}s)" if left is not None else "an unknown time"
            self.pump.note(
                f"spot interruption notice: {notice.action or 'interruption'} at {when}; asking the job to checkpoint now"
            )
            self._write_state()  # at once: if the agent dies with the instance, the state still says why
        else:
            self.pump.note(
                "spot rebalance recommendation: the instance is at elevated risk of interruption; asking the job to checkpoint now"
            )
        self._save_pending = True

    def _ask_job_to_save(self, proc: subprocess.Popen) -> None:
        """SIGUSR1 to the job's own process (not its group: other ranks would die of it), once it handles it.

        A multi-node job's process is torchrun, which does not handle SIGUSR1 (it would die of
        it): this node's workers, torchrun's children, get it instead. CheckpointSync's ranks vote
        on a request every batch, so a request that reaches any rank saves on every rank."""
        assert self.pump is not None and self.spec is not None
        targets = [proc.pid] if self.spec.nodes == 1 else children_of(proc.pid)
        ready = [pid for pid in targets if handles_signal(pid, SAVE_NOW_SIGNAL)]
        handled: bool | None = bool(ready) if targets else None
        if ready:
            self._save_pending = False
            sent = []
            for pid in ready:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, SAVE_NOW_SIGNAL)
                    sent.append(pid)
            if not sent:
                return
            who = (
                f"the job (pid {sent[0]})"
                if self.spec.nodes == 1
                else f"node {self.node}'s workers (pids {', '.join(map(str, sent))})"
            )
            self.pump.note(f"sent SIGUSR1 to {who}: CheckpointSync saves and publishes a checkpoint now")
        elif not self._save_wait_noted:
            self._save_wait_noted = True
            why = "cannot tell whether the job handles SIGUSR1" if handled is None else "the job does not handle SIGUSR1 yet"
            self.pump.note(f"{why} (CheckpointSync installs its handler when fit starts): it is signalled once it does")

    def _notice_reason(self) -> str:
        assert self._notice is not None
        return f"spot interruption notice at {self._notice.time or self._notice.seen_at}"

    def _after_notice(self, outcome: Outcome) -> Outcome:
        """After an interruption notice, a job that did not succeed was preempted, whatever ended it."""
        if self._notice is None or outcome.phase in (JobPhase.SUCCEEDED, JobPhase.PREEMPTED):
            return outcome
        reason = self._notice_reason()
        return Outcome(JobPhase.PREEMPTED, outcome.exit_code, f"{reason}; {outcome.error}" if outcome.error else reason)

    # ------------------------------------------------------------ reporting

    def _supervise(self) -> None:
        """Ship output, refresh the heartbeat and look for a cancel request until the job ends."""
        spec = self.spec
        assert spec is not None and self.pump is not None
        now = time.monotonic()
        next_ship, next_beat, next_cancel = now, now + spec.heartbeat_interval_s, now
        watchdog = LauncherWatchdog(self.jobs, spec.launcher_grace_s) if spec.launcher_grace_s else None
        next_watch = now + watchdog.interval_s if watchdog else float("inf")
        next_peers = now if self._peers is not None else float("inf")
        while not self._done.is_set():
            now = time.monotonic()
            if now >= next_ship:
                self.pump.ship()
                next_ship = now + spec.log_interval_s
            if now >= next_beat:
                self._write_state()
                next_beat = now + spec.heartbeat_interval_s
            if now >= next_cancel:
                next_cancel = now + CANCEL_POLL_S
                if self._stop_request is None:
                    try:
                        reason = self.jobs.cancel_requested()
                    except Exception as exc:
                        log.warning("could not check for a cancel request (will retry): %s", one_line(exc))
                    else:
                        if reason:
                            self.request_stop(JobPhase.CANCELLED, one_line(reason))
            if watchdog is not None and now >= next_watch:
                next_watch = now + watchdog.interval_s
                if self._stop_request is None and (gone := watchdog.check()):
                    self.pump.note(f"{gone}: cancelling the job")
                    self.request_stop(JobPhase.CANCELLED, gone)
            if self._notice_deadline is not None and self._stop_request is None and now >= self._notice_deadline:
                self.request_stop(JobPhase.PREEMPTED, self._notice_reason())
            if self._peers is not None and now >= next_peers:
                next_peers = now + self._peers.poll_s
                if self._stop_request is None and (failure := self._peers.check()):
                    self._peer_failure = failure
                    self.pump.note(f"{failure.reason}: stopping node {self.node}'s job")
                    self.request_stop(JobPhase.FAILED, failure.reason)
            wake = min(next_ship, next_beat, next_cancel, next_watch, next_peers)
            if self._notice_deadline is not None:
                wake = min(wake, max(self._notice_deadline, now + 0.1))
            self._done.wait(max(0.01, wake - time.monotonic()))

    def _live_state(self) -> JobState:
        """The job's state once the run has begun (it exists from then on)."""
        assert self.state is not None, "the job state is set when the run begins"
        return self.state

    def _set_phase(self, phase: JobPhase) -> None:
        with self._state_lock:
            self._live_state().phase = phase
        self._write_state()

    def _write_state(self) -> bool:
        with self._state_lock:
            state = self._live_state()
            state.touch()
            try:
                self.jobs.write_state(state)
                return True
            except Exception as exc:
                log.warning("could not write the job state (will retry): %s", one_line(exc))
                return False

    def _finish(self, outcome: Outcome) -> None:
        """Final log chunk first, then the terminal state: readers rely on that order."""
        assert self.state is not None and self.pump is not None
        self.jobs.objects.retry = _FINAL_RETRY
        tail = self.pump.tail() if outcome.phase is not JobPhase.SUCCEEDED else ""
        if outcome.error and outcome.phase is not JobPhase.SUCCEEDED:
            self.pump.note(f"{outcome.phase.value}: {outcome.error}")
        if not self.pump.ship():
            self.pump.note_local("the last output could not be written to the store")
            log.error("the job's last output could not be written to %s", self.jobs.url)
        self.timings["total"] = round(time.monotonic() - self._t0, 3)
        with self._state_lock:
            state = self.state
            state.phase = outcome.phase
            state.exit_code = outcome.exit_code
            state.error = outcome.error
            state.error_tail = tail
            state.ended_at = utc_now()
            state.timings = dict(self.timings)
        log.info(
            "run %s: %s (exit code %s)%s",
            state.run_id,
            state.phase.value,
            state.exit_code,
            f": {state.error}" if state.error else "",
        )
        if not self._write_state():
            msg = f"could not write the final job state ({state.phase.value}) to {self.jobs.url}"
            self.pump.note_local(msg)
            log.error(msg)

    def _fail_without_spec(self, exc: Exception, what: str | None = None) -> int:
        error = one_line(f"{what or f'could not read the job at {self.run_url}'}: {exc}")
        log.error(error)
        run_id = run_id_of(self.run_url)
        try:
            validate_run_id(run_id)
            now = utc_now()
            state = JobState(
                run_id=run_id,
                phase=JobPhase.FAILED,
                updated_at=now,
                host=socket.gethostname(),
                error=error,
                started_at=now,
                ended_at=now,
                node=self.node if self.spec is not None and self.spec.nodes > 1 else None,
            )
            self.jobs.write_state(state)
        except Exception as write_exc:
            log.error("could not record the failure either: %s", one_line(write_exc))
        return 1

    def _authenticated(self, spec: JobSpec) -> JobSpec:
        """With the run's key, the spec again, read only if ``job.sig`` proves the launcher wrote it:
        nothing else that can write the store may choose what this instance runs."""
        key = os.environ.get(RUN_KEY_ENV)
        if not key:
            return spec
        return self.jobs.read_signed_spec(run_id_of(self.run_url), key)

    def _resolve_run_key(self, spec: JobSpec) -> None:
        """Bring the run's key into this process's environment when the provider delivers it at boot
        (it is passed on to the job only; see ``runkey``). A run without one still runs; its remote
        calls are refused by the worker, and the reason is in the run's log."""
        if os.environ.get(RUN_KEY_ENV):
            return
        try:
            from trainctl_lightning.providers import get_provider

            key = get_provider(spec.provider).fetch_run_key()
        except Exception as exc:  # the run goes on unauthenticated; run() notes that in its log
            self._key_error = f"it could not be fetched: {one_line(exc)}"
            log.error("the run's key could not be fetched: %s", one_line(exc))
            return
        if key:
            os.environ[RUN_KEY_ENV] = key

    def _earlier_state(self) -> JobState | None:
        """The run's state as the previous attempt left it (None: none, or damaged, which is said)."""
        try:
            return self.jobs.read_state()
        except TrainctlError as exc:  # a damaged state must not stop the run: its history is lost, said so
            log.warning("could not read the earlier attempts (starting a new list): %s", one_line(exc))
            return None

    def _release_instance(self, run_over: bool = True) -> None:
        spec, instance_id = self.spec, self.instance_id
        if spec is None or not (spec.terminate_instance_after and instance_id):
            return
        try:
            from trainctl_lightning.providers import get_provider

            get_provider(spec.provider).release_from_agent(instance_id, run_over=run_over)
            log.info("released instance %s (%s provider)", instance_id, spec.provider)
        except Exception as exc:  # the job is over and recorded; a stuck instance is reported, not raised
            log.error("could not release instance %s: %s", instance_id, one_line(exc))

    def _install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: object) -> None:
            self.request_stop(JobPhase.CANCELLED, f"agent received {_signal_name(signum)}: the instance is stopping")

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)


def run_agent(run_url: str, workdir: Path) -> int:
    """Run the job at ``run_url``; returns the exit code the agent process should exit with."""
    return Agent(run_url, workdir).run()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
