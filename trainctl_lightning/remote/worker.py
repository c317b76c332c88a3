"""What runs on the instance: ``python -m trainctl_lightning.remote.worker <run url>``.

Reads ``<run>/remote/payload.pkl``, makes the call it describes (a Trainer entry or a plain
function) and writes ``<run>/remote/result.pkl``. The agent starts it with the synced project as
the working directory and ``$TRAINCTL_RUN_URL`` and ``$TRAINCTL_RUN_KEY`` set. The payload's
signature is checked with that key on the raw bytes before anything in it is unpickled, and the
result is signed with it (:mod:`trainctl_lightning.runkey`). Exit status: 0 when the call
succeeded, 1 when it raised (the result carries the exception), 2 when there was nothing to run
or the payload was refused (not signed with the run's key), 3 when a result was already there.

After ``fit``, the final weights are always in a published checkpoint: the newest one a
``CheckpointSync`` published at the final step, else one the worker saves and publishes to the
run itself (``final.ckpt``).

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from trainctl_lightning.errors import AuthenticationError, ConflictError
from trainctl_lightning.remote.payload import (
    FunctionPayload,
    RemoteResult,
    TrainerPayload,
    dumps_result,
    loads_payload,
    scalar_metrics,
    verify_payload,
)
from trainctl_lightning.runkey import RUN_KEY_ENV
from trainctl_lightning.store import RunStore, layout

__all__ = ["main", "run_function", "run_trainer"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_url = argv[0] if argv else os.environ.get(layout.RUN_URL_ENV)
    if not run_url:
        print(f"usage: python -m {__spec__.name if __spec__ else 'trainctl_lightning.remote.worker'} RUN_URL", file=sys.stderr)
        return 2
    store = RunStore(run_url)
    run_id = layout.run_id_of(store.url)
    key = os.environ.get(RUN_KEY_ENV) or None
    raw = store.objects.read(layout.REMOTE_PAYLOAD)
    if raw is None:
        print(f"trainctl worker: no {layout.REMOTE_PAYLOAD} in {store.url}; nothing to run", file=sys.stderr)
        return 2
    try:
        data = verify_payload(raw, key=key, run_id=run_id, name=store.url_of(layout.REMOTE_PAYLOAD))
    except AuthenticationError as exc:
        print(f"trainctl worker: {exc}", file=sys.stderr, flush=True)
        if key is not None:  # the launcher gets the refusal as a signed result (without a key it cannot)
            _write_result(store, _failure(exc), key, run_id, "json")
        return 2
    assert key is not None  # verify_payload refuses without one
    value_as = "cloudpickle"
    try:
        payload = loads_payload(data)
    except BaseException as exc:
        result = _failure(exc, hint=_import_hint(exc))
    else:
        if isinstance(payload, TrainerPayload):
            result, terminated = run_trainer(payload, store)
            if terminated and os.environ.get(layout.RECOVER_ENV) == "1":
                # A managed run's attempt was stopped (its instance is going away): the next attempt
                # resumes the same call and writes the result; this one leaves none behind.
                print("trainctl worker: stopped by SIGTERM; the run's next attempt carries on", file=sys.stderr, flush=True)
                return 128 + signal.SIGTERM
            value_as = "cloudpickle" if payload.entry == "predict" else "json"  # fit/validate/test return data
        elif isinstance(payload, FunctionPayload):
            result = run_function(payload)
        else:
            result = _failure(TypeError(f"unknown payload {type(payload).__name__}"))
    if not _write_result(store, result, key, run_id, value_as):
        return 3
    if not result.ok:
        print(result.traceback or result.error_message, file=sys.stderr, flush=True)
    return 0 if result.ok else 1


def _write_result(store: RunStore, result: RemoteResult, key: str, run_id: str, value_as: str) -> bool:
    """Write the signed result (rank zero only). False when a result.pkl was already there."""
    if not _is_rank_zero():
        return True
    try:
        store.objects.write(
            layout.REMOTE_RESULT, dumps_result(result, key=key, run_id=run_id, value_as=value_as), create_only=True
        )
    except ConflictError:
        print(
            f"trainctl worker: {store.url_of(layout.REMOTE_RESULT)} was already there before this worker finished; "
            "something other than this run wrote it (the launcher refuses it unless it is signed with the run's key)",
            file=sys.stderr,
            flush=True,
        )
        return False
    return True


def run_function(payload: FunctionPayload) -> RemoteResult:
    try:
        value = payload.fn(*payload.args, **payload.kwargs)
    except BaseException as exc:
        return _failure(exc)
    return RemoteResult(ok=True, value=value, host=socket.gethostname())


def run_trainer(payload: TrainerPayload, store: RunStore) -> tuple[RemoteResult, bool]:
    """Rebuild the Trainer with the instance's hardware, make the call, report what came of it,
    and whether it ended because the process received SIGTERM (Lightning's ``received_sigterm``)."""
    trainer = None
    try:
        kwargs = dict(payload.trainer_kwargs)
        kwargs.update(accelerator=payload.accelerator, devices=payload.devices, strategy=payload.strategy)
        if getattr(payload, "num_nodes", 1) > 1:  # payloads pickled before num_nodes existed have none
            kwargs["num_nodes"] = payload.num_nodes
        trainer = payload.trainer_class(**kwargs)
        _reroot_checkpoint_dirs(trainer, payload.project_dir)
        value = getattr(trainer, payload.entry)(**payload.entry_kwargs)
        final = _final_checkpoint(trainer, store) if payload.entry == "fit" else None
        result = RemoteResult(ok=True, value=value, final_checkpoint=final, host=socket.gethostname())
        _describe(trainer, result)
        return result, False
    except BaseException as exc:
        result = _failure(exc)
    if trainer is not None:
        try:
            _describe(trainer, result)
        except Exception as describe_error:  # the original error is what the caller needs
            print(f"trainctl worker: could not read the trainer's state after the failure: {describe_error!r}", file=sys.stderr)
    return result, bool(trainer is not None and getattr(trainer, "received_sigterm", False))


def _reroot_checkpoint_dirs(trainer: Any, project_dir: str | None) -> None:
    """``ModelCheckpoint(dirpath="checkpoints")`` was made absolute on the launching machine;
    on the instance it means ``checkpoints`` in the synced copy (the working directory)."""
    if not project_dir:
        return
    root = os.path.realpath(project_dir)
    for cb in trainer.checkpoint_callbacks:
        dirpath = getattr(cb, "dirpath", None)
        if isinstance(dirpath, str) and os.path.isabs(dirpath):
            real = os.path.realpath(dirpath)
            if real == root or real.startswith(root + os.sep):
                cb.dirpath = os.path.join(os.getcwd(), os.path.relpath(real, root))


def _describe(trainer: Any, result: RemoteResult) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    state = trainer.state
    result.state = {
        "fn": state.fn.value if state.fn else None,
        "status": state.status.value,
        "stage": state.stage.value if state.stage else None,
    }
    result.global_step = int(trainer.global_step)
    result.current_epoch = int(trainer.current_epoch)
    result.callback_metrics = scalar_metrics(trainer.callback_metrics)
    result.logged_metrics = scalar_metrics(trainer.logged_metrics)
    checkpointer = trainer.checkpoint_callback
    if isinstance(checkpointer, ModelCheckpoint) and checkpointer.best_model_path:
        result.best_model_path = checkpointer.best_model_path
        result.best_checkpoint_url = _published_url(trainer, checkpointer.best_model_path)


def _final_checkpoint(trainer: Any, store: RunStore) -> dict[str, Any] | None:
    """The published checkpoint that holds the final weights, publishing one if none does."""
    # Weights only change at optimizer steps: a checkpoint taken at the final step holds them.
    found = None
    for sync in _syncs(trainer):  # CheckpointSync publishes from global rank zero only
        manifest = sync.last_published
        if manifest is not None and manifest.global_step == trainer.global_step:
            found = _reference(sync.store, manifest)
            break
    found = trainer.strategy.broadcast(found, src=0)  # every rank decides alike: saving is collective
    if found is not None:
        return found
    with tempfile.TemporaryDirectory(prefix="trainctl-final-") as folder:
        path = os.path.join(folder, "final.ckpt")
        trainer.save_checkpoint(path)  # every rank takes part (sharded strategies gather here)
        if not trainer.is_global_zero:
            return None
        manifest = store.publish_checkpoint(
            [path],
            name="final.ckpt",
            epoch=trainer.current_epoch,
            global_step=trainer.global_step,
            metrics=scalar_metrics(trainer.callback_metrics),
            source={"local_path": path, "written_by": "trainctl remote worker"},
        )
    return _reference(store, manifest)


def _reference(store: RunStore, manifest: Any) -> dict[str, Any]:
    return {
        "store_url": store.url,
        "id": manifest.id,
        "url": store.checkpoint_url(manifest),
        "global_step": manifest.global_step,
        # signed with the result: the launcher checks what it downloads against these
        "files": {entry.path: entry.sha256 for entry in manifest.files},
    }


def _published_url(trainer: Any, local_path: str) -> str | None:
    """The store URL of the checkpoint a CheckpointSync published from ``local_path``."""
    target = os.path.realpath(local_path)
    for sync in _syncs(trainer):
        for manifest in reversed(sync.store.list_checkpoints()):
            source = manifest.source.get("local_path")
            if source and os.path.realpath(source) == target:
                return _reference(sync.store, manifest)["url"]
    return None


def _syncs(trainer: Any) -> list[Any]:
    from trainctl_lightning.checkpoint.sync import CheckpointSync

    return [cb for cb in trainer.callbacks if isinstance(cb, CheckpointSync) and cb.store is not None]


def _failure(exc: BaseException, hint: str = "") -> RemoteResult:
    """The exception as text: the launcher rebuilds it only from its type name and message."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    args = exc.args
    return RemoteResult(
        ok=False,
        error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
        error_module=type(exc).__module__,
        error_message=str(exc) + (f" ({hint})" if hint else ""),
        error_arg=args[0] if len(args) == 1 and isinstance(args[0], str) else str(exc),
        traceback=text + (f"\n{hint}\n" if hint else ""),
        host=socket.gethostname(),
    )


def _import_hint(exc: BaseException) -> str:
    if isinstance(exc, ModuleNotFoundError):
        return (
            f"module {exc.name!r} is not importable on the instance (working directory {Path.cwd()}): put it inside "
            "the synced project directory, or install it there (trainctl.toml setup / requirements)"
        )
    return ""


def _is_rank_zero() -> bool:
    # torchrun (a multi-node run) sets every process's global RANK; Lightning's subprocess launcher
    # re-runs this module for the other local ranks (DDP) with LOCAL_RANK and NODE_RANK only.
    if "RANK" in os.environ:
        return os.environ["RANK"] == "0"
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(main())
