"""Every Lightning internal that ``RemoteStrategy`` relies on, in one place.

Supported: ``lightning>=2.4,<2.7`` (the range pinned in ``pyproject.toml``).
``tests/test_remote.py::test_lightning_internals_we_rely_on`` fails loudly if any of these moves.

What is used, and why it is needed:

- ``lightning.pytorch.strategies.launchers.launcher._Launcher``: the base class of launchers.
  ``Trainer.fit/validate/test/predict`` hand their ``_<entry>_impl`` to
  ``strategy.launcher.launch(function, *args, trainer=trainer)`` (``trainer/call.py``,
  ``_call_and_handle_interrupt``); that is how the multiprocessing and subprocess launchers
  work, and how the remote launcher takes the call to another machine.
- ``Strategy._configure_launcher()``, called once by the ``Trainer`` constructor (its
  ``_AcceleratorConnector``): where the launcher is installed and the Trainer's constructor
  arguments are captured.
- ``Trainer.__init__`` is wrapped by ``lightning.pytorch.utilities.argparse._defaults_from_env_vars``,
  whose frame holds ``kwargs``: exactly the arguments the user passed (plus ``PL_TRAINER_*``
  environment defaults). Reading that frame while the Trainer is being built is the only way to
  recover the constructor configuration without asking the user to repeat it.
- The positional arguments of ``Trainer._<entry>_impl`` have the same names as the keyword
  arguments of the public ``Trainer.<entry>``: the worker calls the public method by name.
- ``trainer.fit_loop.epoch_progress`` and the epoch loop's optimizer-step progress: the
  counters behind ``trainer.current_epoch`` / ``trainer.global_step``, set locally from the
  remote run's final values.
"""

from __future__ import annotations

import inspect
import sys
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies.launchers.launcher import _Launcher

__all__ = [
    "ENTRIES",
    "SUPPORTED_LIGHTNING",
    "Launcher",
    "captured_trainer_kwargs",
    "entry_arguments",
    "impl_parameters",
    "public_parameters",
    "set_progress",
]

#: The Lightning versions this module was written and tested against (also pinned in pyproject.toml).
SUPPORTED_LIGHTNING = ">=2.4,<2.7"

Launcher = _Launcher
#: Trainer entry points a launcher can receive, by ``TrainerFn`` value.
ENTRIES = ("fit", "validate", "test", "predict")


def impl_parameters(entry: str) -> list[str]:
    """Names of the positional arguments ``Trainer._<entry>_impl`` receives from the launcher."""
    impl = getattr(pl.Trainer, f"_{entry}_impl")
    return [name for name in inspect.signature(impl).parameters if name != "self"]


def public_parameters(entry: str) -> list[str]:
    return [name for name in inspect.signature(getattr(pl.Trainer, entry)).parameters if name != "self"]


def entry_arguments(entry: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The launcher's ``(*args, **kwargs)`` for ``_<entry>_impl`` as keyword arguments of ``Trainer.<entry>``."""
    names = impl_parameters(entry)
    if len(args) > len(names):
        raise TypeError(f"Trainer._{entry}_impl got {len(args)} positional arguments, expected at most {len(names)}")
    return {**dict(zip(names, args)), **kwargs}


def captured_trainer_kwargs() -> tuple[type, dict[str, Any]] | None:
    """``(trainer class, constructor kwargs)`` of the Trainer being constructed, read from the stack.

    Call only from code the Trainer constructor runs (``Strategy._configure_launcher``). Returns
    None when no Trainer constructor is on the stack.
    """
    wrapper_code = pl.Trainer.__init__.__code__  # the _defaults_from_env_vars wrapper
    frame: FrameType | None = sys._getframe(1)
    try:
        while frame is not None:
            if frame.f_code is wrapper_code:
                owner = frame.f_locals.get("self")
                kwargs = frame.f_locals.get("kwargs")
                if isinstance(owner, pl.Trainer) and isinstance(kwargs, dict):
                    return type(owner), dict(kwargs)
            frame = frame.f_back
        return None
    finally:
        del frame  # frames hold every local of the constructor: never keep one alive


def set_progress(trainer: pl.Trainer, global_step: int, current_epoch: int) -> None:
    """Make ``trainer.global_step`` / ``trainer.current_epoch`` report the remote run's values."""
    epoch = trainer.fit_loop.epoch_progress
    for counter in (epoch.total, epoch.current):
        counter.ready = counter.completed = current_epoch
        counter.started = counter.processed = current_epoch  # type: ignore[attr-defined]  # _ReadyCompletedTracker subclasses
    loop = trainer.fit_loop.epoch_loop
    for counter in (
        loop.automatic_optimization.optim_progress.optimizer.step.total,
        loop.manual_optimization.optim_step_progress.total,
    ):
        counter.ready = counter.completed = global_step
