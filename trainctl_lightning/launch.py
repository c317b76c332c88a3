"""Launching jobs: the Python API that ``trainctl launch/create/ls/status/logs/stop/terminate`` call.

A launch, in order, and nothing is created until every check has passed:

1. resolve settings (``trainctl.toml`` / ``[tool.trainctl]``, profile, arguments);
2. check the script, the environment to forward, the store (writable, reachable by the
   provider's instances) and the project (ignore rules, size limits);
3. create an instance (or reuse ``instance``), upload the code (content-addressed: unchanged
   files are not uploaded again), write ``job.json`` and start the agent;
4. optionally follow the logs until the job ends.

Any failure in step 3 terminates what this launch created. An instance that a launch created is
terminated when its job ends (by the agent itself, so ``detach=True`` is safe too) unless
``keep_alive=True``.

Example::

    from trainctl_lightning import launch

    run = launch.launch("train.py", args=["--epochs", "3"])        # local provider, local store
    print(run.run_id, run.exit_code)

    inst = launch.create_instance(provider="local")
    run = launch.train(inst, "train.py", detach=True)
    for chunk in run.follow():
        print(chunk.decode(), end="")
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

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
from trainctl_lightning.store import ObjectStore, package_version
from trainctl_lightning.store.layout import TAG_RUN_ID, run_url_in, store_url_of
from trainctl_lightning.timeutil import utc_now

if TYPE_CHECKING:
    from trainctl_lightning.jobs.codesync import UploadStats

log = logging.getLogger(__name__)

OutputSink = Callable[[bytes], None]


# ----------------------------------------------------------------------------- settings
def _settings(project_dir: str | Path | None, profile: str | None, overrides: dict[str, Any]) -> Any:
    from trainctl_lightning.config import load_config

    return load_config(project_dir, profile=profile, overrides=overrides).settings


def provider_for(name: str | None = None, instance_id: str | None = None, region: str | None = None) -> Provider:
    """The provider by name, or guessed from an instance id (``local-...``, ``i-...``)."""
    if name is None and instance_id:
        if instance_id.startswith("local-"):
            name = "local"
        elif instance_id.startswith("i-"):
            name = "aws"
    if name is None:
        name = _settings(None, None, {}).provider
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
    store_url = store or _settings(None, profile, {}).store_url()
    return run_url_in(store_url, ref)


def store_url_for(store: str | None = None, profile: str | None = None) -> str:
    return store or _settings(None, profile, {}).store_url()


# ----------------------------------------------------------------------------- records
@dataclass
class LaunchPlan:
    """A dry run of a launch: what would be created and run, with nothing created or uploaded."""

    run_id: str
    run_url: str
    command: list[str]
    instance: CreatePlan | Instance
    code_files: int = 0
    code_bytes: int = 0

    def describe(self) -> str:
        what = self.instance.describe() if isinstance(self.instance, CreatePlan) else f"reuse instance {self.instance.id}"
        return "\n".join(
            [
                f"run {self.run_id} -> {self.run_url}",
                f"command: {' '.join(self.command)}",
                f"code: {self.code_files} files, {self.code_bytes} bytes (before de-duplication)",
                what,
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        inst = self.instance.to_dict()
        return {
            "dry_run": True,
            "run_id": self.run_id,
            "run_url": self.run_url,
            "command": self.command,
            "code_files": self.code_files,
            "code_bytes": self.code_bytes,
            "instance": inst,
        }


@dataclass
class Run:
    """A launched job: where it is, and how to follow, wait for or cancel it."""

    run_id: str
    run_url: str
    store_url: str
    provider: str
    instance_id: str | None
    created_instance: bool = False
    """This launch created the instance (it is terminated when the job ends unless keep_alive)."""
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

    def logs(self) -> str:
        """Everything the job printed so far."""
        return self.job.read_logs().decode(errors="replace")

    def follow(self, poll_s: float = 0.5) -> Iterator[bytes]:
        """Output chunks as they arrive, until the job ends."""
        return self.job.follow_logs(poll_s=poll_s)

    def wait(self, timeout: float | None = None, on_output: OutputSink | None = None, poll_s: float = 0.5) -> JobState:
        """Wait for the job to end, passing its output to ``on_output`` as it arrives.

        Returns the terminal (or lost) state. Raises:
            JobError: ``timeout`` seconds passed first (the job keeps running).
        """
        deadline = None if timeout is None else time.monotonic() + timeout

        def expired() -> bool:
            return deadline is not None and time.monotonic() > deadline

        with LauncherHeartbeat(self.job) if self.heartbeat else nullcontext():
            for chunk in self.job.follow_logs(poll_s=poll_s, stop=expired):
                if on_output is not None:
                    on_output(chunk)
        state = self.state()
        if state is None or not (state.phase.is_terminal() or state.lost):
            raise JobError(f"run {self.run_id} did not end within {timeout:.0f}s; it is still running (`trainctl logs {self.run_id} -f`)")
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
        if self.created_instance and not self.keep_alive and self.instance_id:
            try:
                provider_for(self.provider).terminate(self.instance_id)
            except InstanceNotFoundError:
                pass
            except TrainctlError as exc:
                if force:
                    raise
                log.warning("trainctl: could not terminate %s: %s; run `trainctl terminate %s`", self.instance_id, exc, self.instance_id)

    def to_dict(self) -> dict[str, Any]:
        state = self.state()
        return {
            "run_id": self.run_id,
            "run_url": self.run_url,
            "store_url": self.store_url,
            "provider": self.provider,
            "instance_id": self.instance_id,
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
    settings = _settings(
        None,
        profile,
        dict(provider=provider, instance_type=instance_type, spot=spot, region=region, image=image, disk_gb=disk_gb, max_hours=max_hours),
    )
    prov = provider_for(settings.provider, region=settings.region)
    spec = _instance_spec(settings, tags=tags, name=name)
    plan = prov.create_dryrun(spec)
    if dry_run:
        return plan
    return prov.create(spec)


def list_resources(provider: str | None = None, include_terminated: bool = False, profile: str | None = None) -> list[Instance]:
    """Instances trainctl created with this provider (default: the configured one), newest first."""
    settings = _settings(None, profile, dict(provider=provider))
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
    on_output: OutputSink | None = None,
    **options: Any,
) -> Run:
    """Run ``script`` on ``instance`` (an Instance, an id, or None to create one), as the original
    trainctl sketch had it. Waits and streams output unless ``detach``; see :func:`launch`."""
    inst_id = instance.id if isinstance(instance, Instance) else instance
    if isinstance(instance, Instance):
        options.setdefault("provider", instance.provider)
    return launch(script, args=args, instance=inst_id, sync_code=sync_code, detach=detach, on_output=on_output, **options)


def _stdout_sink(chunk: bytes) -> None:
    sys.stdout.buffer.write(chunk)
    sys.stdout.flush()


def _instance_spec(
    settings: Any,
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
        raise ConfigError(f"cannot forward {', '.join(missing)}: not set in this environment (export it, or drop it from forward_env)")
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


def launch(
    script: str | None = None,
    *,
    module: str | None = None,
    args: Sequence[str] = (),
    run_id: str | None = None,
    project_dir: str | Path | None = None,
    sync_code: bool = True,
    include: Sequence[str] = (),
    detach: bool = False,
    on_output: OutputSink | None = None,
    instance: str | None = None,
    keep_alive: bool = False,
    provider: str | None = None,
    store: str | None = None,
    instance_type: str | None = None,
    spot: bool | None = None,
    region: str | None = None,
    image: str | None = None,
    disk_gb: int | None = None,
    max_hours: float | None = None,
    env: dict[str, str | None] | Sequence[str] | None = None,
    forward_env: Sequence[str] | None = None,
    setup: Sequence[str] | None = None,
    env_mode: str | None = None,
    python: str | None = None,
    code_max_mb: float | None = None,
    tags: dict[str, str] | None = None,
    profile: str | None = None,
    dry_run: bool = False,
    on_event: Callable[[str], None] | None = None,
    follow: bool | None = None,
) -> Run | LaunchPlan:
    """Run ``script`` (or ``-m module``) through the agent on an instance; see the module docs.

    Args:
        script: path of the script, inside ``project_dir`` when code is synced.
        module: run ``python -m module`` instead of a script.
        args: the script's arguments.
        run_id: the run's id (default: ``<script>-<time>-<hex>``); the run lives at ``<store>/<run_id>``.
        project_dir: the directory synced to the instance (default: the current directory).
        detach: return once the job has started, instead of following it to the end. An
            attached launch refreshes a heartbeat in the store while it follows the job; when
            that stops for 10 minutes (the launcher was killed, lost its network), the agent
            cancels the job and ends an instance this launch created.
        on_output: receives the job's output as it arrives (attached launches; default: stdout).
        follow: the caller will follow the job itself with ``Run.wait`` after a ``detach=True``
            return (the CLI and RemoteStrategy do): the launcher heartbeat and its watchdog are
            set up as for an attached launch. Default: ``not detach``.
        instance: reuse this instance instead of creating one (it is kept afterwards).
        keep_alive: keep an instance this launch created after the job ends.
        env: variables for the job, ``{"NAME": "value"}`` or ``["NAME=value", "NAME"]``; a name
            without a value is forwarded from this environment and never stored.
        env_mode: ``auto`` (reuse this Python when it has what the project needs), ``reuse`` or ``isolated``.
        python: interpreter for the job on the instance (local provider default: this one).
        dry_run: return a :class:`LaunchPlan` saying what would happen; create and upload nothing.
        on_event: receives one-line progress messages ("created instance ...").
        Other settings default to ``trainctl.toml`` / ``[tool.trainctl]`` and its profile.

    Raises:
        ConfigError: bad arguments or settings (nothing was created).
        StoreError: the store cannot be written (nothing was created).
        RunFailedError: never; an attached launch returns the Run, check ``run.exit_code``
            (or use :meth:`Run.result`).
    """
    event = on_event or (lambda msg: log.info("trainctl: %s", msg))
    attached = (not detach) if follow is None else follow
    started = time.monotonic()
    root = Path(project_dir).expanduser().resolve() if project_dir is not None else Path.cwd()
    if not root.is_dir():
        raise ConfigError(f"project directory {str(root)!r} does not exist or is not a directory")
    stored_env, forward_names = _split_env(env)
    settings = _settings(
        root,
        profile,
        dict(
            provider=provider,
            store=store,
            instance_type=instance_type,
            spot=spot,
            region=region,
            image=image,
            disk_gb=disk_gb,
            max_hours=max_hours,
            setup=list(setup) if setup is not None else None,
            env_mode=env_mode,
            code_max_mb=code_max_mb,
        ),
    )

    # ---- what to run
    if (script is None) == (module is None):
        raise ConfigError("give a script to run (trainctl launch train.py) or a module (module=...), not both")
    rel_script: str | None = None
    if script is not None:
        path = Path(script).expanduser()
        path = path if path.is_absolute() else (Path.cwd() / path)
        path = path.resolve()
        if not path.is_file():
            raise ConfigError(f"script {script!r} not found (looked at {path})")
        if sync_code:
            try:
                rel_script = path.relative_to(root).as_posix()
            except ValueError:
                raise ConfigError(
                    f"script {str(path)!r} is outside the project directory {str(root)!r} that is synced; "
                    "run from the project directory or pass --project-dir"
                ) from None
        else:
            rel_script = str(path)
    env_all = {**settings.env, **stored_env}
    forward_all = list(dict.fromkeys([*settings.forward_env, *(forward_env or []), *forward_names]))
    forwarded = _forwarded_env(forward_all)
    mode = EnvMode(settings.env_mode)

    # ---- where
    prov = provider_for(settings.provider, region=settings.region)
    store_url = settings.store_url()
    prov.check_store(store_url)
    if forwarded and not prov.forwards_env:
        raise ConfigError(
            f"the {prov.name} provider cannot forward {', '.join(forwarded)} without storing it: "
            "give the instance a role or secret store instead, and drop these from forward_env / --env"
        )
    run_id = validate_run_id(run_id) if run_id else new_run_id(Path(script).stem if script else str(module).rsplit(".", 1)[-1])
    run_url = run_url_in(store_url, run_id)

    existing: Instance | None = None
    plan: CreatePlan | None = None
    if instance is not None:
        existing = prov.describe(instance)
        if not existing.state.is_usable():
            raise ConfigError(f"instance {instance} is {existing.state.value}; start a new one (omit --instance) or pick a running one")
    else:
        spec = _instance_spec(settings, tags={**(tags or {}), TAG_RUN_ID: run_id}, run_url=run_url, store_url=store_url)
        plan = prov.create_dryrun(spec)

    # ---- code (scanned, and limits enforced, before anything is created)
    bundle = None
    if sync_code:
        from trainctl_lightning.jobs.codesync import scan_project

        bundle = scan_project(root, max_total_mb=settings.code_max_mb, max_file_mb=settings.code_max_mb / 2, include=include)

    job_spec = JobSpec(  # validated here (env names, runtime), before anything is created
        run_id=run_id,
        run_url=run_url,
        created_at=utc_now(),
        script=rel_script,
        module=module,
        args=[str(a) for a in args],
        env=env_all,
        forward_env=forward_all,
        setup=list(settings.setup),
        env_mode=mode,
        python=python or (sys.executable if prov.name == "local" else None),
        max_runtime_s=settings.max_hours * 3600 if settings.max_hours else None,
        provider=prov.name,
        instance_id=existing.id if existing else None,
        terminate_instance_after=existing is None and not keep_alive,
        launcher_grace_s=DEFAULT_LAUNCHER_GRACE_S if attached else None,
        trainctl_version=package_version(),
    )
    if dry_run:
        return LaunchPlan(
            run_id=run_id,
            run_url=run_url,
            command=job_spec.command("python"),
            instance=existing or plan,  # type: ignore[arg-type]
            code_files=len(bundle.files) if bundle else 0,
            code_bytes=bundle.total_bytes if bundle else 0,
        )
    ObjectStore(store_url).check_writable()
    job = JobStore(run_url)
    if job.exists():
        raise ConfigError(f"run {run_id} already exists in {store_url}; choose another run id")

    # ---- create, upload, start (anything that fails from here terminates what was created)
    created: Instance | None = None
    try:
        if existing is None:
            assert plan is not None
            create_spec = plan.spec
            if prov.installs_trainctl and "install" not in create_spec.options:
                from trainctl_lightning.jobs.dist import ship_trainctl

                wheel = ship_trainctl(store_url)  # None for a released version: the instance gets it from PyPI
                if wheel:
                    event(f"the instance installs trainctl from {wheel}")
                    create_spec = replace(create_spec, options={**create_spec.options, "install": wheel})
            created = prov.create(create_spec)
            event(f"created {prov.name} instance {created.id}")
        inst = existing or created
        assert inst is not None
        upload: UploadStats | None = None
        code_ref = None
        if bundle is not None:
            from trainctl_lightning.jobs.codesync import upload_bundle

            code_ref, upload = upload_bundle(bundle, store_url, run_url)
            event(upload.describe())
        # spot: the agent watches for interruption notices (what the instance says, else what we asked for)
        job_spec = replace(job_spec, code=code_ref, instance_id=inst.id, spot=inst.spot or bool(created and plan and plan.spec.spot))
        job.write_spec(job_spec)
        job.write_state(JobState(run_id=run_id, phase=JobPhase.QUEUED, updated_at=utc_now(), instance_id=inst.id, queued_at=job_spec.created_at))
        prov.start_agent(inst, AgentLaunch(run_id=run_id, run_url=run_url, forward_env=forwarded))
        event(f"started run {run_id} on {inst.id} ({time.monotonic() - started:.1f}s); store: {run_url}")
    except BaseException:
        if created is not None:
            try:
                prov.terminate(created.id)
                event(f"terminated {created.id} after the failed launch")
            except Exception as cleanup:  # the original error matters more; say what to clean by hand
                log.error("trainctl: could not terminate %s after a failed launch (%s); run `trainctl terminate %s`", created.id, cleanup, created.id)
        raise

    run = Run(
        run_id=run_id,
        run_url=job.url,
        store_url=store_url,
        provider=prov.name,
        instance_id=inst.id,
        created_instance=created is not None,
        keep_alive=keep_alive,
        code=upload,
        heartbeat=attached,
        _job=job,
    )
    if detach:
        return run
    try:
        run.wait(on_output=on_output or _stdout_sink)
    except KeyboardInterrupt:
        event(f"interrupted: cancelling run {run_id}")
        run.cancel("cancelled by the user (Ctrl-C)", wait_s=job_spec.stop_grace_s + 10)
        raise
    return run

