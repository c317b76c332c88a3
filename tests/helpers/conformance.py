"""Differential conformance: the same scenario with and without trainctl's plugins.

A *scenario* is a function ``(tmp_dir, plugins) -> Observed | dict``: it trains in ``tmp_dir``
(fresh and empty), attaches :func:`plugin_callbacks` when ``plugins`` is true, and returns what
Lightning and the user can observe. :func:`run_both` runs it twice, in two fresh folders, and
returns both observations with every absolute path made relative to its folder (``<tmp>/...``),
so that a test only has to compare them::

    with_plugins, without = run_both(scenario, tmp_path)
    assert with_plugins == without

Nothing here mocks Lightning: the trainers are real, and :class:`RecordingCheckpointIO` is a
working ``CheckpointIO`` (Lightning's own test ``CustomCheckpointIO``, with its signature) that
keeps a log of the calls reaching it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

__all__ = [
    "Observed",
    "RecordingCheckpointIO",
    "observe_callback",
    "observe_folder",
    "plugin_callbacks",
    "run_both",
    "store_url",
]

Scenario = Callable[[Path, bool], "Observed | dict[str, Any]"]


@dataclass
class Observed:
    """What a scenario left for Lightning and the user to see (paths relative to its folder)."""

    files: dict[str, Any] = field(default_factory=dict)
    """folder listing: name -> global step it loads back with, ``"unloadable"``, or ``"-> target"`` (symlink)."""
    checkpoint: dict[str, Any] = field(default_factory=dict)
    """ModelCheckpoint state: best_model_path, last_model_path, best_k_models, best_model_score."""
    calls: list[Any] = field(default_factory=list)
    """Calls that reached the user's CheckpointIO, in order."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else the scenario observed (listings during the fit, what trainer.test loaded...)."""
    published: list[str] | None = field(default=None, compare=False)
    """With plugins: checkpoint names in the store after the scenario (not compared)."""


def store_url(tmp_dir: Path) -> str:
    """The ``file://`` store the plugins publish to, beside (never inside) the checkpoint folders."""
    return f"file://{tmp_dir.parent / (tmp_dir.name + '-store')}"


def plugin_callbacks(tmp_dir: Path, plugins: bool) -> list[Callback]:
    """The callbacks to append to the Trainer: ``[CheckpointSync(<file store>)]``, or none."""
    if not plugins:
        return []
    from trainctl_lightning import CheckpointSync

    return [CheckpointSync(store_url(tmp_dir))]


def observe_folder(folder: Path, root: Path | None = None) -> dict[str, Any]:
    """Every entry below ``folder`` (hidden ones included): name -> what it loads back as."""
    out: dict[str, Any] = {}
    if not folder.exists():
        return out
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_symlink():
            out[name] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            out[name] = "dir"
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=False)
                out[name] = state.get("global_step") if isinstance(state, dict) else type(state).__name__
            except Exception as exc:  # what loads and what does not is the observation
                out[name] = f"unloadable ({type(exc).__name__})"
    return out


def observe_callback(callback: ModelCheckpoint) -> dict[str, Any]:
    """The state ModelCheckpoint exposes (absolute paths are made relative by :func:`run_both`)."""
    score = callback.best_model_score
    return {
        "best_model_path": callback.best_model_path,
        "last_model_path": callback.last_model_path,
        "best_k_models": {path: float(value) for path, value in callback.best_k_models.items()},
        "best_model_score": None if score is None else float(score),
        "kth_best_model_path": callback.kth_best_model_path,
    }


class RecordingCheckpointIO(CheckpointIO):
    """Lightning's test ``CustomCheckpointIO`` (same signature), logging every call it gets.

    ``calls`` holds ``("save", path, storage_options, global_step)``, ``("load", path, kwargs)``,
    ``("remove", path)`` and ``("teardown",)`` tuples.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, ...]] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.calls.append(("save", str(path), storage_options, checkpoint.get("global_step")))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(checkpoint, path)

    def load_checkpoint(self, path: Any, storage_options: Any | None = None, weights_only: bool | None = True) -> dict[str, Any]:
        self.calls.append(("load", str(path), {"storage_options": storage_options, "weights_only": weights_only}))
        return torch.load(path, weights_only=False)

    def remove_checkpoint(self, path: Any) -> None:
        self.calls.append(("remove", str(path)))
        os.remove(path)

    def teardown(self) -> None:
        self.calls.append(("teardown",))


def _relative(value: Any, root: str) -> Any:
    if isinstance(value, str):
        return value.replace(root, "<tmp>")
    if isinstance(value, Path):
        return str(value).replace(root, "<tmp>")
    if isinstance(value, dict):
        return {_relative(k, root): _relative(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_relative(v, root) for v in value)
    return value


def _run(scenario: Scenario, tmp_dir: Path, plugins: bool) -> Observed:
    tmp_dir.mkdir(parents=True)
    result = scenario(tmp_dir, plugins)
    observed = result if isinstance(result, Observed) else Observed(extra=dict(result))
    root = str(tmp_dir)
    observed.files = _relative(observed.files, root)
    observed.checkpoint = _relative(observed.checkpoint, root)
    observed.calls = _relative(observed.calls, root)
    observed.extra = _relative(observed.extra, root)
    if plugins:
        from trainctl_lightning import RunStore

        observed.published = [m.name for m in RunStore(store_url(tmp_dir)).list_checkpoints()]
    return observed


def run_both(scenario: Scenario, tmp_path: Path, name: str = "run") -> tuple[Observed, Observed]:
    """Run ``scenario`` once with the plugins and once without, each in its own fresh folder
    under ``tmp_path``; returns ``(with_plugins, without)``."""
    with_plugins = _run(scenario, tmp_path / f"{name}-plugins", True)
    without = _run(scenario, tmp_path / f"{name}-plain", False)
    return with_plugins, without
