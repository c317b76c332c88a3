"""RemoteStrategy and remote() end to end on the local provider: a real Trainer.fit shipped to a
real agent process through a file:// store, and back into the local model and trainer."""

from __future__ import annotations

import _thread
import inspect
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from pathlib import Path

import lightning
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from packaging.specifiers import SpecifierSet
from torch.utils.data import DataLoader

import trainctl_lightning
from tests.helpers import wait_until
from tests.helpers.leftovers import assert_nothing_running
from trainctl_lightning import CheckpointSync, MetricsReporter, RemoteStrategy, RunStore
from trainctl_lightning.errors import ConfigError, RemoteTraceback
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.metrics.read import read_metrics
from trainctl_lightning.providers import get_provider
from trainctl_lightning.remote import _lightning
from trainctl_lightning.remote import session as remote_session
from trainctl_lightning.remote.payload import loads_result
from trainctl_lightning.runkey import load_key
from trainctl_lightning.store import run_urls_in
from trainctl_lightning.store.layout import REMOTE_RESULT

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# The model lives in a module of the synced project, so the instance imports it by name.
MODELS_PY = textwrap.dedent(
    """
    import time

    import torch
    from lightning.pytorch import LightningModule
    from torch.utils.data import DataLoader, TensorDataset


    class Regressor(LightningModule):
        def __init__(self, fail_at_step=None, step_sleep=0.0):
            super().__init__()
            self.save_hyperparameters()
            with torch.random.fork_rng():
                torch.manual_seed(0)
                self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            if self.hparams.fail_at_step is not None and self.global_step == self.hparams.fail_at_step:
                raise RuntimeError(f"boom at step {self.global_step}")
            if self.hparams.step_sleep:
                print("TRAINING", self.global_step, flush=True)
                time.sleep(self.hparams.step_sleep)
            x, y = batch
            loss = torch.nn.functional.mse_loss(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))

        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log("test_loss", torch.nn.functional.mse_loss(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

        def train_dataloader(self):
            return loader(0)

        def val_dataloader(self):
            return loader(1)

        def test_dataloader(self):
            return loader(2)


    def loader(seed, n=64):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 8, generator=g)
        return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=8)
    """
)

TRAINER_KWARGS = dict(
    max_steps=6,
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    limit_val_batches=2,
    val_check_interval=3,
    num_sanity_val_steps=0,
    log_every_n_steps=1,
)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("project")
    (root / "remote_models.py").write_text(MODELS_PY)
    (root / ".gitignore").write_text("ckpts/\nlightning_logs/\n")
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    sys.modules.pop("remote_models", None)


@pytest.fixture
def models(project: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(project)  # the project directory is the one synced
    import remote_models

    return remote_models


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"file://{tmp_path}/store"


def final_state_dict(url: str) -> dict[str, torch.Tensor]:
    store, _, rest = url.partition("/checkpoints/")
    ckpt_id = rest.split("/", 1)[0]
    run = RunStore(store)
    path = run.download_checkpoint(run.get_checkpoint(ckpt_id), Path(os.environ["TRAINCTL_CACHE_DIR"]) / ckpt_id)
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


# ----------------------------------------------------------------------------- fit


@pytest.mark.slow
def test_fit_runs_remotely_and_returns_with_the_trained_weights(models, store, tmp_path, capfd) -> None:
    metrics_url = f"file://{tmp_path}/metrics"
    model = models.Regressor()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = RemoteStrategy(store=store)
    trainer = pl.Trainer(strategy=strategy, **{**TRAINER_KWARGS, "logger": MetricsReporter(metrics_url)})
    trainer.fit(model)

    run = strategy.remote_run
    assert run is not None and run.phase == "succeeded" and run.run_url.startswith(store)
    remote_weights = final_state_dict(run.final_checkpoint_url)
    assert not torch.equal(model.net[0].weight, initial["net.0.weight"]), "weights did not change"
    for key, value in model.state_dict().items():
        assert torch.equal(value, remote_weights[key]), key

    # the same training here gives the same weights and metrics
    local_model = models.Regressor()
    local = pl.Trainer(accelerator="cpu", **TRAINER_KWARGS)
    local.fit(local_model)
    for key, value in local_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
    assert set(trainer.callback_metrics) == set(local.callback_metrics) == {"train_loss", "val_loss"}
    for key, value in local.callback_metrics.items():
        torch.testing.assert_close(trainer.callback_metrics[key], value)
    # ...and what the remote run reported to its MetricsReporter is what came back
    last = [r for r in read_metrics(metrics_url) if "train_loss" in r.metrics][-1]
    assert last.step == 5 and trainer.callback_metrics["train_loss"].item() == pytest.approx(last.metrics["train_loss"])

    assert trainer.state.fn is TrainerFn.FITTING and trainer.state.status is TrainerStatus.FINISHED
    assert trainer.state.stage is None
    assert (trainer.global_step, trainer.current_epoch) == (local.global_step, local.current_epoch)
    assert trainer.global_step == 6
    out = capfd.readouterr()
    assert f"started run {run.run_id}" in out.out and "`Trainer.fit` stopped: `max_steps=6` reached" in out.out + out.err
    assert JobStore(run.run_url).read_state().phase.value == "succeeded"
    assert strategy.instance_id is None
    assert_nothing_running()


@pytest.mark.slow
def test_checkpoint_sync_best_url_then_validate_and_test(models, store, tmp_path) -> None:
    sync_url = f"file://{tmp_path}/synced"
    model = models.Regressor()
    strategy = RemoteStrategy(store=store, stream=False)
    trainer = pl.Trainer(
        strategy=strategy,
        callbacks=[
            ModelCheckpoint(dirpath="ckpts", monitor="val_loss", save_top_k=1, save_last=True, every_n_train_steps=2),
            CheckpointSync(sync_url),
        ],
        **{**TRAINER_KWARGS, "val_check_interval": 2},
    )
    trainer.fit(model)
    published = RunStore(sync_url).list_checkpoints()
    assert published, "CheckpointSync published on the instance"
    # dirpath="ckpts" is the instance's ckpts/ (in its synced copy), not this machine's
    assert not (Path.cwd() / "ckpts").exists()
    # the final weights come from CheckpointSync's last.ckpt (taken at the final step), not a copy
    assert strategy.remote_run.final_checkpoint_url.startswith(sync_url)
    assert RunStore(strategy.remote_run.run_url).list_checkpoints() == []
    best = trainer.checkpoint_callback.best_model_path
    assert best == strategy.remote_run.best_checkpoint_url and best.startswith(sync_url + "/checkpoints/")

    assert strategy.last_checkpoint_url == strategy.remote_run.final_checkpoint_url

    fitted = {k: v.clone() for k, v in model.state_dict().items()}
    results = trainer.validate(model)
    assert strategy.remote_run.final_checkpoint_url is None and strategy.last_checkpoint_url
    assert trainer.state.fn is TrainerFn.VALIDATING and trainer.state.status is TrainerStatus.FINISHED
    assert set(results[0]) == {"val_loss"} and trainer.callback_metrics["val_loss"].item() == pytest.approx(
        results[0]["val_loss"]
    )
    # the same validation here, of the final checkpoint, gives the same loss
    final = models.Regressor.load_from_checkpoint(_download(strategy.last_checkpoint_url, tmp_path))
    local = pl.Trainer(accelerator="cpu", **TRAINER_KWARGS).validate(final, verbose=False)
    assert results[0]["val_loss"] == pytest.approx(local[0]["val_loss"])

    tested = trainer.test(ckpt_path="best", verbose=False)
    assert set(tested[0]) == {"test_loss"} and trainer.state.fn is TrainerFn.TESTING
    assert trainer.global_step == 6, "validate/test leave the fit's step alone"
    for key, value in model.state_dict().items():
        assert torch.equal(value, fitted[key]), "validate/test do not change the weights"
    assert_nothing_running()


def _download(url: str, tmp_path: Path) -> Path:
    store, _, rest = url.partition("/checkpoints/")
    run = RunStore(store)
    return run.download_checkpoint(run.get_checkpoint(rest.split("/", 1)[0]), tmp_path / "downloaded")


@pytest.mark.slow
def test_a_remote_exception_is_raised_here_with_the_remote_traceback(models, store) -> None:
    model = models.Regressor(fail_at_step=2)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = RemoteStrategy(store=store, stream=False)
    trainer = pl.Trainer(strategy=strategy, **TRAINER_KWARGS)
    with pytest.raises(RuntimeError, match="boom at step 2") as raised:
        trainer.fit(model)
    text = "".join(traceback.format_exception(raised.value))
    assert isinstance(raised.value.__cause__, RemoteTraceback)
    assert "remote_models.py" in text and "in training_step" in text and 'raise RuntimeError(f"boom' in text
    assert strategy.remote_run.run_id in "".join(getattr(raised.value, "__notes__", []))
    assert strategy.remote_run.phase == "failed"
    assert trainer.state.status is TrainerStatus.INTERRUPTED  # Lightning's own handling ran
    for key, value in model.state_dict().items():
        assert torch.equal(value, initial[key])
    assert_nothing_running()


@pytest.mark.slow
def test_fit_twice_on_a_kept_instance_then_on_a_fresh_one(models, store, tmp_path) -> None:
    strategy = RemoteStrategy(store=store, keep_alive=True, stream=False)
    trainer = pl.Trainer(strategy=strategy, **TRAINER_KWARGS)
    model = models.Regressor()
    trainer.fit(model)
    kept = strategy.instance_id
    assert kept is not None and [i.id for i in get_provider("local").list()] == [kept]
    after_first = model.net[0].weight.clone()

    strategy.keep_alive = False
    trainer.fit(model)  # the same instance, ended afterwards; continues from the returned weights
    assert strategy.remote_run.instance_id == kept and strategy.instance_id is None
    assert not torch.equal(model.net[0].weight, after_first)
    assert_nothing_running()

    # a fresh instance, resuming from a checkpoint file on this machine (uploaded into the run)
    local_ckpt = _download(strategy.last_checkpoint_url, tmp_path)
    resumed = models.Regressor()
    trainer.fit(resumed, ckpt_path=str(local_ckpt))
    assert strategy.remote_run.instance_id != kept
    assert trainer.global_step == 6, "resumed at the checkpoint's step, which is max_steps"
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    assert_nothing_running()


def test_an_unpicklable_attribute_is_refused_before_anything_is_created(models, store) -> None:
    model = models.Regressor()
    model.loader_lock = threading.Lock()
    trainer = pl.Trainer(strategy=RemoteStrategy(store=store), **TRAINER_KWARGS)
    with pytest.raises(ConfigError, match=r"model\.loader_lock \(a _thread\.lock\) cannot be sent to the remote instance"):
        trainer.fit(model)
    assert get_provider("local").list(include_terminated=True) == []
    assert run_urls_in(store) == []
    # the same, deeper in a callback
    holder = ModelCheckpoint(dirpath="ckpts")
    holder.cache = {"handle": threading.Lock()}
    trainer = pl.Trainer(strategy=RemoteStrategy(store=store), callbacks=[holder], **TRAINER_KWARGS)
    with pytest.raises(ConfigError, match=r"callbacks\[0\]\.cache\['handle'\] \(a _thread\.lock\)"):
        trainer.fit(models.Regressor())
    assert get_provider("local").list(include_terminated=True) == []


def test_ctrl_c_cancels_the_remote_run_and_ends_the_instance(models, store) -> None:
    strategy = RemoteStrategy(store=store)
    trainer = pl.Trainer(strategy=strategy, **{**TRAINER_KWARGS, "max_steps": 1000})
    interrupted = threading.Event()

    def interrupt_once_training() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            run = strategy.remote_run or _current_run(strategy)
            if run is not None and "TRAINING" in JobStore(run.run_url).read_logs().decode(errors="replace"):
                interrupted.set()
                _thread.interrupt_main()
                return
            time.sleep(0.2)

    # Ctrl-C reaches Python only if SIGINT is handled: a test run started in the background
    # (CI, `cmd &`) inherits it ignored, and interrupt_main() then does nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    watcher = threading.Thread(target=interrupt_once_training, daemon=True)
    watcher.start()
    try:
        with pytest.raises(SystemExit):  # Lightning turns KeyboardInterrupt into exit(1) after its cleanup
            trainer.fit(models.Regressor(step_sleep=0.2))
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores SIGINT from then on
        watcher.join()
    assert interrupted.is_set()
    assert strategy.remote_run.phase == "cancelled"
    assert trainer.state.status is TrainerStatus.INTERRUPTED
    assert_nothing_running()


def _current_run(strategy: RemoteStrategy):
    launcher = strategy.launcher
    call = getattr(launcher, "_call", None)
    return None if call is None or call.run is None else call.run


# ----------------------------------------------------------------------------- __main__ by value


@pytest.mark.slow
def test_classes_from_main_travel_by_value(tmp_path: Path, store: str) -> None:
    """The example script defines its model in __main__: nothing to import on the instance."""
    work = tmp_path / "example"
    work.mkdir()
    script = work / "remote_fit.py"
    script.write_text((EXAMPLES / "remote_fit.py").read_text())
    result = subprocess.run(
        [sys.executable, str(script), "--max-steps", "4", "--store", store],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "weights changed: True" in result.stdout and "global step: 4" in result.stdout
    assert_nothing_running()


@pytest.mark.slow
def test_the_notebook_example_runs_as_a_script(tmp_path: Path) -> None:
    work = tmp_path / "notebook"
    work.mkdir()
    (work / "remote_notebook.py").write_text((EXAMPLES / "remote_notebook.py").read_text())
    result = subprocess.run(
        [sys.executable, "remote_notebook.py"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "REMOTE_NOTEBOOK_STEPS": "4"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "remote sum: 6" in result.stdout and "val_loss" in result.stdout
    assert_nothing_running()


# ----------------------------------------------------------------------------- remote()


class Boom(Exception):
    pass


def add(a, b, *, scale=1):
    return {"sum": (a + b) * scale, "pid": os.getpid()}


def fails(message):
    raise Boom(message)


def test_remote_function_forms(store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # tests/test_remote.py is outside the synced directory and not installed: it travels by value
    import trainctl_lightning.remote.worker

    out = trainctl_lightning.remote(add, 2, 3, store=store, stream=False)
    assert out["sum"] == 5 and out["pid"] != os.getpid()

    scaled = trainctl_lightning.remote_function(store=store, stream=False, keep_alive=True)(add)
    assert scaled(1, 2, scale=10)["sum"] == 30
    first = scaled.instance_id
    assert first is not None and scaled(1, 1)["sum"] == 2 and scaled.instance_id == first
    scaled.terminate_instance()

    with pytest.raises(Boom, match="no luck") as raised:
        trainctl_lightning.remote(fails, "no luck", store=store, stream=False)
    assert "in fails" in "".join(traceback.format_exception(raised.value))

    with pytest.raises(ConfigError, match=r"args\[0\] \(a _thread\.lock\)"):
        trainctl_lightning.remote(add, threading.Lock(), 1, store=store)
    with pytest.raises(ConfigError, match="unknown launch option 'instance_typo'"):
        trainctl_lightning.remote(add, 1, 2, instance_typo="x")
    assert_nothing_running()


def test_project_modules_import_on_the_instance_from_their_sys_path_entry(
    tmp_path: Path, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A src/ layout: the instance imports the package by reference from the synced src/ folder."""
    package = tmp_path / "proj" / "src" / "srclayout_helpers"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import os\n\ndef where(x):\n    return x * 3, os.getcwd(), __file__\n")
    monkeypatch.chdir(tmp_path / "proj")
    monkeypatch.syspath_prepend(str(tmp_path / "proj" / "src"))
    import srclayout_helpers

    try:
        value, cwd, file = trainctl_lightning.remote(srclayout_helpers.where, 3, store=store, stream=False)
    finally:
        sys.modules.pop("srclayout_helpers", None)
    assert value == 9
    assert file == str(Path(cwd) / "src" / "srclayout_helpers" / "__init__.py"), "imported from the synced copy"
    assert_nothing_running()


# ----------------------------------------------------------------------------- local checks


def test_a_gpu_target_needs_no_gpu_here(models, store: str, capsys) -> None:
    strategy = RemoteStrategy(store=store, accelerator="gpu", devices=2, dry_run=True)
    trainer = pl.Trainer(strategy=strategy, max_steps=3, precision="16-mixed" if torch.cuda.is_available() else "32-true")
    assert isinstance(trainer.accelerator, CPUAccelerator) and trainer.strategy.root_device.type == "cpu"
    trainer.fit(models.Regressor())
    plan = strategy.last_plan
    assert plan is not None and "trainctl_lightning.remote.worker" in " ".join(plan.command)
    assert "dry run of trainer.fit" in capsys.readouterr().out
    assert get_provider("local").list(include_terminated=True) == [] and run_urls_in(store) == []
    assert strategy._trainer_config[1]["max_steps"] == 3  # what the instance's Trainer will get

    with pytest.raises(ConfigError, match=r"Trainer\(devices=2\) with RemoteStrategy.*RemoteStrategy\(devices=2\)"):
        pl.Trainer(strategy=RemoteStrategy(store=store), devices=2)
    with pytest.raises(ConfigError, match="RemoteStrategy\\(accelerator='tpux'\\)"):
        RemoteStrategy(accelerator="tpux")
    with pytest.raises(ConfigError, match="devices=0"):
        RemoteStrategy(devices=0)


def test_lightning_internals_we_rely_on(models) -> None:
    """Fails loudly when a Lightning release moves something remote/_lightning.py relies on."""
    assert lightning.__version__ in SpecifierSet(_lightning.SUPPORTED_LIGHTNING)
    assert {"launch", "kill", "is_interactive_compatible"} <= _lightning.Launcher.__abstractmethods__
    # the Trainer constructor is the env-defaults wrapper, with `self` and `kwargs` in its frame
    init = pl.Trainer.__init__
    assert init.__wrapped__ is not init and {"self", "kwargs"} <= set(init.__code__.co_varnames)
    for entry in _lightning.ENTRIES:
        impl, public = _lightning.impl_parameters(entry), _lightning.public_parameters(entry)
        assert impl and set(impl) <= set(public), entry

    calls = []

    class Recording(_lightning.Launcher):
        is_interactive_compatible = True

        def launch(self, function, *args, trainer=None, **kwargs):
            calls.append((function.__name__, trainer.state.fn, _lightning.entry_arguments(trainer.state.fn.value, args, kwargs)))

        def kill(self, signum):
            pass

    class RecordingStrategy(RemoteStrategy):
        def _configure_launcher(self):
            super()._configure_launcher()
            self._launcher = Recording()

    strategy = RecordingStrategy()
    trainer = pl.Trainer(strategy=strategy, max_steps=7, gradient_clip_val=0.5)
    assert strategy._trainer_config == (pl.Trainer, {"max_steps": 7, "gradient_clip_val": 0.5})
    model = models.Regressor()
    trainer.fit(model, ckpt_path=None)
    trainer.validate(model, verbose=False)
    assert [(name, fn) for name, fn, _ in calls] == [("_fit_impl", TrainerFn.FITTING), ("_validate_impl", TrainerFn.VALIDATING)]
    assert calls[0][2]["model"] is model and "ckpt_path" in calls[0][2] and calls[1][2]["verbose"] is False

    _lightning.set_progress(trainer, global_step=12, current_epoch=3)
    assert (trainer.global_step, trainer.current_epoch) == (12, 3)
    assert inspect.signature(_lightning.captured_trainer_kwargs).parameters == {}


def test_lightning_internals_auto_resume_relies_on(tmp_path: Path) -> None:
    """Fails loudly when Lightning moves the restore CheckpointSync's automatic resume relies on:
    ``Trainer._run`` restores ``ckpt_path`` through the connector's ``_restore_modules_and_callbacks``
    after the ``setup`` hooks, and a path chosen there is restored like ``fit(ckpt_path=...)``."""
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    from tests.helpers.models import TinyRegressor, trainer_kwargs

    method = getattr(_CheckpointConnector, _lightning.RESTORE_METHOD)
    assert next(iter(list(inspect.signature(method).parameters)[1:])) == "checkpoint_path"
    run = inspect.getsource(pl.Trainer._run)
    setup, restore = run.index("_call_setup_hook("), run.index(f"{_lightning.RESTORE_METHOD}(ckpt_path")
    assert setup < restore, "the setup hooks run before the checkpoint is restored"

    first = pl.Trainer(**trainer_kwargs(max_steps=3, limit_val_batches=0), callbacks=[ModelCheckpoint(dirpath=tmp_path)])
    first.fit(TinyRegressor())
    saved = str(tmp_path / "epoch=0-step=3.ckpt")
    asked: list[object] = []

    class Choose(Callback):
        def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
            _lightning.choose_fit_checkpoint(trainer, lambda given: asked.append(given) or saved)

    trainer = pl.Trainer(**trainer_kwargs(max_steps=5, limit_val_batches=0), callbacks=[Choose()])
    model = TinyRegressor()
    trainer.fit(model)
    assert asked == [None], "chosen once, told the user passed no ckpt_path"
    assert trainer.ckpt_path == saved and trainer.global_step == 5
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 5, "loops restored from step 3"
    assert _lightning.RESTORE_METHOD not in vars(trainer._checkpoint_connector), "one call only"
    trainer.validate(model, dataloaders=model.val_dataloader(), verbose=False)
    assert asked == [None] and trainer.ckpt_path is None, "never for validate"

    unused = pl.Trainer(**trainer_kwargs())
    _lightning.choose_fit_checkpoint(unused, lambda given: saved)
    _lightning.clear_fit_checkpoint_choice(unused)
    assert _lightning.RESTORE_METHOD not in vars(unused._checkpoint_connector)


# ----------------------------------------------------------------------------- predict


def test_predict_returns_the_predictions_computed_remotely(models, store, monkeypatch) -> None:
    # keep the run's key after the call, to read what the worker signed
    monkeypatch.setattr(remote_session, "forget_key", lambda run_id: None)
    model = models.Regressor()
    with torch.no_grad():  # weights no fresh Regressor has: the remote run must use the ones sent
        for p in model.parameters():
            p.add_(0.25)
    sent = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = torch.randn(20, 8, generator=torch.Generator().manual_seed(3))
    strategy = RemoteStrategy(store=store, stream=False)
    trainer = pl.Trainer(strategy=strategy, **TRAINER_KWARGS)

    predictions = trainer.predict(model, dataloaders=DataLoader(inputs, batch_size=8))

    run = strategy.remote_run
    assert run is not None and run.phase == "succeeded" and run.run_url.startswith(store)
    assert JobStore(run.run_url).read_state().phase.value == "succeeded"
    # what the instance's worker wrote as its result is what trainer.predict returned here
    raw = RunStore(run.run_url).objects.read(REMOTE_RESULT)
    remote = loads_result(raw, key=load_key(run.run_id), run_id=run.run_id, name=REMOTE_RESULT)
    assert remote.ok and remote.state["fn"] == "predict"
    assert isinstance(predictions, list) and [p.shape for p in predictions] == [(8, 1), (8, 1), (4, 1)]
    assert len(remote.value) == len(predictions)
    for here, there in zip(predictions, remote.value):
        assert torch.equal(here, there)
    # ...and they are the sent model's outputs for these inputs
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(predictions), model(inputs))
    assert trainer.state.fn is TrainerFn.PREDICTING and trainer.state.status is TrainerStatus.FINISHED
    for key, value in model.state_dict().items():
        assert torch.equal(value, sent[key]), "predict does not change the weights"
    assert strategy.instance_id is None
    assert_nothing_running()


# ----------------------------------------------------------------------------- managed runs
@pytest.mark.slow
def test_fit_with_recover_comes_back_after_a_preemption(models, store, monkeypatch) -> None:
    """RemoteStrategy(recover=True): a spot notice ends the first attempt (its worker leaves no
    result), the supervisor starts the next one, CheckpointSync resumes it from the newest
    checkpoint by itself, and fit returns here with the final weights."""
    from trainctl_lightning.jobs.spec import JobPhase
    from trainctl_lightning.metrics.read import read_status
    from trainctl_lightning.testing import LocalIMDS

    with LocalIMDS() as imds:
        monkeypatch.setenv("TRAINCTL_SPOT", "1")
        monkeypatch.setenv("TRAINCTL_IMDS_ENDPOINT", imds.endpoint)
        monkeypatch.setenv("TRAINCTL_SPOT_POLL_S", "0.1")
        strategy = RemoteStrategy(store=store, recover=True, max_restarts=2)
        trainer = pl.Trainer(
            strategy=strategy,
            **{
                **TRAINER_KWARGS,
                "max_steps": 30,
                "val_check_interval": 100,
                "limit_val_batches": 0,
                "logger": MetricsReporter(status_interval=0.2, flush_interval=0.2),
            },
            callbacks=[CheckpointSync()],
        )
        errors: list[BaseException] = []

        def fit() -> None:
            try:
                trainer.fit(models.Regressor(step_sleep=0.3))
            except BaseException as exc:  # asserted below
                errors.append(exc)

        thread = threading.Thread(target=fit)
        thread.start()
        try:
            run_url = wait_until(lambda: next(iter(run_urls_in(store)), None), 120, what="the remote run")
            jobs = JobStore(run_url)
            wait_until(lambda: (s := read_status(run_url)) is not None and (s.global_step or 0) >= 3, 120, what="step 3")
            imds.notice(in_s=1)
            # once the agent has seen it, the notice goes: the replacement is another instance
            wait_until(lambda: (s := jobs.read_state()) is not None and s.interruption is not None, 60, what="the notice seen")
            imds.clear()
            wait_until(lambda: (s := jobs.read_state()) is not None and len(s.attempts) >= 2, 60, what="the second attempt")
        finally:
            thread.join(timeout=180)
    assert not thread.is_alive() and errors == []
    state = jobs.read_state()
    assert state is not None and state.phase is JobPhase.SUCCEEDED
    assert [a.ended for a in state.attempts] == ["preempted", "finished"]
    assert state.attempts[1].resumed_from is not None
    assert trainer.global_step == 30
    assert_nothing_running()
