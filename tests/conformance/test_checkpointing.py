"""With ``CheckpointSync`` attached, checkpointing behaves exactly as it does without it.

Every scenario runs twice (:func:`tests.helpers.conformance.run_both`), in fresh folders, and
everything Lightning and the user can observe is compared: the files on disk and what each
loads back as, ``ModelCheckpoint``'s paths and ``best_k_models``, version suffixes, what
``trainer.test(ckpt_path=...)`` loads, and the calls that reach a user's ``CheckpointIO``.
The scenarios follow Lightning's documented behaviour and the cases its own tests check
(``test_ckpt_version_after_rerun_same_trainer``, ``test_none_monitor_not_alternating``,
``test_checkpoint_plugin_called``, ``test_async_checkpoint_plugin``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.plugins.io import AsyncCheckpointIO

from tests.helpers.conformance import (
    Observed,
    RecordingCheckpointIO,
    observe_callback,
    observe_folder,
    plugin_callbacks,
    run_both,
)


def _trainer(tmp_dir: Path, with_plugins: bool, callbacks: list[Callback], **overrides: Any) -> Trainer:
    """A small Trainer; ``with_plugins`` appends trainctl's callbacks (``plugins=`` is Lightning's)."""
    kwargs: dict[str, Any] = dict(
        default_root_dir=tmp_dir,
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        limit_test_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    kwargs.update(overrides)
    return Trainer(callbacks=[*callbacks, *plugin_callbacks(tmp_dir, with_plugins)], **kwargs)


def _assert_same(with_plugins: Observed, without: Observed) -> None:
    assert with_plugins.files == without.files
    assert with_plugins.checkpoint == without.checkpoint
    assert with_plugins.calls == without.calls
    assert with_plugins.extra == without.extra
    assert with_plugins.published, "the plugins published nothing: the scenario did not exercise them"


# ------------------------------------------------------------- the five causes
def _rerun_same_trainer(tmp_dir: Path, plugins: bool) -> Observed:
    ckpts = tmp_dir / "ckpts"
    mc = ModelCheckpoint(dirpath=ckpts, save_top_k=-1, monitor="epoch", filename="test")
    mc.STARTING_VERSION = 9
    trainer = _trainer(tmp_dir, plugins, [mc], limit_train_batches=1)
    trainer.fit(BoringModel())
    trainer.fit_loop.max_epochs = 4
    trainer.fit(BoringModel())
    return Observed(files=observe_folder(ckpts), checkpoint=observe_callback(mc))


@pytest.mark.parametrize("attempt", range(4))  # the name reuse was a race: give it several chances
def test_version_after_rerun_with_the_same_trainer(tmp_path, attempt):
    with_plugins, without = run_both(_rerun_same_trainer, tmp_path)
    _assert_same(with_plugins, without)
    assert set(without.files) == {"test.ckpt", "test-v9.ckpt", "test-v10.ckpt", "test-v11.ckpt"}
    assert sorted(with_plugins.published or []) == sorted(without.files)


def _none_monitor(tmp_dir: Path, plugins: bool) -> Observed:
    ckpts = tmp_dir / "ckpts"
    listings: list[list[str]] = []

    class ListDir(Callback):
        def on_train_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
            listings.append(sorted(os.listdir(ckpts)) if ckpts.exists() else [])

    mc = ModelCheckpoint(dirpath=ckpts, monitor=None, save_top_k=1, filename="model")
    trainer = _trainer(tmp_dir, plugins, [ListDir(), mc], max_epochs=3, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(BoringModel())
    return Observed(files=observe_folder(ckpts), checkpoint=observe_callback(mc), extra={"listings": listings})


def test_none_monitor_does_not_alternate_and_the_folder_holds_only_the_checkpoint(tmp_path):
    with_plugins, without = run_both(_none_monitor, tmp_path)
    _assert_same(with_plugins, without)
    assert without.extra["listings"] == [[], ["model.ckpt"], ["model.ckpt"]]


def _custom_io(tmp_dir: Path, plugins: bool) -> Observed:
    """Lightning's test_checkpoint_plugin_called, with a recording (not mocked) CheckpointIO."""
    io = RecordingCheckpointIO()
    runs = []
    for strategy_io in (True, False):
        mc = ModelCheckpoint(dirpath=tmp_dir, save_last=True)
        extra: dict[str, Any] = {"plugins": [io]} if not strategy_io else {}
        if strategy_io:
            from lightning.pytorch.strategies import SingleDeviceStrategy

            extra["strategy"] = SingleDeviceStrategy("cpu", checkpoint_io=io)
        trainer = _trainer(tmp_dir, plugins, [mc], limit_train_batches=1, limit_val_batches=0, **extra)
        trainer.fit(BoringModel())
        after_fit = trainer.strategy.checkpoint_io is io
        trainer.test(BoringModel(), ckpt_path=mc.last_model_path, verbose=False)
        runs.append({"io_after_fit_is_users": after_fit, **observe_callback(mc)})
    files = {k: v for k, v in observe_folder(tmp_dir).items() if k.endswith(".ckpt")}
    return Observed(files=files, calls=list(io.calls), extra={"runs": runs})


def test_custom_checkpoint_io_saves_to_the_target_path_and_loads_with_lightnings_arguments(tmp_path):
    with_plugins, without = run_both(_custom_io, tmp_path)
    _assert_same(with_plugins, without)
    assert set(without.files) == {"epoch=1-step=2.ckpt", "last.ckpt", "epoch=1-step=2-v1.ckpt", "last-v1.ckpt"}
    saves = [c for c in without.calls if c[0] == "save"]
    assert len(saves) == 8 and all(c[1].startswith("<tmp>/") and c[1].endswith(".ckpt") for c in saves)
    loads = [c for c in without.calls if c[0] == "load"]
    assert loads == [
        ("load", "<tmp>/last.ckpt", {"storage_options": None, "weights_only": None}),
        ("load", "<tmp>/last-v1.ckpt", {"storage_options": None, "weights_only": None}),
    ]
    assert all(run["io_after_fit_is_users"] for run in with_plugins.extra["runs"])


def _async_io(tmp_dir: Path, plugins: bool) -> Observed:
    """Lightning's test_async_checkpoint_plugin: the user's AsyncCheckpointIO does the saving."""
    inner = RecordingCheckpointIO()
    counts = {"save": 0, "remove": 0}

    class CountingAsync(AsyncCheckpointIO):
        def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
            counts["save"] += 1
            super().save_checkpoint(*args, **kwargs)

        def remove_checkpoint(self, *args: Any, **kwargs: Any) -> None:
            counts["remove"] += 1
            # Lightning's AsyncCheckpointIO removes on the calling thread while the save of that
            # file may still be queued on its executor (then the removal finds nothing, and the
            # file appears afterwards), with or without trainctl. Draining the queue first makes
            # both runs see the same files, so they can be compared.
            if self._executor is not None:
                self._executor.submit(lambda: None).result()
            super().remove_checkpoint(*args, **kwargs)

    plugin = CountingAsync(inner)
    ckpts = tmp_dir / "ckpts"
    mc = ModelCheckpoint(dirpath=ckpts, save_top_k=2, monitor="step", mode="max")
    trainer = _trainer(tmp_dir, plugins, [mc], plugins=[plugin], max_epochs=3, limit_train_batches=1, limit_val_batches=0)
    trainer.validate(BoringModel(), verbose=False)
    trainer.fit(BoringModel())
    restored = trainer.strategy.checkpoint_io is plugin and plugin.checkpoint_io is inner
    return Observed(
        files=observe_folder(ckpts),
        checkpoint=observe_callback(mc),
        # sorted: Lightning's AsyncCheckpointIO removes on the training thread while its executor
        # saves, so the order of the two kinds of call is a race, with or without trainctl
        calls=sorted(inner.calls, key=repr),
        extra={"counts": counts, "restored": restored},
    )


def test_a_users_async_checkpoint_io_is_composed_with_not_replaced(tmp_path):
    with_plugins, without = run_both(_async_io, tmp_path)
    _assert_same(with_plugins, without)
    assert without.extra == {"counts": {"save": 3, "remove": 1}, "restored": True}
    assert [c[0] for c in without.calls].count("save") == 3


def _storage_options(tmp_dir: Path, plugins: bool, io: Any = None) -> Observed:
    ckpts = tmp_dir / "ckpts"
    outcome: list[str] = []

    class SaveWithOptions(Callback):
        def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
            try:
                trainer.save_checkpoint(ckpts / "manual.ckpt", storage_options={"compress": True})
                outcome.append("saved")
            except TypeError as exc:
                outcome.append(f"TypeError: {exc}")

    extra = {"plugins": [io]} if io is not None else {}
    mc = ModelCheckpoint(dirpath=ckpts)
    trainer = _trainer(tmp_dir, plugins, [SaveWithOptions(), mc], max_epochs=1, **extra)
    trainer.fit(BoringModel())
    calls = list(io.calls) if isinstance(io, RecordingCheckpointIO) else []
    return Observed(files=observe_folder(ckpts), calls=calls, extra={"outcome": outcome})


def test_storage_options_with_torch_checkpoint_io_raise_lightnings_type_error(tmp_path):
    with_plugins, without = run_both(lambda d, p: _storage_options(d, p, TorchCheckpointIO()), tmp_path)
    _assert_same(with_plugins, without)
    assert without.extra["outcome"][0].startswith("TypeError: `Trainer.save_checkpoint(..., storage_options=...)`")


def test_storage_options_reach_a_custom_checkpoint_io(tmp_path):
    with_plugins, without = run_both(lambda d, p: _storage_options(d, p, RecordingCheckpointIO()), tmp_path)
    _assert_same(with_plugins, without)
    assert without.extra["outcome"] == ["saved"]
    assert ("save", "<tmp>/ckpts/manual.ckpt", {"compress": True}, 2) in without.calls


# ------------------------------------------------------------ ModelCheckpoint options
_OPTIONS: dict[str, dict[str, Any]] = {
    "top_k_1": dict(save_top_k=1, monitor="step", mode="max"),
    "top_k_2": dict(save_top_k=2, monitor="step", mode="min"),
    "top_k_all": dict(save_top_k=-1, monitor="step", mode="max"),
    "save_last": dict(save_top_k=1, monitor="step", mode="min", save_last=True),
    "save_last_link": dict(save_top_k=2, monitor="step", mode="max", save_last="link"),
    "every_n_epochs": dict(save_top_k=-1, every_n_epochs=2),
    "every_n_train_steps": dict(save_top_k=-1, every_n_train_steps=3, save_last=True),
    "weights_only": dict(save_top_k=2, monitor="step", mode="max", save_weights_only=True),
}


@pytest.mark.parametrize("options", list(_OPTIONS), ids=list(_OPTIONS))
def test_model_checkpoint_options(tmp_path, options):
    def scenario(tmp_dir: Path, plugins: bool) -> Observed:
        ckpts = tmp_dir / "ckpts"
        mc = ModelCheckpoint(dirpath=ckpts, **_OPTIONS[options])
        trainer = _trainer(tmp_dir, plugins, [mc], max_epochs=4)
        trainer.fit(BoringModel())
        keys = {name: sorted(_load_keys(ckpts / name)) for name in sorted(os.listdir(ckpts))}
        return Observed(files=observe_folder(ckpts), checkpoint=observe_callback(mc), extra={"keys": keys})

    with_plugins, without = run_both(scenario, tmp_path)
    _assert_same(with_plugins, without)


def _load_keys(path: Path) -> list[str]:
    import torch

    return list(torch.load(path, map_location="cpu", weights_only=False))


def _resume(tmp_dir: Path, plugins: bool) -> Observed:
    ckpts = tmp_dir / "ckpts"
    first = ModelCheckpoint(dirpath=ckpts, save_last=True, save_top_k=2, monitor="step", mode="max")
    _trainer(tmp_dir, plugins, [first]).fit(BoringModel())
    second = ModelCheckpoint(dirpath=ckpts, save_last=True, save_top_k=2, monitor="step", mode="max")
    trainer = _trainer(tmp_dir, plugins, [second], max_epochs=3)
    trainer.fit(BoringModel(), ckpt_path="last")
    return Observed(
        files=observe_folder(ckpts),
        checkpoint=observe_callback(second),
        extra={"resumed_from": trainer.ckpt_path, "global_step": trainer.global_step},
    )


def test_resume_from_last(tmp_path):
    with_plugins, without = run_both(_resume, tmp_path)
    _assert_same(with_plugins, without)
    assert without.extra == {"resumed_from": "<tmp>/ckpts/last.ckpt", "global_step": 6}
