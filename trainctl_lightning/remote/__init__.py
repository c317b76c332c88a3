"""Run Lightning training, or any function, on a remote instance as if it ran here.

- :class:`RemoteStrategy` (``strategy.py``): ``Trainer(strategy=RemoteStrategy(...))``, then
  ``trainer.fit(...)`` runs on the instance and returns with the trained weights.
- :func:`remote` / :func:`remote_function` (``function.py``): a plain function, remotely.
- ``payload.py``: what travels there and back; ``worker.py``: what runs on the instance;
  ``session.py``: launching, following and cancelling one call; ``_lightning.py``: the only
  module that touches Lightning internals.

This package is itself callable, so ``trainctl_lightning.remote(fn, *args, **options)`` works
whether or not a submodule was imported first (importing a submodule makes the package, not the
function, the ``remote`` attribute of ``trainctl_lightning``).
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainctl_lightning.remote.function import (
        RemoteFunction,
        remote,
        remote_function,
    )
    from trainctl_lightning.remote.session import RemoteRun
    from trainctl_lightning.remote.strategy import RemoteStrategy

_LAZY = {
    # RemoteStrategy imports Lightning (seconds); the function form and the worker do not need it.
    "RemoteStrategy": "trainctl_lightning.remote.strategy",
    "RemoteFunction": "trainctl_lightning.remote.function",
    "remote": "trainctl_lightning.remote.function",
    "remote_function": "trainctl_lightning.remote.function",
    "RemoteRun": "trainctl_lightning.remote.session",
}


class _CallableModule(types.ModuleType):
    """The ``trainctl_lightning.remote`` package, callable as :func:`remote` (documented in the module)."""

    def __call__(self, fn: Any, *args: Any, **launch_options: Any) -> Any:
        from trainctl_lightning.remote.function import remote

        return remote(fn, *args, **launch_options)

    def __getattr__(self, name: str) -> Any:
        target = _LAZY.get(name)
        if target is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        import importlib

        return getattr(importlib.import_module(target), name)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["RemoteFunction", "RemoteRun", "RemoteStrategy", "remote", "remote_function"]
