"""One remote call: upload a payload, launch the worker on an instance, follow it, fetch the result.

Shared by :class:`~trainctl_lightning.remote.strategy.RemoteStrategy` and
:func:`~trainctl_lightning.remote.function.remote`. The launch itself (instance, code sync, agent)
is :func:`trainctl_lightning.launch.plan_launch` and :func:`~trainctl_lightning.launch.execute_plan`;
this module adds what a call that looks local needs:
live output, Ctrl-C that cancels the remote run, the instance ended unless ``keep_alive``, and
the remote outcome turned back into a return value or an exception.

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import codecs
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainctl_lightning.errors import (
    ConfigError,
    InstanceNotFoundError,
    RemoteError,
    RemoteTraceback,
    RunFailedError,
    TrainctlError,
)
from trainctl_lightning.jobs.spec import JobState, new_run_id
from trainctl_lightning.remote.payload import RemoteResult, loads_result, sign_payload
from trainctl_lightning.runkey import forget_key, new_key, save_key
from trainctl_lightning.store import ObjectStore, RunStore, layout
from trainctl_lightning.store.layout import run_url_in

if TYPE_CHECKING:
    from trainctl_lightning.launch import LaunchPlan, Run

__all__ = ["WORKER_MODULE", "RemoteCall", "RemoteOptions", "RemoteRun", "remote_exception"]

log = logging.getLogger(__name__)

WORKER_MODULE = "trainctl_lightning.remote.worker"
#: Launch options a remote call sets itself; they cannot be given as launch options.
_RESERVED = frozenset({"script", "module", "args", "run_id", "detach", "follow", "on_output", "instance", "dry_run", "sync_code"})


@dataclass
class RemoteOptions:
    """Where and how a remote call runs. ``None`` means the setting from ``trainctl.toml`` / the profile.

    ``launch_options`` are further :class:`~trainctl_lightning.launch.LaunchRequest` fields and
    :class:`~trainctl_lightning.config.Settings` overrides (``region``, ``max_hours``, ``setup``,
    ``forward_env``, ``env_mode``, ``tags``, ...), as :func:`trainctl_lightning.launch.launch` takes them.
    """

    provider: str | None = None
    store: str | None = None
    """Store URL under which the run is kept; the run is ``<store>/<run id>``."""
    instance_type: str | None = None
    spot: bool | None = None
    keep_alive: bool = False
    """Keep the instance after the call, and reuse it for the next one."""
    env: dict[str, str | None] | list[str] | None = None
    profile: str | None = None
    project_dir: str | os.PathLike[str] | None = None
    """The directory synced to the instance (default: the current directory at call time)."""
    stream: bool = True
    """Print the remote output (and one-line progress messages) while waiting."""
    launch_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from trainctl_lightning.launch import REQUEST_OPTIONS, SETTINGS_OPTIONS

        own = {f.name for f in fields(self)}
        known = (REQUEST_OPTIONS | SETTINGS_OPTIONS) - _RESERVED - own
        for name in self.launch_options:
            if name in _RESERVED:
                raise ConfigError(f"launch option {name}={self.launch_options[name]!r} is set by the remote call itself; drop it")
            if name in own:
                raise ConfigError(
                    f"launch option {name}={self.launch_options[name]!r} is an argument of its own: pass {name}=... directly"
                )
            if name not in known:
                raise ConfigError(f"unknown launch option {name!r}; options are: {', '.join(sorted(known))}")
        if self.project_dir is not None and not Path(self.project_dir).expanduser().is_dir():
            raise ConfigError(f"project_dir {str(self.project_dir)!r} is not a directory")

    def resolved_project_dir(self) -> Path:
        return Path(self.project_dir).expanduser().resolve() if self.project_dir is not None else Path.cwd().resolve()

    def store_url(self) -> str:
        if self.store:
            return self.store
        from trainctl_lightning.config import load_config

        return load_config(self.resolved_project_dir(), profile=self.profile).settings.store_url()


@dataclass
class RemoteRun:
    """Where a remote call ran and what it left in the store."""

    run_id: str
    run_url: str
    store_url: str
    provider: str | None = None
    instance_id: str | None = None
    phase: str | None = None
    """The job's final phase (``succeeded``, ``failed``, ``cancelled``, ...)."""
    final_checkpoint_url: str | None = None
    """URL of the checkpoint file holding the final weights (fit only)."""
    best_checkpoint_url: str | None = None
    """URL of the best checkpoint file, when CheckpointSync published it."""


class RemoteCall:
    """One payload run remotely, in the run ``<store>/<run id>`` allocated on construction.

    Args:
        options: where and how to run.
        stem: the first part of the run id (``<stem>-<time>-<hex>``).
    """

    def __init__(self, options: RemoteOptions, stem: str) -> None:
        self.options = options
        self.store_url = options.store_url()
        self.run_id = new_run_id(stem)
        self.run_url = run_url_in(self.store_url, self.run_id)
        self.run: Run | None = None
        """The launched run, once launched."""
        self.record: RemoteRun | None = None

    def plan(self, instance_id: str | None = None) -> LaunchPlan:
        """What :meth:`execute` would launch, with nothing created or uploaded."""
        return self._plan(self._reusable(instance_id))

    def upload_checkpoint(self, local_path: str, checkpoint_id: str) -> None:
        """Publish a local checkpoint file into the run under ``checkpoint_id`` (for ``ckpt_path``)."""
        RunStore(self.run_url).publish_checkpoint(
            [local_path], checkpoint_id=checkpoint_id, source={"uploaded_by": "RemoteStrategy ckpt_path"}
        )

    def execute(self, payload: bytes, instance_id: str | None = None) -> RemoteResult:
        """Run the payload and return the worker's result.

        Raises:
            ConfigError, StoreError: before anything was created.
            RunFailedError: the job ended without writing a result (it could not start, was
                killed, cancelled, or lost); the message carries the end of its output.
            KeyboardInterrupt: after cancelling the run and ending the instance.
            AuthenticationError: ``remote/result.pkl`` is not signed with the run's key (something
                else wrote it); nothing in it was loaded.
        """
        try:
            return self._execute(payload, instance_id)
        finally:
            forget_key(self.run_id)  # the result is read (or never will be): the key has no further use here

    def _execute(self, payload: bytes, instance_id: str | None) -> RemoteResult:
        from trainctl_lightning.launch import execute_plan

        store = ObjectStore(self.run_url)
        instance_id = self._reusable(instance_id)
        # The run's key signs the payload now; execute_plan hands the same key to the agent.
        key = new_key()
        save_key(self.run_id, key)
        store.write(layout.REMOTE_PAYLOAD, sign_payload(payload, key=key, run_id=self.run_id), create_only=True)
        try:
            run = self.run = execute_plan(self._plan(instance_id), on_event=self._event)
        except BaseException:
            store.delete(layout.REMOTE_PAYLOAD)  # nothing will ever read it
            raise
        self.record = RemoteRun(
            run_id=run.run_id, run_url=run.run_url, store_url=self.store_url, provider=run.provider, instance_id=run.instance_id
        )
        state: JobState | None = None
        try:
            try:
                state = run.wait(on_output=self._sink())
            except KeyboardInterrupt:
                self._event(f"interrupted: cancelling run {run.run_id}")
                state = run.cancel("cancelled by the user (Ctrl-C)", wait_s=run.spec().stop_grace_s + 10)
                raise
        finally:
            self.record.phase = state.state() if state is not None else None
            self._end_reused_instance(instance_id, run.provider)
        raw = store.read(layout.REMOTE_RESULT)
        if raw is None:
            from trainctl_lightning.launch import failure_error

            assert state is not None
            error = failure_error(run.run_id, state)
            raise RunFailedError(
                f"the remote worker wrote no result: {error}",
                exit_code=error.exit_code,
                error_tail=error.error_tail,
                run_id=run.run_id,
            )
        return loads_result(raw, key=key, run_id=run.run_id, name=f"{run.run_url}/{layout.REMOTE_RESULT}")

    def _plan(self, instance_id: str | None) -> LaunchPlan:
        from trainctl_lightning.launch import (
            LaunchRequest,
            plan_launch,
            resolve_settings,
            split_launch_options,
        )

        opts = self.options
        request_options, overrides = split_launch_options(opts.launch_options)
        request = LaunchRequest(
            module=WORKER_MODULE,
            args=[self.run_url],
            run_id=self.run_id,
            project_dir=opts.resolved_project_dir(),
            detach=True,
            follow=True,  # this session waits on the run: heartbeat + launcher watchdog
            instance=instance_id,
            keep_alive=opts.keep_alive,
            env=opts.env,
            **request_options,
        )
        settings = resolve_settings(
            request.project_root(),
            opts.profile,
            provider=opts.provider,
            store=self.store_url,
            instance_type=opts.instance_type,
            spot=opts.spot,
            **overrides,
        )
        return plan_launch(request, settings)

    # ----------------------------------------------------------------- helpers
    def _reusable(self, instance_id: str | None) -> str | None:
        """``instance_id`` if that instance can take a job, else None (a new one is created)."""
        if instance_id is None:
            return None
        from trainctl_lightning.launch import provider_for

        try:
            found = provider_for(self.options.provider, instance_id).describe(instance_id)
        except InstanceNotFoundError:
            found = None
        if found is None or not found.state.is_usable():
            self._event(f"instance {instance_id} kept from an earlier call is gone; creating a new one")
            return None
        return instance_id

    def _end_reused_instance(self, instance_id: str | None, provider: str) -> None:
        # A launch keeps an instance it did not create; a call without keep_alive ends it anyway.
        if instance_id is None or self.options.keep_alive:
            return
        from trainctl_lightning.launch import provider_for

        try:
            provider_for(provider, instance_id).terminate(instance_id)
            self._event(f"terminated instance {instance_id}")
        except TrainctlError as exc:
            log.error("trainctl: could not terminate %s (%s); run `trainctl terminate %s`", instance_id, exc, instance_id)

    def _event(self, message: str) -> None:
        if self.options.stream:
            print(f"trainctl: {message}", flush=True)
        else:
            log.info("trainctl: %s", message)

    def _sink(self) -> Callable[[bytes], None] | None:
        if not self.options.stream:
            return None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def write(chunk: bytes) -> None:
            # sys.stdout, not its buffer: a notebook's stdout is text only
            sys.stdout.write(decoder.decode(chunk))
            sys.stdout.flush()

        return write


def remote_exception(result: RemoteResult, record: RemoteRun) -> BaseException:
    """The exception the remote call raised, rebuilt locally with the remote traceback as its cause.

    Only its type name, message and traceback text travel; nothing is unpickled. It is raised as
    the same type when that type is already imported here, derives from ``Exception``, and can
    be built from its message alone (builtins such as ``ValueError``, ``TrainctlError`` subclasses,
    most user exceptions); otherwise as :class:`RemoteError`, which carries the type name and text.
    """
    where = f"run {record.run_id} ({record.run_url})"
    exc = _rebuild_exception(result)
    if exc is None:
        exc = RemoteError(
            f"{result.error_type}: {result.error_message} (raised remotely in {where})\n"
            f"remote traceback:\n{result.traceback or '(none)'}",
            type_name=result.error_type or "",
            remote_message=result.error_message or "",
            remote_traceback=result.traceback or "",
            run_id=record.run_id,
        )
    else:
        note = f"raised on the remote instance in {where}; the remote traceback is shown above"
        if hasattr(exc, "add_note"):
            exc.add_note(note)
        else:  # Python 3.10
            exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]
    exc.__cause__ = RemoteTraceback(result.traceback or "(no traceback)")
    return exc


def _rebuild_exception(result: RemoteResult) -> Exception | None:
    """``type(message)`` for a remote exception whose type is safe to build here, else None."""
    module_name, type_name = result.error_module, result.error_type
    if not module_name or not type_name or not type_name.startswith(module_name + "."):
        return None
    module = sys.modules.get(module_name)  # already imported: nothing new is imported (and run) for it
    if module is None:
        return None
    cls: Any = module
    for part in type_name[len(module_name) + 1 :].split("."):
        cls = getattr(cls, part, None)
    if not isinstance(cls, type) or not issubclass(cls, Exception):
        return None
    message = result.error_arg if result.error_arg is not None else (result.error_message or "")
    try:
        exc = cls(message)
    except Exception as error:  # needs other arguments: it comes back as text
        log.debug("could not rebuild the remote %s from its message: %s", type_name, error)
        return None
    return exc if type(exc) is cls else None
