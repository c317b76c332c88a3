"""Launching jobs: the Python API that ``trainctl launch/create/ls/status/logs/stop/terminate`` call.

A launch is a plan, then its execution; nothing is created until every check has passed:

1. :func:`plan_launch` takes a :class:`LaunchRequest` (what to run) and the :class:`Settings` in
   effect (``trainctl.toml`` / ``[tool.trainctl]``, profile, overrides: :func:`resolve_settings`),
   checks the script, the environment to forward, the store (reachable by the provider's
   instances) and the project (ignore rules, size limits), and returns a :class:`LaunchPlan`:
   the job spec, the provider's dry run of the instance (or the instance to reuse), the scanned
   code. Nothing is created or uploaded; ``trainctl launch --dry-run`` prints this plan.
2. :func:`execute_plan` creates the instance (or reuses the planned one), uploads the code
   (content-addressed: unchanged files are not uploaded again), writes ``job.json``, starts the
   agent and returns a :class:`Run`, optionally after following its logs until the job ends.

Any failure in step 2 terminates what this launch created. An instance that a launch created is
terminated when its job ends (by the agent itself, so ``detach=True`` is safe too) unless
``keep_alive=True``. :func:`launch` does both steps from keyword arguments.

Example::

    from trainctl_lightning import launch

    run = launch.launch("train.py", args=["--epochs", "3"])        # local provider, local store
    print(run.run_id, run.exit_code)

    inst = launch.create_instance(provider="local")
    run = launch.train(inst, "train.py", detach=True)
    for chunk in run.follow():
        print(chunk.decode(), end="")

    plan = launch.plan_launch(launch.LaunchRequest("train.py", detach=True), launch.resolve_settings(profile="gpu"))
    print(plan.describe())                                           # what would be created and run
    run = launch.execute_plan(plan)
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainctl_lightning.config import Settings, load_config
from trainctl_lightning.errors import (
    ConfigError,
    InstanceNotFoundError,
    JobError,
    RunFailedError,
    TrainctlError,
)
from trainctl_lightning.jobs.heartbeat import (
    DEFAULT_LAUNCHER_GRACE_S,
    LauncherHeartbeat,
)
from trainctl_lightning.jobs.spec import (
    EnvMode,
    JobPhase,
    JobSpec,
    JobState,
    RecoverPolicy,
    check_nodes,
    new_run_id,
    validate_run_id,
)
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.providers import get_provider
from trainctl_lightning.providers.api import (
    AgentLaunch,
    CreatePlan,
    Instance,
    InstanceSpec,
    Provider,
)
from trainctl_lightning.runkey import forget_key, load_key, new_key
from trainctl_lightning.store import ObjectStore, package_version
from trainctl_lightning.store.layout import TAG_RUN_ID, run_url_in, store_url_of
from trainctl_lightning.timeutil import utc_now

if TYPE_CHECKING:
    from trainctl_lightning.jobs.codesync import CodeBundle, UploadStats

__all__ = [
    "REQUEST_OPTIONS",
    "SETTINGS_OPTIONS",
    "LaunchPlan",
    "LaunchRequest",
    "OutputSink",
    "Run",
    "create_instance",
    "execute_plan",
    "failure_error",
    "get_run",
    "launch",
    "list_resources",
    "monitor",
    "plan_launch",
    "provider_for",
    "resolve_run_url",
    "resolve_settings",
    "split_launch_options",
    "stop",
    "store_url_for",
    "terminate",
    "train",
]

log = logging.getLogger(__name__)

OutputSink = Callable[[bytes], None]


# ----------------------------------------------------------------------------- settings
def resolve_settings(project_dir: str | Path | None = None, profile: str | None = None, **overrides: Any) -> Settings:
    """The settings in effect for a project: its config file, the profile, then ``overrides``.

    ``overrides`` are :class:`~trainctl_lightning.config.Settings` fields; ``None`` values (a flag
    not given) are skipped, tables (``env``, ``tags``, ``options``) merge key by key.

    Raises:
        ConfigError: a bad config file, profile or override.
    """
    return load_config(project_dir, profile=profile, overrides=overrides).settings


def provider_for(name: str | None = None, instance_id: str | None = None, region: str | None = None) -> Provider:
    """The provider by name, or guessed from an instance id (``local-...``, ``i-...``)."""
    if name is None and instance_id:
        if instance_id.startswith("local-"):
            name = "local"
        elif instance_id.startswith("i-"):
            name = "aws"
    if name is None:
        name = resolve_settings().provider
    options: dict[str, Any] = {}
    if name == "aws" and region:
        options["region"] = region
    return get_provider(name, **options)


def resolve_run_url(ref: str, store: str | None = None, profile: str | None = None) -> str:
    """A run's URL from a run id (looked up in the configured store) or a URL/path given as is."""
    if not ref:
        raise ConfigError("a run id or run URL is required")
    if "://" in ref or "/" in ref or ref.startswith(("~", ".")) or os.path.exists(ref):
        return ref  # a URL or a local path, used as it is
    validate_run_id(ref)
    store_url = store_url_for(store, profile)
    return run_url_in(store_url, ref)


def store_url_for(store: str | None = None, profile: str | None = None) -> str:
    """``store``, else the configured store URL (with ``profile``)."""
    return store or resolve_settings(profile=profile).store_url()


# ----------------------------------------------------------------------------- records
@dataclass(frozen=True)
class LaunchRequest:
    """What one launch runs, and how; where it runs (provider, store, instance) is :class:`Settings`.

    Checked on construction; a bad value raises :class:`ConfigError` naming it. The script's
    existence and the project's contents are checked by :func:`plan_launch`.

    Example::

        request = LaunchRequest("train.py", args=["--epochs", "3"], env=["WANDB_API_KEY"], detach=True)
    """

    script: str | None = None
    """Path of the script (relative to the current directory, or absolute); inside ``project_dir``
    when code is synced."""
    module: str | None = None
    """Run ``python -m module`` instead of a script (exactly one of the two)."""
    args: Sequence[str] = ()
    """The script's arguments."""
    run_id: str | None = None
    """The run's id (default: ``<script>-<time>-<hex>``); the run lives at ``<store>/<run_id>``."""
    project_dir: str | os.PathLike[str] | None = None
    """The directory synced to the instance (default: the current directory)."""
    sync_code: bool = True
    """Upload the project; False: the script or module must already be on the instance."""
    include: Sequence[str] = ()
    """Paths to sync even though the ignore rules leave them out."""
    env: dict[str, str | None] | Sequence[str] | None = None
    """Variables for the job, ``{"NAME": "value"}`` or ``["NAME=value", "NAME"]``, added to
    ``Settings.env``; a name without a value is forwarded from this environment and never stored."""
    forward_env: Sequence[str] = ()
    """More names to forward from this environment, added to ``Settings.forward_env``."""
    python: str | None = None
    """Interpreter for the job on the instance (local provider default: this one)."""
    instance: str | None = None
    """Reuse this instance instead of creating one (it is kept afterwards)."""
    keep_alive: bool = False
    """Keep an instance this launch created after the job ends."""
    detach: bool = False
    """:func:`execute_plan` returns once the job has started, instead of following it to the end.
    An attached launch refreshes a heartbeat in the store while it follows the job; when that
    stops for 10 minutes (the launcher was killed, lost its network), the agent cancels the job
    and ends an instance this launch created."""
    recover: bool | RecoverPolicy = False
    """A managed run: when its instance is reclaimed or lost, a replacement continues it from the
    newest published checkpoint (True: the default :class:`RecoverPolicy`; or a policy)."""
    max_restarts: int | None = None
    """With ``recover``: replacement attempts at most (default 3)."""
    follow: bool | None = None
    """The caller follows the job itself with :meth:`Run.wait` after a ``detach=True`` return (the
    CLI and RemoteStrategy do): the launcher heartbeat and its watchdog are set up as for an
    attached launch. None: ``not detach``."""
    nodes: int = 1
    """Instances to run across (``--nodes``): above 1, that many instances of the same type are
    created together (all or none) and the job runs on every one under ``torchrun``; the script
    uses ``Trainer(num_nodes=nodes, devices=nproc_per_node)`` (``docs/multi-node.md``)."""
    nproc_per_node: int | None = None
    """With ``nodes``: processes per node (``--nproc-per-node``, the Trainer's ``devices``); None:
    one per GPU of the instance, or 1 without a GPU."""

    def __post_init__(self) -> None:
        if (self.script is None) == (self.module is None):
            raise ConfigError("give a script to run (trainctl launch train.py) or a module (module=...), not both")
        if self.run_id is not None:
            validate_run_id(self.run_id)
        if self.project_dir is not None and not self.project_root().is_dir():
            raise ConfigError(f"project directory {str(self.project_root())!r} does not exist or is not a directory")
        _split_env(self.env)  # names checked now, split again when planning
        self.recover_policy()  # checked now, before anything is created
        check_nodes(self.nodes, self.nproc_per_node)
        if self.nodes > 1 and self.instance is not None:
            raise ConfigError(
                f"nodes={self.nodes} creates its instances together (one placement, one rendezvous): "
                f"omit instance={self.instance!r} (--instance), or run on one node"
            )
        if self.nodes == 1 and self.nproc_per_node is not None:
            raise ConfigError(
                f"nproc_per_node={self.nproc_per_node} needs nodes > 1 (--nodes N): a one-node job starts its own "
                "processes (Trainer(devices=...))"
            )
        # normalized copies, so a caller's list changed later does not change the request
        object.__setattr__(self, "args", tuple(str(a) for a in self.args))
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "forward_env", tuple(self.forward_env))

    @property
    def attached(self) -> bool:
        """The launcher follows the job (heartbeat and watchdog on)."""
        return (not self.detach) if self.follow is None else self.follow

    def project_root(self) -> Path:
        """``project_dir`` as an absolute path (the current directory when not given)."""
        return Path(self.project_dir).expanduser().resolve() if self.project_dir is not None else Path.cwd()

    def recover_policy(self) -> RecoverPolicy | None:
        """The managed run's policy, or None for a run that is not restarted.

        Raises:
            ConfigError: ``max_restarts`` without ``recover``, or a limit that is not allowed.
        """
        if not isinstance(self.recover, (bool, RecoverPolicy)):
            raise ConfigError(f"recover = {self.recover!r} must be true, false or a RecoverPolicy")
        if not self.recover:
            if self.max_restarts is not None:
                raise ConfigError(f"max_restarts = {self.max_restarts!r} needs recover=True (--recover)")
            return None
        policy = self.recover if isinstance(self.recover, RecoverPolicy) else RecoverPolicy()
        if self.max_restarts is not None:
            policy = replace(policy, max_restarts=self.max_restarts)
        return policy

    def stem(self) -> str:
        """The first part of a generated run id: the script's or module's name."""
        return Path(self.script).stem if self.script else str(self.module).rsplit(".", 1)[-1]


@dataclass(frozen=True)
class LaunchPlan:
    """A launch checked and resolved, with nothing created or uploaded: what :func:`execute_plan`
    carries out, and what ``trainctl launch --dry-run`` prints (:meth:`describe`, :meth:`to_dict`)."""

    request: LaunchRequest
    settings: Settings
    """The settings in effect: config file, profile, then overrides."""
    provider: Provider = field(repr=False, compare=False)
    store_url: str
    job: JobSpec
    """The job as it will be written; executing fills in its code reference, instance and spot flag."""
    instance: CreatePlan | Instance
    """What the provider would create, or the running instance to reuse."""
    code: CodeBundle | None = None
    """The scanned project, within its size limits (None without code sync); uploaded on execution."""

    @property
    def run_id(self) -> str:
        return self.job.run_id

    @property
    def run_url(self) -> str:
        return self.job.run_url

    @property
    def command(self) -> list[str]:
        """The job's command line (with ``python`` for the instance's interpreter)."""
        return self.job.command("python")

    @property
    def forward_env(self) -> list[str]:
        """Names of the variables passed from this environment to the job (values are read when executing)."""
        return list(self.job.forward_env)

    @property
    def creates_instance(self) -> bool:
        return isinstance(self.instance, CreatePlan)

    @property
    def code_files(self) -> int:
        return len(self.code.files) if self.code else 0

    @property
    def code_bytes(self) -> int:
        return self.code.total_bytes if self.code else 0

    def describe(self) -> str:
        what = self.instance.describe() if isinstance(self.instance, CreatePlan) else f"reuse instance {self.instance.id}"
        return "\n".join(
            [
                f"run {self.run_id} -> {self.run_url}",
                f"command: {' '.join(self.command)}",
                f"code: {self.code_files} files, {self.code_bytes} bytes (before de-duplication)",
                *(
                    [f"code: skipped as secrets: {', '.join(self.code.skipped_secrets)}"]
                    if self.code and self.code.skipped_secrets
                    else []
                ),
                what,
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": True,
            "run_id": self.run_id,
            "run_url": self.run_url,
            "command": self.command,
            "code_files": self.code_files,
            "code_bytes": self.code_bytes,
            "code_skipped_secrets": list(self.code.skipped_secrets) if self.code else [],
            "instance": self.instance.to_dict(),
        }


@dataclass
class Run:
    """A launched job: where it is, and how to follow, wait for or cancel it."""

    run_id: str
    run_url: str
    store_url: str
    provider: str
    instance_id: str | None
    """The instance the job runs on (a multi-node run's node 0)."""
    node_instances: list[str] = field(default_factory=list)
    """A multi-node run: every node's instance, by node index (empty for one node)."""
    created_instance: bool = False
    """This launch created the instance(s) (terminated when the job ends unless keep_alive)."""
    keep_alive: bool = False
    code: UploadStats | None = None
    """What code sync uploaded for this launch (None without code sync)."""
    heartbeat: bool = False
    """:meth:`wait` refreshes the launcher heartbeat (an attached launch: its agent cancels the job
    once the heartbeat is gone for ``JobSpec.launcher_grace_s``)."""
    _job: JobStore | None = field(default=None, repr=False)

    @property
    def job(self) -> JobStore:
        if self._job is None:
            self._job = JobStore(self.run_url)
        return self._job

    def spec(self) -> JobSpec:
        return self.job.read_spec()

    def state(self) -> JobState | None:
        """The job's latest state (None until the launcher or agent wrote one)."""
        return self.job.read_state()

    @property
    def exit_code(self) -> int | None:
        state = self.state()
        return None if state is None else state.exit_code

    @property
    def nodes(self) -> int:
        """Instances the job runs across (1 unless launched with ``nodes``)."""
        return max(1, len(self.node_instances))

    def logs(self, node: int | None = None) -> str:
        """Everything the job printed so far; a multi-node run's lines are prefixed ``[node K] ``,
        or only node ``node``'s are given."""
        self._check_node(node)
        if self.nodes == 1:
            return self.job.read_logs().decode(errors="replace")
        return self.job.read_node_logs(self.nodes, node).decode(errors="replace")

    def follow(self, poll_s: float = 0.5, node: int | None = None) -> Iterator[bytes]:
        """Output chunks as they arrive, until the job ends (every node's, or node ``node``'s)."""
        self._check_node(node)
        return self.job.follow_logs(poll_s=poll_s, nodes=self.nodes, node=node)

    def node_states(self) -> list[JobState | None]:
        """Each node's latest state, by node index (node 0's is the run's); one entry for one node."""
        return [self.job.for_node(k).read_state() for k in range(self.nodes)]

    def _check_node(self, node: int | None) -> None:
        if node is not None and not (isinstance(node, int) and 0 <= node < self.nodes):
            raise ConfigError(f"run {self.run_id} has no node {node!r}: it runs on {self.nodes} node(s), 0 to {self.nodes - 1}")

    def wait(self, timeout: float | None = None, on_output: OutputSink | None = None, poll_s: float = 0.5) -> JobState:
        """Wait for the job to end, passing its output to ``on_output`` as it arrives.

        Returns the terminal (or lost) state. Raises:
            JobError: ``timeout`` seconds passed first (the job keeps running).
        """
        deadline = None if timeout is None else time.monotonic() + timeout

        def expired() -> bool:
            return deadline is not None and time.monotonic() > deadline

        with LauncherHeartbeat(self.job) if self.heartbeat else nullcontext():
            for chunk in self.job.follow_logs(poll_s=poll_s, stop=expired, nodes=self.nodes):
                if on_output is not None:
                    on_output(chunk)
        state = self.state()
        if state is None or not (state.phase.is_terminal() or state.lost):
            raise JobError(
                f"run {self.run_id} did not end within {timeout:.0f}s; it is still running (`trainctl logs {self.run_id} -f`)"
            )
        self._release_instance()
        return state

    def result(self, timeout: float | None = None, on_output: OutputSink | None = None) -> JobState:
        """Like :meth:`wait`, but raise :class:`RunFailedError` unless the job succeeded."""
        state = self.wait(timeout=timeout, on_output=on_output)
        if state.phase is not JobPhase.SUCCEEDED:
            raise failure_error(self.run_id, state)
        return state

    def cancel(self, reason: str = "cancelled by the user", wait_s: float = 0.0) -> JobState | None:
        """Ask the agent to stop the job (SIGTERM to the script, so Lightning can save and stop).

        With ``wait_s``, wait that long for the job to end; the instance this launch created is
        then terminated (unless keep_alive).
        """
        self.job.request_cancel(reason)
        if wait_s <= 0:
            return self.state()
        deadline = time.monotonic() + wait_s
        state = self.state()
        while time.monotonic() < deadline:
            state = self.state()
            if state is not None and (state.phase.is_terminal() or state.lost):
                break
            time.sleep(0.3)
        self._release_instance(force=True)
        return state

    def _release_instance(self, force: bool = False) -> None:
        # The agent terminates an instance its launch created once the job ends; doing it here
        # as well (idempotent) means an attached launch never returns with the instance alive.
        if not (self.created_instance and not self.keep_alive and self.instance_id):
            return
        prov = provider_for(self.provider)
        for instance_id in self.node_instances or [self.instance_id]:
            try:
                prov.terminate(instance_id)
            except InstanceNotFoundError:
                pass
            except TrainctlError as exc:
                if force:
                    raise
                log.warning("trainctl: could not terminate %s: %s; run `trainctl terminate %s`", instance_id, exc, instance_id)

    def to_dict(self) -> dict[str, Any]:
        state = self.state()
        return {
            "run_id": self.run_id,
            "run_url": self.run_url,
            "store_url": self.store_url,
            "provider": self.provider,
            "instance_id": self.instance_id,
            "nodes": self.nodes,
            "node_instances": self.node_instances,
            "created_instance": self.created_instance,
            "state": state.state() if state else "unknown",
            "exit_code": state.exit_code if state else None,
            "code_bytes_uploaded": self.code.bytes_uploaded if self.code else 0,
            "code_files_uploaded": self.code.files_uploaded if self.code else 0,
            "code_bytes_total": self.code.bytes_total if self.code else 0,
        }


def failure_error(run_id: str, state: JobState) -> RunFailedError:
    why = state.error or (f"exit code {state.exit_code}" if state.exit_code is not None else state.state())
    tail = state.error_tail.strip().splitlines()
    last = f": {tail[-1].strip()}" if tail else ""
    return RunFailedError(
        f"run {run_id} {state.state()} ({why}){last}; `trainctl logs {run_id}` shows its output",
        exit_code=state.exit_code,
        error_tail=state.error_tail,
        run_id=run_id,
    )


# ----------------------------------------------------------------------------- the API
def get_run(ref: str, store: str | None = None, profile: str | None = None) -> Run:
    """The run with this id (in the configured store) or URL.

    Raises:
        RunNotFoundError: there is no job there.
    """
    url = resolve_run_url(ref, store=store, profile=profile)
    job = JobStore(url)
    spec = job.read_spec()
    store_url = store_url_of(url)
    return Run(
        run_id=spec.run_id,
        run_url=job.url,
        store_url=store_url,
        provider=spec.provider,
        instance_id=spec.instance_id,
        node_instances=list(spec.node_instances),
        created_instance=False,
        _job=job,
    )


def create_instance(
    provider: str | None = None,
    *,
    instance_type: str | None = None,
    spot: bool | None = None,
    region: str | None = None,
    image: str | None = None,
    disk_gb: int | None = None,
    max_hours: float | None = None,
    tags: dict[str, str] | None = None,
    name: str | None = None,
    profile: str | None = None,
    dry_run: bool = False,
) -> Instance | CreatePlan:
    """Create an instance to run jobs on (``dry_run``: say what would be created, create nothing)."""
    settings = resolve_settings(
        None,
        profile,
        provider=provider,
        instance_type=instance_type,
        spot=spot,
        region=region,
        image=image,
        disk_gb=disk_gb,
        max_hours=max_hours,
    )
    prov = provider_for(settings.provider, region=settings.region)
    spec = _instance_spec(settings, tags=tags, name=name)
    plan = prov.create_dryrun(spec)
    if dry_run:
        return plan
    return prov.create(spec)


def list_resources(provider: str | None = None, include_terminated: bool = False, profile: str | None = None) -> list[Instance]:
    """Instances trainctl created with this provider (default: the configured one), newest first."""
    settings = resolve_settings(profile=profile, provider=provider)
    return provider_for(settings.provider, region=settings.region).list(include_terminated=include_terminated)


def stop(instance_id: str, provider: str | None = None) -> Instance:
    """Stop an instance (its jobs get SIGTERM first). Raises InstanceNotFoundError."""
    return provider_for(provider, instance_id).stop(instance_id)


def terminate(instance_id: str, provider: str | None = None) -> Instance:
    """Terminate an instance and everything on it; idempotent."""
    return provider_for(provider, instance_id).terminate(instance_id)


def monitor(run: Run | str, on_output: OutputSink | None = None, timeout: float | None = None) -> JobState:
    """Follow a run's output (to stdout by default) until it ends; returns its final state."""
    if isinstance(run, str):
        run = get_run(run)
    sink = on_output or _stdout_sink
    return run.wait(timeout=timeout, on_output=sink)


def train(
    instance: Instance | str | None,
    script: str,
    args: Sequence[str] = (),
    *,
    sync_code: bool = True,
    detach: bool = False,
    profile: str | None = None,
    on_output: OutputSink | None = None,
    on_event: Callable[[str], None] | None = None,
    **options: Any,
) -> Run:
    """Run ``script`` on ``instance`` (an Instance, an id, or None to create one), as the original
    trainctl sketch had it. Waits and streams output unless ``detach``; ``options`` as for :func:`launch`."""
    inst_id = instance.id if isinstance(instance, Instance) else instance
    if isinstance(instance, Instance):
        options.setdefault("provider", instance.provider)
    plan = _plan_from_options(script, profile, dict(options, args=args, instance=inst_id, sync_code=sync_code, detach=detach))
    return execute_plan(plan, on_output=on_output, on_event=on_event)


def _stdout_sink(chunk: bytes) -> None:
    sys.stdout.buffer.write(chunk)
    sys.stdout.flush()


def _instance_spec(
    settings: Settings,
    tags: dict[str, str] | None = None,
    name: str | None = None,
    run_url: str | None = None,
    store_url: str | None = None,
) -> InstanceSpec:
    return InstanceSpec(
        instance_type=settings.instance_type,
        spot=bool(settings.spot),
        image=settings.image,
        disk_gb=settings.disk_gb,
        region=settings.region,
        max_runtime_s=settings.max_hours * 3600 if settings.max_hours else None,
        tags={**settings.tags, **(tags or {})},
        name=name,
        run_url=run_url,
        store_url=store_url,
        options=dict(settings.options),
    )


def _forwarded_env(names: Sequence[str]) -> dict[str, str]:
    missing = [n for n in names if n not in os.environ]
    if missing:
        raise ConfigError(
            f"cannot forward {', '.join(missing)}: not set in this environment (export it, or drop it from forward_env)"
        )
    return {n: os.environ[n] for n in names}


def _split_env(env: dict[str, str | None] | Sequence[str] | None) -> tuple[dict[str, str], list[str]]:
    """``{"A": "1", "B": None}`` or ``["A=1", "B"]`` -> stored values, names to forward."""
    stored: dict[str, str] = {}
    forward: list[str] = []
    items: list[tuple[str, str | None]]
    if env is None:
        items = []
    elif isinstance(env, dict):
        items = list(env.items())
    else:
        items = [(e.split("=", 1)[0], e.split("=", 1)[1]) if "=" in e else (e, None) for e in env]
    for name, value in items:
        if not name or not name.replace("_", "a").isalnum():
            raise ConfigError(f"environment variable name {name!r} is not valid (use NAME=VALUE, or NAME to forward it)")
        if value is None:
            forward.append(name)
        else:
            stored[name] = value
    return stored, forward


#: :func:`launch` keyword arguments that are :class:`LaunchRequest` fields.
REQUEST_OPTIONS: frozenset[str] = frozenset(f.name for f in fields(LaunchRequest))
#: :func:`launch` keyword arguments that override :class:`Settings` fields (``env`` and
#: ``forward_env`` are the request's: they add to the settings' instead of replacing them).
SETTINGS_OPTIONS: frozenset[str] = frozenset(f.name for f in fields(Settings)) - REQUEST_OPTIONS


def split_launch_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`launch` keyword arguments -> (:class:`LaunchRequest` fields, :class:`Settings` overrides).

    Raises:
        ConfigError: a name that is neither, with the closest known one.
    """
    request: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    for name, value in options.items():
        if name in REQUEST_OPTIONS:
            request[name] = value
        elif name in SETTINGS_OPTIONS:
            overrides[name] = value
        else:
            known = sorted(REQUEST_OPTIONS | SETTINGS_OPTIONS)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"options are: {', '.join(known)}"
            raise ConfigError(f"unknown launch option {name!r}; {hint}")
    return request, overrides


def plan_launch(request: LaunchRequest, settings: Settings | None = None) -> LaunchPlan:
    """Check and resolve a launch, creating and uploading nothing: the dry run of :func:`execute_plan`.

    Checks the script, the environment to forward, the store (reachable by the provider's
    instances), the instance to reuse or the one to create (the provider's dry run), and the
    project (ignore rules, size limits; the files are scanned, not uploaded).

    Args:
        request: what to run.
        settings: where and how; default: :func:`resolve_settings` for the request's project.

    Raises:
        ConfigError: bad arguments or settings.
        StoreError: the store cannot be reached.

    Example::

        plan = plan_launch(LaunchRequest("train.py"), resolve_settings(provider="local"))
        print(plan.describe())
        run = execute_plan(plan)
    """
    root = request.project_root()  # a directory: checked by the request
    if settings is None:
        settings = resolve_settings(root)
    stored_env, forward_names = _split_env(request.env)

    # ---- what to run
    rel_script: str | None = None
    if request.script is not None:
        path = Path(request.script).expanduser()
        path = path if path.is_absolute() else (Path.cwd() / path)
        path = path.resolve()
        if not path.is_file():
            raise ConfigError(f"script {request.script!r} not found (looked at {path})")
        if request.sync_code:
            try:
                rel_script = path.relative_to(root).as_posix()
            except ValueError:
                raise ConfigError(
                    f"script {str(path)!r} is outside the project directory {str(root)!r} that is synced; "
                    "run from the project directory or pass --project-dir"
                ) from None
        else:
            rel_script = str(path)
    forward_all = list(dict.fromkeys([*settings.forward_env, *request.forward_env, *forward_names]))
    forwarded = _forwarded_env(forward_all)  # all set here; the values are read again when executing

    # ---- where
    prov = provider_for(settings.provider, region=settings.region)
    store_url = settings.store_url()
    prov.check_store(store_url)
    if forwarded and not prov.forwards_env:
        raise ConfigError(
            f"the {prov.name} provider cannot forward {', '.join(forwarded)} without storing it: "
            "give the instance a role or secret store instead, and drop these from forward_env / --env"
        )
    run_id = request.run_id or new_run_id(request.stem())
    run_url = run_url_in(store_url, run_id)

    recover = request.recover_policy()
    instance: CreatePlan | Instance
    if request.instance is not None:
        if recover is not None and prov.replaces_instances:
            raise ConfigError(
                f"--recover on {prov.name} makes the instances itself (the cloud replaces a lost one): "
                f"omit --instance {request.instance}, or drop --recover"
            )
        instance = prov.describe(request.instance)
        if not instance.state.is_usable():
            raise ConfigError(
                f"instance {request.instance} is {instance.state.value}; start a new one (omit --instance) or pick a running one"
            )
    else:
        spec = _instance_spec(settings, tags={TAG_RUN_ID: run_id}, run_url=run_url, store_url=store_url)
        if request.nodes > 1:
            spec = replace(spec, nodes=request.nodes)
        if recover is not None and prov.replaces_instances:
            # The cloud's replacement machinery (aws: an Auto Scaling group) is built with the instance.
            recover_option = {"max_restarts": recover.max_restarts, "max_hours": recover.max_hours}
            spec = replace(spec, options={**spec.options, "recover": {**recover_option, **spec.options.get("recover", {})}})
        instance = prov.create_dryrun(spec)

    # ---- code (scanned, and limits enforced, before anything is created)
    bundle: CodeBundle | None = None
    if request.sync_code:
        from trainctl_lightning.jobs.codesync import scan_project

        bundle = scan_project(
            root, max_total_mb=settings.code_max_mb, max_file_mb=settings.code_max_mb / 2, include=request.include
        )

    job = JobSpec(  # validated here (env names, runtime), before anything is created
        run_id=run_id,
        run_url=run_url,
        created_at=utc_now(),
        script=rel_script,
        module=request.module,
        args=list(request.args),
        env={**settings.env, **stored_env},
        forward_env=forward_all,
        setup=list(settings.setup),
        env_mode=EnvMode(settings.env_mode),
        python=request.python or (sys.executable if prov.name == "local" else None),
        max_runtime_s=settings.max_hours * 3600 if settings.max_hours else None,
        provider=prov.name,
        instance_id=instance.id if isinstance(instance, Instance) else None,
        terminate_instance_after=isinstance(instance, CreatePlan) and not request.keep_alive,
        launcher_grace_s=DEFAULT_LAUNCHER_GRACE_S if request.attached else None,
        recover=recover,
        nodes=request.nodes,
        nproc_per_node=request.nproc_per_node,
        trainctl_version=package_version(),
    )
    return LaunchPlan(
        request=request, settings=settings, provider=prov, store_url=store_url, job=job, instance=instance, code=bundle
    )


def execute_plan(plan: LaunchPlan, *, on_output: OutputSink | None = None, on_event: Callable[[str], None] | None = None) -> Run:
    """Carry out a plan: create the instance (or reuse the planned one), upload the code, write
    ``job.json`` and start the agent; then follow the job to its end unless ``request.detach``.

    Anything that fails after the instance was created terminates it (when that fails too, the
    error log says what to terminate by hand).

    Args:
        plan: from :func:`plan_launch`.
        on_output: receives the job's output as it arrives (attached launches; default: stdout).
        on_event: receives one-line progress messages ("created local instance ...").

    Raises:
        ConfigError: a forwarded variable is no longer set, or the run already exists (nothing was created).
        StoreError: the store cannot be written (nothing was created).
        KeyboardInterrupt: while following; the run was cancelled first.
        RunFailedError: never; an attached launch returns the Run, check ``run.exit_code``
            (or use :meth:`Run.result`).
    """
    event = on_event or (lambda msg: log.info("trainctl: %s", msg))
    started = time.monotonic()
    prov, request, store_url = plan.provider, plan.request, plan.store_url
    run_id, run_url = plan.run_id, plan.run_url
    forwarded = _forwarded_env(plan.forward_env)  # read now: the plan holds names, never values
    ObjectStore(store_url).check_writable()
    job = JobStore(run_url)
    if job.exists():
        raise ConfigError(f"run {run_id} already exists in {store_url}; choose another run id")

    # The run's signing key: handed to the agent out of band, never in the store. A remote call saved
    # one already (it signs its payload before launching, reads the result with it, then forgets it);
    # a plain job needs no key here afterwards, so a fresh one is not kept on this machine.
    run_key = load_key(run_id) or new_key()

    # ---- create, upload, start (anything that fails from here terminates what was created)
    created: list[Instance] = []
    try:
        if isinstance(plan.instance, CreatePlan):
            create_spec = plan.instance.spec
            if prov.installs_trainctl and "install" not in create_spec.options:
                from trainctl_lightning.jobs.dist import ship_trainctl

                wheel = ship_trainctl(store_url)  # None for a released version: the instance gets it from PyPI
                if wheel:
                    event(f"the instance installs trainctl from {wheel.url} (sha256 {wheel.sha256[:16]}...)")
                    options = {**create_spec.options, "install": wheel.url, "install_sha256": wheel.sha256}
                    create_spec = replace(create_spec, options=options)
            if create_spec.nodes > 1:  # all or none: the provider terminates what it made if one fails
                created = prov.create_nodes(create_spec)
                event(f"created {len(created)} {prov.name} instances: " + ", ".join(i.id for i in created))
            else:
                created = [prov.create(create_spec)]
                event(f"created {prov.name} instance {created[0].id}")
            inst = created[0]
        else:
            inst = plan.instance
        upload: UploadStats | None = None
        code_ref = None
        if plan.code is not None:
            from trainctl_lightning.jobs.codesync import upload_bundle

            code_ref, upload = upload_bundle(plan.code, store_url, run_url)
            event(upload.describe())
        # spot: the agent watches for interruption notices (what the instance says, else what we asked for)
        spot = inst.spot or bool(created and isinstance(plan.instance, CreatePlan) and plan.instance.spec.spot)
        nodes = created if len(created) > 1 else [inst]
        job_spec = replace(
            plan.job,
            created_at=utc_now(),
            code=code_ref,
            instance_id=inst.id,
            spot=spot,
            node_instances=[i.id for i in nodes] if len(nodes) > 1 else [],
        )
        job.write_spec(job_spec, run_key)
        job.write_state(
            JobState(
                run_id=run_id,
                phase=JobPhase.QUEUED,
                updated_at=utc_now(),
                instance_id=inst.id,
                queued_at=job_spec.created_at,
                node=0 if len(nodes) > 1 else None,
            )
        )
        for node, node_inst in enumerate(nodes):
            launch_ = AgentLaunch(run_id=run_id, run_url=run_url, forward_env=forwarded, run_key=run_key, node=node)
            prov.start_agent(node_inst, launch_)
        where = inst.id if len(nodes) == 1 else f"{len(nodes)} nodes ({', '.join(i.id for i in nodes)})"
        event(f"started run {run_id} on {where} ({time.monotonic() - started:.1f}s); store: {run_url}")
    except BaseException:
        forget_key(run_id)  # no agent got it (a remote call's saved key included)
        if created:
            # the original error matters more: what cannot be terminated is logged with the command to do it
            prov._terminate_all([i.id for i in created])
            event("terminated " + ", ".join(i.id for i in created) + " after the failed launch")
        raise

    run = Run(
        run_id=run_id,
        run_url=job.url,
        store_url=store_url,
        provider=prov.name,
        instance_id=inst.id,
        node_instances=list(job_spec.node_instances),
        created_instance=bool(created),
        keep_alive=request.keep_alive,
        code=upload,
        heartbeat=request.attached,
        _job=job,
    )
    if request.detach:
        return run
    try:
        run.wait(on_output=on_output or _stdout_sink)
    except KeyboardInterrupt:
        event(f"interrupted: cancelling run {run_id}")
        run.cancel("cancelled by the user (Ctrl-C)", wait_s=job_spec.stop_grace_s + 10)
        raise
    return run


def launch(
    script: str | None = None,
    *,
    profile: str | None = None,
    dry_run: bool = False,
    on_output: OutputSink | None = None,
    on_event: Callable[[str], None] | None = None,
    **options: Any,
) -> Run | LaunchPlan:
    """Run ``script`` (or ``module=...``) through the agent on an instance; see the module docs.

    The short form of ``execute_plan(plan_launch(LaunchRequest(...), resolve_settings(...)))``.

    Args:
        script: path of the script, inside ``project_dir`` when code is synced.
        profile: the config profile (``trainctl.toml`` / ``[tool.trainctl]``).
        dry_run: return the :class:`LaunchPlan` (what would happen); create and upload nothing.
        on_output: receives the job's output as it arrives (attached launches; default: stdout).
        on_event: receives one-line progress messages ("created instance ...").
        \\**options: :class:`LaunchRequest` fields (``module``, ``args``, ``run_id``, ``project_dir``,
            ``env``, ``instance``, ``keep_alive``, ``detach``, ...) and :class:`Settings` fields that
            override the config (``provider``, ``store``, ``instance_type``, ``spot``, ``region``,
            ``image``, ``disk_gb``, ``max_hours``, ``setup``, ``env_mode``, ``code_max_mb``, ``tags``, ``options``).

    Raises:
        ConfigError: bad arguments or settings, an unknown option (nothing was created).
        StoreError: the store cannot be written (nothing was created).
        RunFailedError: never; an attached launch returns the Run, check ``run.exit_code``
            (or use :meth:`Run.result`).

    Example::

        run = launch("train.py", args=["--epochs", "3"], provider="aws", instance_type="g5.xlarge", detach=True)
    """
    plan = _plan_from_options(script, profile, options)
    if dry_run:
        return plan
    return execute_plan(plan, on_output=on_output, on_event=on_event)


def _plan_from_options(script: str | None, profile: str | None, options: Mapping[str, Any]) -> LaunchPlan:
    request_options, overrides = split_launch_options(options)
    request = LaunchRequest(script=script, **request_options)
    return plan_launch(request, resolve_settings(request.project_root(), profile, **overrides))
