"""Every Lightning internal that ``RemoteStrategy`` and ``CheckpointSync`` rely on, in one place.

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
- ``trainer._checkpoint_connector._restore_modules_and_callbacks(checkpoint_path, ...)``:
  ``Trainer._run`` calls it with the ``ckpt_path`` that ``_fit_impl`` resolved, *after* every
  ``setup`` hook (before ``strategy.setup`` or, for strategies that restore after setup, just
  after it). The path is a local of ``_run`` by then, so a callback cannot change it through the
  public ``trainer.ckpt_path`` (read in ``_fit_impl``, before any hook runs). Automatic resume
  (``CheckpointSync``) shadows that method on the one connector instance, for one call, to pass
  the run's newest checkpoint when the user passed none: Lightning then restores model, callbacks,
  optimizers and loops from it exactly as for ``fit(ckpt_path=...)``
  (:func:`choose_fit_checkpoint`).
- ``FSDPStrategy._state_dict_type`` and ``ModelParallelStrategy._save_distributed_checkpoint``:
  whether the strategy saves a folder through ``torch.distributed.checkpoint``; the model state
  is then under ``"model"`` (FSDP) or ``"state_dict"`` (ModelParallel), each optimizer under
  ``"optimizer_<i>"`` and the rest in ``meta.pt`` (their ``save_checkpoint``). Sharded
  ``CheckpointSync`` writes the same folder in the background (:func:`dcp_state_key`).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies.launchers.launcher import _Launcher

__all__ = [
    "ENTRIES",
    "RESTORE_METHOD",
    "SUPPORTED_LIGHTNING",
    "Launcher",
    "captured_trainer_kwargs",
    "choose_fit_checkpoint",
    "clear_fit_checkpoint_choice",
    "dcp_state_key",
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


#: The connector method ``Trainer._run`` restores ``ckpt_path`` through (see the module docstring).
RESTORE_METHOD = "_restore_modules_and_callbacks"


def choose_fit_checkpoint(trainer: pl.Trainer, choose: Callable[[Any], Any]) -> None:
    """Make the next ``fit`` restore of ``trainer`` load ``choose(path the user passed)``.

    Call from a ``setup(stage="fit")`` hook, on every rank: ``choose`` runs once, on every rank,
    at the point Lightning restores the checkpoint (collectives are allowed there), with the
    resolved ``ckpt_path`` of ``fit`` (None when none was given), and returns the path to restore
    from (None: start fresh). The override is removed by that call, or by
    :func:`clear_fit_checkpoint_choice`; it never applies to validate/test/predict.
    """
    connector = trainer._checkpoint_connector
    original = getattr(type(connector), RESTORE_METHOD)

    def restore(checkpoint_path: Any = None, *args: Any, **kwargs: Any) -> None:
        clear_fit_checkpoint_choice(trainer)  # one call only: the class's method from now on
        if trainer.state.fn == "fit":
            checkpoint_path = choose(checkpoint_path)
        original(connector, checkpoint_path, *args, **kwargs)

    setattr(connector, RESTORE_METHOD, restore)  # an instance attribute shadows the class method


def clear_fit_checkpoint_choice(trainer: pl.Trainer) -> None:
    """Undo :func:`choose_fit_checkpoint` if it has not been used (a fit that failed before restoring)."""
    connector = trainer._checkpoint_connector
    if RESTORE_METHOD in vars(connector):
        delattr(connector, RESTORE_METHOD)


def dcp_state_key(strategy: Any) -> str | None:
    """The DCP key of the model state when ``strategy`` is one of Lightning's folder-saving
    strategies configured to save folders, else None (it saves single files)."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, FSDPStrategy) and getattr(strategy, "_state_dict_type", None) == "sharded":
        return "model"
    if isinstance(strategy, ModelParallelStrategy) and getattr(strategy, "_save_distributed_checkpoint", False):
        return "state_dict"
    return None
