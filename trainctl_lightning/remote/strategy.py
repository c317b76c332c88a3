"""``RemoteStrategy``: ``trainer.fit`` (and validate/test/predict) runs on a remote instance.

Lightning hands every entry point to ``strategy.launcher.launch(trainer._fit_impl, ...)``; the
launcher installed here ships the call instead of running it: the model, the data, the
callbacks, the loggers and the Trainer's own constructor arguments are pickled together, the
worker (:mod:`trainctl_lightning.remote.worker`) rebuilds the Trainer on the instance and makes
the same call, and the outcome comes back into the local ``trainer`` and ``model``.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.accelerators import AcceleratorRegistry, CPUAccelerator
from lightning.pytorch.accelerators.accelerator import Accelerator
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy, Strategy
from lightning.pytorch.trainer.states import (
    RunningStage,
    TrainerFn,
    TrainerState,
    TrainerStatus,
)
from typing_extensions import override

from trainctl_lightning.errors import AuthenticationError, ConfigError, IntegrityError, RunFailedError
from trainctl_lightning.jobs.spec import check_nodes
from trainctl_lightning.paths import make_private_dir
from trainctl_lightning.remote import _lightning
from trainctl_lightning.remote.payload import (
    RemoteResult,
    TrainerPayload,
    dumps_payload,
)
from trainctl_lightning.remote.session import (
    RemoteCall,
    RemoteOptions,
    RemoteRun,
    remote_exception,
)
from trainctl_lightning.store import RunStore, layout

if TYPE_CHECKING:
    from trainctl_lightning.launch import LaunchPlan

__all__ = ["RemoteStrategy", "load_state_dict", "prune_weights_cache", "weights_cache_dir"]

log = logging.getLogger(__name__)

#: Trainer arguments that describe the remote hardware: they belong on RemoteStrategy.
_HARDWARE_ARGS = {"devices": "auto", "num_nodes": 1}


class RemoteStrategy(SingleDeviceStrategy):
    r"""Run ``trainer.fit`` / ``validate`` / ``test`` / ``predict`` on a remote instance.

    Add it to an existing Trainer; nothing else in the script or notebook changes. The call
    returns as if it had run here: the model holds the trained weights (from the final
    checkpoint the run published), and ``trainer.callback_metrics``, ``trainer.state``,
    ``trainer.global_step`` and ``trainer.checkpoint_callback.best_model_path`` (the best
    checkpoint's store URL when ``CheckpointSync`` published it) are set. A remote exception is
    raised here, with the remote traceback as its cause. The remote output is printed as it
    arrives; Ctrl-C cancels the remote run and ends the instance.

    Locally the Trainer runs on CPU and touches no GPU: ``accelerator`` and ``devices`` given here
    are what the instance uses, so a laptop without a GPU can target a GPU instance.

    Args:
        provider: where the instance comes from (``local``, ``aws``); default from ``trainctl.toml``.
        store: store URL under which the run is kept (``<store>/<run id>``); default from settings.
        instance_type: provider machine type, e.g. ``g5.xlarge``.
        accelerator: the Trainer's ``accelerator`` on the instance (``"gpu"``, ``"cpu"``, ``"auto"``).
        devices: the Trainer's ``devices`` on the instance (on each node, with ``num_nodes``).
        num_nodes: instances to train across: that many are created together (all or none) and
            ``fit`` runs on every one under ``torchrun``, as ``Trainer(num_nodes=num_nodes)``
            (``docs/multi-node.md``). Global rank zero publishes checkpoints and reports metrics.
        spot: ask for a spot instance.
        keep_alive: keep the instance after the call; the next call through this strategy
            reuses it (:attr:`instance_id`). End it with :meth:`terminate_instance`.
        env: environment for the job, ``{"NAME": "value"}``; a name mapped to ``None`` is
            forwarded from this environment and never stored.
        profile: settings profile from ``trainctl.toml``.
        project_dir: the directory synced to the instance (default: the current directory).
            Modules in it are imported there by name; classes from ``__main__`` or a notebook
            travel by value.
        remote_strategy: the Trainer's ``strategy`` on the instance (``"auto"``: Lightning's choice).
        stream: print the remote output while waiting.
        dry_run: check everything (the objects pickle, the launch resolves) and print the plan
            (:attr:`last_plan`) instead of running anything.
        cache_runs: how many runs' downloaded final weights stay in the local cache
            (``<cache dir>/remote/<run id>/``, the cache dir being ``$TRAINCTL_CACHE_DIR`` or
            ``~/.cache/trainctl``); older ones are deleted after each ``fit``. ``0`` deletes the
            file as soon as the weights are loaded.
        \**launch_options: further :func:`trainctl_lightning.launch.launch` options, fields of
            :class:`~trainctl_lightning.launch.LaunchRequest` and :class:`~trainctl_lightning.config.Settings`
            (``region``, ``max_hours``, ``setup``, ``forward_env``, ``env_mode``, ``tags``...).

    Nothing read back from the store is trusted: the result must be signed with the run's key
    (:mod:`trainctl_lightning.runkey`) and the final weights are read with ``weights_only=True``.

    Raises:
        ConfigError: an invalid argument (here); at Trainer construction, hardware arguments given
            to the Trainer instead of here; at ``fit``, an object that cannot be sent (named, e.g.
            ``model.loader_lock (a _thread.lock)``), before anything is created.
        AuthenticationError: the run's result or final checkpoint in the store is not what the
            run wrote (planted or replaced); nothing in it was loaded.
        IntegrityError: the final checkpoint holds objects other than tensors and plain data.

    Example::

        strategy = RemoteStrategy(provider="aws", instance_type="g5.xlarge", accelerator="gpu", devices=1)
        trainer = Trainer(max_epochs=3, strategy=strategy, callbacks=[CheckpointSync("s3://bucket/runs/exp1")])
        trainer.fit(model, datamodule=dm)      # runs on the instance, returns with the trained weights
        print(trainer.callback_metrics, strategy.remote_run.run_url)
    """

    strategy_name = "remote"

    def __init__(
        self,
        provider: str | None = None,
        store: str | None = None,
        instance_type: str | None = None,
        accelerator: str | Accelerator = "auto",
        devices: int | str | list[int] = "auto",
        spot: bool | None = None,
        keep_alive: bool = False,
        env: dict[str, str | None] | list[str] | None = None,
        profile: str | None = None,
        *,
        project_dir: str | os.PathLike[str] | None = None,
        remote_strategy: str | Strategy = "auto",
        stream: bool = True,
        dry_run: bool = False,
        cache_runs: int = 2,
        num_nodes: int = 1,
        **launch_options: Any,
    ) -> None:
        # Locally everything runs on the CPU: the accelerator set on the strategy wins over
        # Trainer(accelerator="auto"), so no GPU is probed or needed here.
        super().__init__(device="cpu", accelerator=CPUAccelerator())
        if isinstance(accelerator, str):
            names = {"auto", "gpu", *AcceleratorRegistry.available_accelerators()}
            if accelerator.lower() not in names:
                raise ConfigError(f"RemoteStrategy(accelerator={accelerator!r}): choose one of {', '.join(sorted(names))}")
        elif not isinstance(accelerator, Accelerator):
            raise ConfigError(f"RemoteStrategy(accelerator={accelerator!r}): give a name like 'gpu' or an Accelerator")
        if not _valid_devices(devices):
            raise ConfigError(
                f"RemoteStrategy(devices={devices!r}): give 'auto', a count >= 1, -1 (all), or a list of device indices"
            )
        check_nodes(num_nodes)
        if num_nodes > 1 and not (
            devices == "auto" or (isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1)
        ):
            raise ConfigError(
                f"RemoteStrategy(num_nodes={num_nodes}, devices={devices!r}): across nodes, give devices as a count per "
                "node (torchrun starts that many processes on each), or 'auto' for one per GPU"
            )
        for name in ("nodes", "nproc_per_node"):
            if name in launch_options:
                raise ConfigError(f"RemoteStrategy({name}=...): use num_nodes= and devices= (the Trainer's names)")
        if num_nodes > 1:
            launch_options["nodes"] = num_nodes
            if devices != "auto":
                launch_options["nproc_per_node"] = devices
        if not isinstance(cache_runs, int) or isinstance(cache_runs, bool) or cache_runs < 0:
            raise ConfigError(f"RemoteStrategy(cache_runs={cache_runs!r}): must be an integer >= 0")
        self.cache_runs = cache_runs
        self.remote_accelerator = accelerator
        self.remote_devices = devices
        self.remote_num_nodes = num_nodes
        self.remote_strategy = remote_strategy
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
        """Where the latest call ran: run id and URL, instance, final and best checkpoint URLs."""
        self.last_checkpoint_url: str | None = None
        """The final checkpoint of the latest fit: what a later ``ckpt_path="last"`` means."""
        self.last_plan: LaunchPlan | None = None
        """With ``dry_run``: the launch plan of the latest call."""
        self._trainer_config: tuple[type, dict[str, Any]] | None = None

    def __repr__(self) -> str:
        return (
            f"RemoteStrategy(provider={self.options.provider!r}, instance_type={self.options.instance_type!r}, "
            f"accelerator={self.remote_accelerator!r}, devices={self.remote_devices!r}"
            + (f", num_nodes={self.remote_num_nodes}" if self.remote_num_nodes > 1 else "")
            + ")"
        )

    @property
    def keep_alive(self) -> bool:
        return self.options.keep_alive

    @keep_alive.setter
    def keep_alive(self, value: bool) -> None:
        self.options.keep_alive = bool(value)

    def terminate_instance(self) -> None:
        """End the instance kept by ``keep_alive`` (no-op without one). Idempotent."""
        if self.instance_id is None:
            return
        from trainctl_lightning.launch import provider_for

        provider_for(self.options.provider, self.instance_id).terminate(self.instance_id)
        self.instance_id = None

    @override
    def _configure_launcher(self) -> None:
        # Called by the Trainer's constructor: the moment its arguments can be captured.
        captured = _lightning.captured_trainer_kwargs()
        if captured is None:
            raise ConfigError("RemoteStrategy works through a Trainer: pass it as Trainer(strategy=RemoteStrategy(...))")
        trainer_class, kwargs = captured
        for name, default in _HARDWARE_ARGS.items():
            if name in kwargs and kwargs[name] != default:
                raise ConfigError(
                    f"Trainer({name}={kwargs[name]!r}) with RemoteStrategy: the instance's hardware is set on the "
                    f"strategy, e.g. RemoteStrategy({name}={kwargs[name]!r}); the local Trainer runs on CPU"
                )
        if trainer_class.__init__ is not pl.Trainer.__init__:  # type: ignore[misc]  # the class, not an instance
            # A subclass with its own constructor: its arguments are not the ones captured.
            log.warning(
                "trainctl: %s overrides Trainer.__init__; the instance builds a plain lightning Trainer with the "
                "captured arguments",
                trainer_class.__qualname__,
            )
            trainer_class = pl.Trainer
        self._trainer_config = (
            trainer_class,
            {k: v for k, v in kwargs.items() if k not in ("strategy", "accelerator", *_HARDWARE_ARGS)},
        )
        self._launcher = _RemoteLauncher(self)


class _RemoteLauncher(_lightning.Launcher):
    """Runs the Trainer entry it is handed on a remote instance instead of in this process."""

    def __init__(self, strategy: RemoteStrategy) -> None:
        self._strategy = strategy
        self._call: RemoteCall | None = None

    @property
    @override
    def is_interactive_compatible(self) -> bool:
        return True  # nothing is forked or spawned here: notebooks work

    @override
    def kill(self, signum: int) -> None:
        call = self._call
        if call is not None and call.run is not None:
            call.run.cancel(f"the launching process got signal {signum}")

    @override
    def launch(self, function: Any, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any) -> Any:
        strategy = self._strategy
        if trainer is None or trainer.state.fn is None or strategy._trainer_config is None:
            raise ConfigError("RemoteStrategy can only launch Trainer.fit/validate/test/predict")
        entry = trainer.state.fn.value
        trainer_class, trainer_kwargs = strategy._trainer_config
        call_kwargs = _lightning.entry_arguments(entry, args, kwargs)
        model_provided = call_kwargs.get("model") is not None
        if not model_provided:
            call_kwargs["model"] = trainer.lightning_module
        model = call_kwargs["model"]

        remote = RemoteCall(strategy.options, stem=f"{_script_stem()}-{entry}")
        upload = self._resolve_ckpt_path(trainer, call_kwargs, model_provided, remote)
        payload = TrainerPayload(
            entry=entry,
            trainer_class=trainer_class,
            trainer_kwargs=trainer_kwargs,
            entry_kwargs=call_kwargs,
            accelerator=strategy.remote_accelerator,
            devices=strategy.remote_devices,
            num_nodes=strategy.remote_num_nodes,
            strategy=strategy.remote_strategy,
            project_dir=str(strategy.options.resolved_project_dir()),
        )
        roots = {**{k: v for k, v in call_kwargs.items() if v is not None}, **trainer_kwargs}
        data = dumps_payload(roots, payload, strategy.options.resolved_project_dir())

        if strategy.dry_run:
            strategy.last_plan = remote.plan(instance_id=strategy.instance_id)
            print(f"trainctl: dry run of trainer.{entry} ({len(data)} bytes of objects):\n{strategy.last_plan.describe()}")
            trainer.state = TrainerState(fn=trainer.state.fn, status=TrainerStatus.FINISHED, stage=None)
            return None
        if upload is not None:
            remote.upload_checkpoint(*upload)
        self._call = remote
        try:
            result = remote.execute(data, instance_id=strategy.instance_id)
        finally:
            self._call = None
            record = remote.record
            if record is not None:
                strategy.remote_run = record
                if strategy.keep_alive:
                    strategy.instance_id = record.instance_id
                elif record.instance_id == strategy.instance_id:
                    strategy.instance_id = None
        assert remote.record is not None
        if not result.ok:
            raise remote_exception(result, remote.record)
        self._apply(trainer, model, entry, result, remote.record)
        return result.value

    # ----------------------------------------------------------------- helpers
    def _resolve_ckpt_path(
        self, trainer: pl.Trainer, call_kwargs: dict[str, Any], model_provided: bool, remote: RemoteCall
    ) -> tuple[str, str] | None:
        """Make ``ckpt_path`` mean on the instance what it means here. Returns a local file to upload."""
        if "ckpt_path" not in call_kwargs:
            return None
        ckpt = call_kwargs["ckpt_path"]
        last = self._strategy.last_checkpoint_url
        best = trainer.checkpoint_callback.best_model_path if isinstance(trainer.checkpoint_callback, ModelCheckpoint) else ""
        if ckpt is None and not model_provided and trainer.state.fn != TrainerFn.FITTING and best:
            ckpt = "best"  # what Lightning does for trainer.validate() without a model
        if ckpt == "best":
            if not best:
                raise ConfigError(
                    "ckpt_path='best': no best checkpoint is known here; fit first with a ModelCheckpoint that "
                    "monitors a metric (and CheckpointSync, so the instance can read it), or pass a checkpoint URL"
                )
            call_kwargs["ckpt_path"] = best
        elif ckpt == "last":
            if not last:
                raise ConfigError("ckpt_path='last': no earlier remote fit through this strategy; pass a checkpoint URL")
            call_kwargs["ckpt_path"] = last
        elif isinstance(ckpt, (str, os.PathLike)) and "://" not in str(ckpt) and Path(ckpt).is_file():
            # A file on this machine: publish it into the run and let the instance read it from there.
            local = str(Path(ckpt).resolve())
            checkpoint_id = RunStore.new_checkpoint_id(Path(local).name, None)
            call_kwargs["ckpt_path"] = RunStore(remote.run_url).url_of(layout.checkpoint_object(checkpoint_id, Path(local).name))
            return local, checkpoint_id
        return None

    def _apply(self, trainer: pl.Trainer, model: pl.LightningModule, entry: str, result: RemoteResult, record: RemoteRun) -> None:
        """Bring the remote outcome into the local trainer and model."""
        record.final_checkpoint_url = (result.final_checkpoint or {}).get("url")
        record.best_checkpoint_url = result.best_checkpoint_url
        if entry == "fit":
            if result.final_checkpoint is None:
                raise RunFailedError(
                    f"run {record.run_id} finished without a final checkpoint; the local model was not updated",
                    run_id=record.run_id,
                )
            _load_weights(model, result.final_checkpoint, record, self._strategy.cache_runs)
            self._strategy.last_checkpoint_url = record.final_checkpoint_url
            _lightning.set_progress(trainer, result.global_step or 0, result.current_epoch or 0)
            if isinstance(trainer.checkpoint_callback, ModelCheckpoint) and (
                result.best_checkpoint_url or result.best_model_path
            ):
                trainer.checkpoint_callback.best_model_path = result.best_checkpoint_url or result.best_model_path or ""
        state = result.state
        trainer.state = TrainerState(
            fn=TrainerFn(state["fn"]) if state.get("fn") else trainer.state.fn,
            status=TrainerStatus(state["status"]) if state.get("status") else TrainerStatus.FINISHED,
            stage=RunningStage(state["stage"]) if state.get("stage") else None,
        )
        for local, remote_values in (
            (trainer.callback_metrics, result.callback_metrics),
            (trainer.logged_metrics, result.logged_metrics),
        ):
            local.clear()
            local.update({k: torch.tensor(v) for k, v in remote_values.items()})


def weights_cache_dir() -> Path:
    """Where RemoteStrategy keeps the final weights it downloads: ``<cache dir>/remote/<run id>/``."""
    from trainctl_lightning.checkpoint.resume import default_cache_dir

    return default_cache_dir() / "remote"


def _load_weights(model: pl.LightningModule, final: dict[str, Any], record: RemoteRun, cache_runs: int) -> None:
    store = RunStore(final["store_url"])
    manifest = store.get_checkpoint(final["id"])
    name = str(final.get("url") or f"{store.url} checkpoint {manifest.id}")
    signed = final.get("files")
    published = {entry.path: entry.sha256 for entry in manifest.files}
    if not isinstance(signed, dict) or published != signed:
        raise AuthenticationError(
            f"refusing {name}: its manifest does not list the files run {record.run_id} reported publishing (replaced "
            "in the store after the run wrote it); the local model was not updated. Check who can write to the store"
        )
    root = weights_cache_dir()
    make_private_dir(root / record.run_id)  # the user's weights: private (0700), like every cache of ours
    try:
        path = store.download_checkpoint(manifest, root / record.run_id / manifest.id)
        state_dict = load_state_dict(path, name=name)
    finally:
        prune_weights_cache(root, keep=cache_runs, current=record.run_id)
    # Not strict, like Lightning's own spawn launcher: configure_model() may have added layers remotely.
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        log.warning(
            "trainctl: the final weights of run %s did not match the local model exactly (missing: %s; unexpected: %s)",
            record.run_id,
            ", ".join(missing[:5]) or "none",
            ", ".join(unexpected[:5]) or "none",
        )


def load_state_dict(path: str | os.PathLike[str], *, name: str) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint file, read with ``weights_only=True``.

    Only tensors and plain data are read: an object that would need code to rebuild (a pickle
    calling anything) is refused, so nothing in the file runs here.

    Raises:
        IntegrityError: the file holds something other than tensors and plain data, or no
            ``state_dict``; one line naming ``name``.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refusing a global, or not a torch file at all
        detail = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), "")
        detail = detail or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise IntegrityError(
            f"refusing to load {name}: it is not plain tensors and data ({detail[:300]}); nothing in it was run. "
            "If you trust whoever wrote it, load it yourself with torch.load(..., weights_only=False)"
        ) from None
    state_dict = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise IntegrityError(f"refusing to load {name}: it has no state_dict (not a Lightning checkpoint)")
    return state_dict


def prune_weights_cache(root: Path, *, keep: int, current: str | None = None) -> list[Path]:
    """Delete all but the ``keep`` newest run folders under ``root`` (by modification time).

    ``current`` (the run just loaded) counts as the newest. Only folders directly under
    ``root`` are touched; symbolic links are left alone. Returns what was deleted.
    """
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink()]

    def newest_first(path: Path) -> tuple[bool, float]:
        return (path.name == current, path.stat().st_mtime)

    removed: list[Path] = []
    for path in sorted(runs, key=newest_first, reverse=True)[keep:]:
        shutil.rmtree(path, ignore_errors=False)
        removed.append(path)
    if removed:
        log.info("trainctl: pruned %d cached remote weights folder(s) under %s (cache_runs=%d)", len(removed), root, keep)
    return removed


def _valid_devices(devices: Any) -> bool:
    if devices == "auto" or devices == -1:
        return True
    if isinstance(devices, bool):
        return False
    if isinstance(devices, int):
        return devices >= 1
    if isinstance(devices, str):
        return all(part.strip().lstrip("-").isdigit() for part in devices.split(",") if part.strip())
    if isinstance(devices, (list, tuple)):
        return bool(devices) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
    return False


def _script_stem() -> str:
    """What ran the call: the script's name, or ``notebook`` in an interactive session."""
    main = sys.modules.get("__main__")
    file = getattr(main, "__file__", None)
    return Path(file).stem if file else "notebook"
