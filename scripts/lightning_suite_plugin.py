"""pytest plugin that attaches trainctl's Lightning plugins to Lightning's own tests.

``scripts/lightning_suite.sh`` loads it (``-p lightning_suite_plugin``) in both of its runs, so
that both skip the same tests (:data:`EXCLUDED`); only the run with ``LIGHTNING_SUITE_ATTACH=1``
attaches anything:

* every ``Trainer`` built by a test in a checkpointing file (:data:`CHECKPOINT_FILES`) gets
  ``CheckpointSync("file://<per-test temp dir>")`` appended to its callbacks: one store URL per
  test, as a user who attaches one ``CheckpointSync(url)`` to every Trainer of a script would;
* ``MetricsReporter`` joins the ``logger_class`` matrix of ``loggers/test_all.py`` (a subclass
  that takes ``save_dir`` like Lightning's own loggers and writes to ``file://<save_dir>``).

Not part of trainctl-lightning: it imports Lightning's test layout, which only exists in a
source checkout of Lightning.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import pytest

__all__ = ["CHECKPOINT_FILES", "EXCLUDED", "LOGGER_MATRIX_FILE"]

ATTACH = os.environ.get("LIGHTNING_SUITE_ATTACH") == "1"

# Tests whose Trainers get CheckpointSync, by path relative to tests/tests_pytorch.
CHECKPOINT_FILES = (
    "checkpointing/test_model_checkpoint.py",
    "checkpointing/test_trainer_checkpoint.py",
    "checkpointing/test_checkpoint_callback_frequency.py",
    "plugins/test_checkpoint_io_plugin.py",
)
# The file whose `logger_class` parametrisations get MetricsReporter added.
LOGGER_MATRIX_FILE = "loggers/test_all.py"

# "<file>::<test function>" (every parametrisation) -> why it says nothing about our plugins.
# Deselected in BOTH runs, and printed by the script.
# None is needed now. Tests that mock torch.save and count its calls (test_default_checkpoint_freq,
# test_top_k, test_top_k_ddp, test_model_checkpoint_no_extraneous_invocations) were excluded while
# CheckpointSync wrote its own snapshot files; since issue 12 they pass with our plugins attached
# (one torch.save per save, as TorchCheckpointIO does), so the exclusion would only hide a change.
# LIGHTNING_SUITE_INCLUDE_EXCLUDED=1 runs excluded tests anyway, to see whether an entry still matters.
EXCLUDED: dict[str, str] = {}

#: ``LIGHTNING_SUITE_INCLUDE_EXCLUDED=1`` runs them anyway, to see whether an exclusion still matters.
_INCLUDE_EXCLUDED = os.environ.get("LIGHTNING_SUITE_INCLUDE_EXCLUDED") == "1"

_state: dict[str, Any] = {"store": None, "stores": 0}


def _relpath(path: Path) -> str | None:
    """``path`` relative to tests/tests_pytorch, or None when it is elsewhere."""
    parts = path.resolve().parts
    if "tests_pytorch" not in parts:
        return None
    return "/".join(parts[len(parts) - parts[::-1].index("tests_pytorch") :])


if ATTACH:  # the run without our plugins imports nothing of trainctl
    from trainctl_lightning import MetricsReporter as _TrainctlMetricsReporter

    class MetricsReporter(_TrainctlMetricsReporter):
        """trainctl's MetricsReporter with the ``save_dir`` argument Lightning's logger matrix passes.

        Named like the real class so the test ids read ``[MetricsReporter]``; defined at module
        level so that spawned processes (``ddp_spawn``) unpickle it by reference.
        """

        def __init__(self, save_dir: str, **kwargs: Any) -> None:
            super().__init__(Path(save_dir, "trainctl-metrics").resolve().as_uri(), **kwargs)


def pytest_configure(config: pytest.Config) -> None:
    # Both runs: XLAAccelerator.auto_device_count() is lru-cached, and the first call decides it
    # for the whole process. If the first caller is a test that mocks XLA as available
    # (test_trainer_save_checkpoint_storage_options), it imports torch_xla and fails, so that
    # test passes or fails with the order xdist happens to give it. Ask once here, as any earlier
    # Trainer in the process would.
    from lightning.fabric.accelerators.xla import XLAAccelerator

    XLAAccelerator.auto_device_count()
    if ATTACH:
        _patch_trainer()


def _patch_trainer() -> None:
    from lightning.pytorch import Trainer

    from trainctl_lightning import CheckpointSync

    original = Trainer.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        store = _state["store"]
        if store is not None:
            callbacks = kwargs.get("callbacks")
            if callbacks is None:
                callbacks = []
            elif not isinstance(callbacks, (list, tuple)):
                callbacks = [callbacks]
            kwargs["callbacks"] = [*callbacks, CheckpointSync(store)]
        original(self, *args, **kwargs)

    Trainer.__init__ = __init__  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _trainctl_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One store URL per checkpointing test, under pytest's basetemp (outside Lightning's tests tree)."""
    rel = _relpath(Path(str(request.node.path)))
    if ATTACH and rel in CHECKPOINT_FILES:
        _state["store"] = tmp_path_factory.mktemp("trainctl-store").resolve().as_uri()
    yield
    _state["store"] = None


def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    """Add MetricsReporter to every ``logger_class`` parametrisation of the logger matrix file."""
    if not (ATTACH and callable(obj) and name.startswith("test_")):
        return
    if _relpath(Path(str(collector.path))) != LOGGER_MATRIX_FILE:
        return
    marks = getattr(obj, "pytestmark", [])
    for i, mark in enumerate(marks):
        if mark.name == "parametrize" and mark.args and mark.args[0] == "logger_class":
            values = list(mark.args[1])
            if MetricsReporter not in values:
                marks[i] = pytest.mark.parametrize("logger_class", [*values, MetricsReporter], **mark.kwargs).mark


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        rel = _relpath(Path(str(item.path)))
        key = f"{rel}::{getattr(item, 'originalname', item.name)}"
        (drop if key in EXCLUDED and not _INCLUDE_EXCLUDED else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    # The ids, for the script's summary (every xdist worker writes the same list).
    out = os.environ.get("LIGHTNING_SUITE_DESELECTED")
    if out:
        tmp = f"{out}.{os.getpid()}"
        Path(tmp).write_text(json.dumps(sorted(item.nodeid for item in drop)))
        os.replace(tmp, out)
