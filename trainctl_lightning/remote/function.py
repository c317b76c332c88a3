"""Run a plain function on a remote instance: for Fabric, custom loops, or anything not ``Trainer.fit``.

Example::

    import trainctl_lightning as tl

    def train(lr):
        ...                      # runs on the instance, with the synced project as working directory
        return {"loss": 0.1}

    result = tl.remote(train, 0.01, instance_type="g5.xlarge")

    @tl.remote_function(provider="aws", instance_type="g5.xlarge", keep_alive=True)
    def evaluate(path, batch_size=64):
        ...

    evaluate("s3://bucket/ckpt", batch_size=32)   # same instance reused by the next call
    evaluate.terminate_instance()
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from trainctl_lightning.errors import ConfigError
from trainctl_lightning.remote.payload import FunctionPayload, dumps_payload
from trainctl_lightning.remote.session import (
    RemoteCall,
    RemoteOptions,
    RemoteRun,
    remote_exception,
)

__all__ = ["RemoteFunction", "remote", "remote_function"]

R = TypeVar("R")


class RemoteFunction(Generic[R]):
    """``fn`` bound to launch options; calling it runs ``fn`` remotely and returns its result.

    The function and its arguments travel with cloudpickle: functions and classes from
    ``__main__`` or a notebook by value, the rest by reference (imported on the instance from the
    synced project or its installed packages). Output is printed while it runs; Ctrl-C cancels
    the remote run. An exception ``fn`` raises is raised here, the remote traceback as its cause.

    Args:
        fn: the function to run.
        provider, store, instance_type, spot, env, profile, project_dir, stream: as for
            :class:`~trainctl_lightning.remote.strategy.RemoteStrategy`.
        keep_alive: keep the instance after a call and reuse it for the next (:attr:`instance_id`).
        dry_run: calls return the :class:`~trainctl_lightning.launch.LaunchPlan` instead of running.
        \\**launch_options: further :func:`trainctl_lightning.launch.launch` options: fields of
            :class:`~trainctl_lightning.launch.LaunchRequest` and :class:`~trainctl_lightning.config.Settings`.

    Raises:
        ConfigError: invalid options; at call time, an argument that cannot be sent (named).
    """

    def __init__(
        self,
        fn: Callable[..., R],
        *,
        provider: str | None = None,
        store: str | None = None,
        instance_type: str | None = None,
        spot: bool | None = None,
        keep_alive: bool = False,
        env: dict[str, str | None] | list[str] | None = None,
        profile: str | None = None,
        project_dir: str | os.PathLike[str] | None = None,
        stream: bool = True,
        dry_run: bool = False,
        **launch_options: Any,
    ) -> None:
        if not callable(fn):
            raise ConfigError(f"remote() needs a function to run, got {fn!r}")
        self.fn = fn
        self.dry_run = dry_run
        self.options = RemoteOptions(
            provider=provider,
            store=store,
            instance_type=instance_type,
            spot=spot,
            keep_alive=keep_alive,
            env=env,
            profile=profile,
            project_dir=project_dir,
            stream=stream,
            launch_options=dict(launch_options),
        )
        self.instance_id: str | None = None
        """The instance kept by ``keep_alive``; the next call reuses it."""
        self.remote_run: RemoteRun | None = None
        """Where the latest call ran."""
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"RemoteFunction({getattr(self.fn, '__qualname__', self.fn)!r}, provider={self.options.provider!r})"

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        name = getattr(self.fn, "__name__", "function")
        payload = FunctionPayload(fn=self.fn, args=args, kwargs=kwargs)
        roots = {
            name: self.fn,
            **{f"args[{i}]": a for i, a in enumerate(args)},
            **{f"kwargs[{k!r}]": v for k, v in kwargs.items()},
        }
        data = dumps_payload(roots, payload, self.options.resolved_project_dir())
        call = RemoteCall(self.options, stem=name)
        if self.dry_run:
            return call.plan(instance_id=self.instance_id)  # type: ignore[return-value]  # a LaunchPlan, documented
        try:
            result = call.execute(data, instance_id=self.instance_id)
        finally:
            if call.record is not None:
                self.remote_run = call.record
                self.instance_id = call.record.instance_id if self.options.keep_alive else None
        if not result.ok:
            raise remote_exception(result, call.record)  # type: ignore[arg-type]
        return result.value

    def terminate_instance(self) -> None:
        """End the instance kept by ``keep_alive`` (no-op without one). Idempotent."""
        if self.instance_id is None:
            return
        from trainctl_lightning.launch import provider_for

        provider_for(self.options.provider, self.instance_id).terminate(self.instance_id)
        self.instance_id = None


def remote(fn: Callable[..., R], *args: Any, **launch_options: Any) -> R:
    """Run ``fn(*args)`` on a remote instance and return its result.

    ``launch_options`` are :class:`RemoteFunction`'s (``provider``, ``instance_type``, ...). For
    keyword arguments of ``fn``, pass ``functools.partial(fn, key=value)`` or use
    :func:`remote_function`.

    Example::

        losses = trainctl_lightning.remote(train, 0.01, provider="aws", instance_type="g5.xlarge")
    """
    return RemoteFunction(fn, **launch_options)(*args)


def remote_function(fn: Callable[..., R] | None = None, **launch_options: Any) -> Any:
    """Decorator: calls of the function run remotely (see :class:`RemoteFunction`).

    Use bare (``@remote_function``) or with options (``@remote_function(instance_type="g5.xlarge")``).
    """
    if fn is not None:
        return RemoteFunction(fn, **launch_options)
    return lambda f: RemoteFunction(f, **launch_options)
