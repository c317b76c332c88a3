"""What travels to the instance (``<run>/remote/payload.pkl``) and back (``<run>/remote/result.pkl``).

Objects are pickled with cloudpickle. Classes and functions defined in ``__main__`` (a script or
a notebook) go by value; everything else goes by reference and is imported on the instance,
where the synced project directory is the working directory. A module that the instance could
not import (neither installed nor inside the synced project) is shipped by value too.

Nothing read from the store is unpickled before it is proven to come from the run: both files
travel in a signed envelope (:mod:`trainctl_lightning.runkey`, HMAC-SHA256 with the run's key,
which never passes through the store), checked on the raw bytes first.

- The payload, inside its envelope, is an outer plain pickle of builtins (a format tag, the
  ``sys.path`` entries the worker must add, and the cloudpickled body), so the worker can set
  up imports before it unpickles anything of the user's.
- The result, inside its envelope, is data: one line of JSON (outcome, metrics, trainer state,
  the final checkpoint's reference and sha256, a remote exception as type name, message and
  traceback text), then the return value. The return value of ``fit``/``validate``/``test`` is
  JSON too; only ``predict`` and ``remote(fn)`` return values, which may be any object, follow
  cloudpickled after the JSON line.

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import site
import sys
import sysconfig
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle

from trainctl_lightning.errors import ConfigError, IntegrityError
from trainctl_lightning.runkey import sign, verify
from trainctl_lightning.store.credentials import without_credentials

__all__ = [
    "PAYLOAD_FORMAT",
    "RESULT_FORMAT",
    "FunctionPayload",
    "RemoteResult",
    "TrainerPayload",
    "dumps_payload",
    "dumps_result",
    "loads_payload",
    "loads_result",
    "scalar_metrics",
    "sign_payload",
    "unpicklable_error",
    "verify_payload",
]

log = logging.getLogger(__name__)

PAYLOAD_FORMAT = "trainctl.remote-payload/1"
RESULT_FORMAT = "trainctl.remote-result/2"
#: How a result's return value travels: nothing, in the JSON line, or cloudpickled after it.
_VALUE_ENCODINGS = ("none", "json", "cloudpickle")
#: Modules the instance always has: the agent itself runs trainctl_lightning.
_ALWAYS_THERE = ("trainctl_lightning",)
#: How deep the search for an unpicklable attribute goes before it reports what it has.
_MAX_WALK_DEPTH = 12


# ----------------------------------------------------------------------------- records
@dataclass
class TrainerPayload:
    """One ``Trainer.<entry>`` call, to be replayed on the instance."""

    entry: str
    """``fit``, ``validate``, ``test`` or ``predict``."""
    trainer_class: type
    trainer_kwargs: dict[str, Any]
    """The Trainer's constructor arguments as the user gave them, without ``strategy``."""
    entry_kwargs: dict[str, Any]
    """Keyword arguments of ``Trainer.<entry>`` (model, dataloaders or datamodule, ckpt_path, ...)."""
    accelerator: Any = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    """The Trainer's ``num_nodes`` on the instances (a multi-node run under torchrun)."""
    strategy: Any = "auto"
    """The strategy the Trainer uses on the instance."""
    project_dir: str | None = None
    """The launching machine's project directory: local paths under it (a ``ModelCheckpoint``
    dirpath, which Lightning makes absolute when it is created) mean the same place in the
    synced copy on the instance."""


@dataclass
class FunctionPayload:
    """One plain function call, ``fn(*args, **kwargs)``, to run on the instance."""

    fn: Any
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RemoteResult:
    """What the worker reports back. Metric values are plain floats."""

    ok: bool
    value: Any = None
    """The entry's (or function's) return value."""
    error_type: str | None = None
    """``module.QualName`` of the exception the remote call raised."""
    error_module: str | None = None
    """The module of that exception's class (``error_type`` without the qualified name)."""
    error_message: str | None = None
    """``str()`` of the exception, plus a hint when the worker has one."""
    error_arg: str | None = None
    """The message to rebuild the exception with: its only argument when that is a string, else ``str(exc)``."""
    traceback: str | None = None
    """The remote traceback, formatted."""
    state: dict[str, str | None] = field(default_factory=dict)
    """``trainer.state`` as ``{"fn", "status", "stage"}`` values."""
    global_step: int | None = None
    current_epoch: int | None = None
    callback_metrics: dict[str, float] = field(default_factory=dict)
    logged_metrics: dict[str, float] = field(default_factory=dict)
    final_checkpoint: dict[str, Any] | None = None
    """``{"store_url", "id", "url", "global_step", "files"}`` of the checkpoint holding the final
    weights; ``files`` maps each file's path to its sha256, so the launcher can tell the files it
    downloads are the ones the run published."""
    best_model_path: str | None = None
    """The best checkpoint's path on the instance (``ModelCheckpoint.best_model_path``)."""
    best_checkpoint_url: str | None = None
    """The same checkpoint's URL in the store, when CheckpointSync published it."""
    host: str | None = None


# ----------------------------------------------------------------------------- pickling
class _RecordingPickler(cloudpickle.Pickler):
    """A cloudpickle Pickler that notes the module of every class and function pickled by reference."""

    def __init__(self, file: io.BytesIO, modules: set[str]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._modules = modules

    def reducer_override(self, obj: Any) -> Any:
        fresh = _fresh_reduce(obj)
        if fresh is not None:
            return fresh
        reduced = super().reducer_override(obj)
        if reduced is NotImplemented and isinstance(obj, (type, types.FunctionType)):
            module = getattr(obj, "__module__", None)
            if isinstance(module, str):
                self._modules.add(module)
        return reduced


def _fresh_reduce(obj: Any) -> tuple[Any, tuple[Any, ...]] | None:
    """Our own objects that hold threads and locks travel as their constructor arguments.

    A ``MetricsReporter`` made here (never started) is rebuilt on the instance with the same
    settings, less credentials in its storage options; its background writer starts there.
    """
    reporter = sys.modules.get("trainctl_lightning.metrics.reporter")
    if reporter is not None and type(obj) is reporter.MetricsReporter:
        options = {
            "storage_options": without_credentials(obj.storage_options, repr(obj)),
            "flush_interval": obj.flush_interval,
            "flush_every": obj.flush_every,
            "status_interval": obj.status_interval,
            "prefix": obj.prefix,
        }
        return _rebuild, (type(obj), (obj.url,), options)
    return None


def _rebuild(cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return cls(*args, **kwargs)


def _cloudpickle(obj: Any) -> tuple[bytes, set[str]]:
    buffer, modules = io.BytesIO(), set[str]()
    _RecordingPickler(buffer, modules).dump(obj)
    return buffer.getvalue(), modules


def dumps_payload(roots: dict[str, Any], body: Any, project_dir: str | os.PathLike[str]) -> bytes:
    """Pickle ``body`` for the instance; ``roots`` names its parts for error messages.

    Modules referenced by the body that the instance cannot import (not installed, not in
    ``project_dir``) are shipped by value.

    Raises:
        ConfigError: something in the body cannot be pickled; the message names the object path,
            e.g. ``model.loader_lock (a _thread.lock)``.
    """
    project = Path(project_dir).resolve()
    shipped: list[types.ModuleType] = []
    try:
        for _ in range(8):  # shipping a module by value can reveal more references
            try:
                data, modules = _cloudpickle(body)
            except Exception as exc:
                raise unpicklable_error(roots, exc) from None
            missing = [m for m in _outside_modules(modules, project) if m not in shipped]
            if not missing:
                return pickle.dumps(
                    {"format": PAYLOAD_FORMAT, "sys_path": _project_sys_path(modules, project), "body": data},
                    protocol=pickle.HIGHEST_PROTOCOL,
                )
            for module in missing:
                log.info(
                    "trainctl: shipping module %s (%s) by value: it is neither installed nor inside the synced project %s",
                    module.__name__,
                    getattr(module, "__file__", "?"),
                    project,
                )
                cloudpickle.register_pickle_by_value(module)
                shipped.append(module)
        raise ConfigError(f"could not settle which modules to ship by value (last: {[m.__name__ for m in shipped]})")
    finally:
        for module in shipped:
            cloudpickle.unregister_pickle_by_value(module)


def sign_payload(data: bytes, *, key: str, run_id: str) -> bytes:
    """A payload from :func:`dumps_payload` in its signed envelope, as written to ``remote/payload.pkl``."""
    return sign(key, data, purpose="payload", run_id=run_id)


def verify_payload(raw: bytes, *, key: str | None, run_id: str, name: str) -> bytes:
    """The payload inside a signed ``remote/payload.pkl``; see :func:`trainctl_lightning.runkey.verify`.

    Raises:
        AuthenticationError: not signed with the run's key; nothing was unpickled.
    """
    return verify(key, raw, purpose="payload", name=name, run_id=run_id)


def loads_payload(raw: bytes) -> Any:
    """The body of a payload written by :func:`dumps_payload`, after adding its sys.path entries.

    Only for bytes that :func:`verify_payload` returned: this unpickles them.
    """
    outer = pickle.loads(raw)
    if not isinstance(outer, dict) or outer.get("format") != PAYLOAD_FORMAT:
        raise ConfigError(f"not a trainctl remote payload (format {outer.get('format') if isinstance(outer, dict) else None!r})")
    for entry in reversed(outer.get("sys_path", [])):
        path = os.path.abspath(entry)
        if path not in sys.path:
            sys.path.insert(0, path)
    return pickle.loads(outer["body"])


def dumps_result(result: RemoteResult, *, key: str, run_id: str, value_as: str = "cloudpickle") -> bytes:
    """``result`` as signed bytes for ``remote/result.pkl``.

    Args:
        result: what the worker reports.
        key: the run's key (from ``$TRAINCTL_RUN_KEY``).
        run_id: the run it belongs to.
        value_as: ``json`` for a Trainer entry's return value (``fit``/``validate``/``test``: plain
            data); ``cloudpickle`` for values that may be any object (``predict``, ``remote(fn)``).
    """
    header, tail = _result_header(result), b""
    if result.value is None:
        header["value_encoding"] = "none"
    elif value_as == "json":
        try:
            header["value"] = json.loads(json.dumps(result.value))
            header["value_encoding"] = "json"
        except (TypeError, ValueError) as exc:  # the run's outcome must still come back
            header["value_encoding"] = "none"
            header["error_message"] = (result.error_message or "") + f" (return value could not be sent back: {exc})"
    else:
        try:
            tail = cloudpickle.dumps(result.value, protocol=pickle.HIGHEST_PROTOCOL)
            header["value_encoding"] = "cloudpickle"
        except Exception as exc:  # a return value that cannot travel must not hide the run's outcome
            header["value_encoding"] = "none"
            header["error_message"] = (result.error_message or "") + f" (return value could not be sent back: {exc})"
    line = json.dumps(header, separators=(",", ":"), allow_nan=True).encode()
    return sign(key, line + b"\n" + tail, purpose="result", run_id=run_id)


def loads_result(raw: bytes, *, key: str | None, run_id: str, name: str) -> RemoteResult:
    """The result in a signed ``remote/result.pkl``, checked before anything in it is read.

    Args:
        raw: the object's bytes as read from the store.
        key: the run's key; ``name``: the object, for messages; ``run_id``: the run it must belong to.

    Raises:
        AuthenticationError: not signed with the run's key (planted, changed, or another run's);
            nothing in it was loaded.
        IntegrityError: signed, but not a result this version understands.
    """
    body = verify(key, raw, purpose="result", name=name, run_id=run_id)
    line, _, tail = body.partition(b"\n")
    try:
        header = json.loads(line)
    except ValueError as exc:
        raise IntegrityError(
            f"{name} is signed but its header is not JSON ({exc}); the worker and launcher versions may differ"
        ) from None
    if not isinstance(header, dict) or header.get("format") != RESULT_FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise IntegrityError(
            f"{name} is a remote result of format {found!r}, not {RESULT_FORMAT!r}: install the same trainctl-lightning "
            "version here and on the instance"
        )
    encoding = header.get("value_encoding", "none")
    if encoding not in _VALUE_ENCODINGS:
        raise IntegrityError(f"{name}: unknown return value encoding {encoding!r}")
    value: Any = None
    if encoding == "json":
        value = header.get("value")
    elif encoding == "cloudpickle":
        value = pickle.loads(tail)  # authenticated above: written by this run's worker
    return RemoteResult(
        ok=bool(header.get("ok")),
        value=value,
        error_type=_opt_str(header.get("error_type")),
        error_module=_opt_str(header.get("error_module")),
        error_message=_opt_str(header.get("error_message")),
        error_arg=_opt_str(header.get("error_arg")),
        traceback=_opt_str(header.get("traceback")),
        state={str(k): _opt_str(v) for k, v in _dict(header.get("state")).items()},
        global_step=_opt_int(header.get("global_step")),
        current_epoch=_opt_int(header.get("current_epoch")),
        callback_metrics=_floats(header.get("callback_metrics")),
        logged_metrics=_floats(header.get("logged_metrics")),
        final_checkpoint=_dict(header.get("final_checkpoint")) or None,
        best_model_path=_opt_str(header.get("best_model_path")),
        best_checkpoint_url=_opt_str(header.get("best_checkpoint_url")),
        host=_opt_str(header.get("host")),
    )


def _result_header(result: RemoteResult) -> dict[str, Any]:
    return {
        "format": RESULT_FORMAT,
        "ok": result.ok,
        "error_type": result.error_type,
        "error_module": result.error_module,
        "error_message": result.error_message,
        "error_arg": result.error_arg,
        "traceback": result.traceback,
        "state": dict(result.state),
        "global_step": result.global_step,
        "current_epoch": result.current_epoch,
        "callback_metrics": dict(result.callback_metrics),
        "logged_metrics": dict(result.logged_metrics),
        "final_checkpoint": result.final_checkpoint,
        "best_model_path": result.best_model_path,
        "best_checkpoint_url": result.best_checkpoint_url,
        "host": result.host,
    }


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _floats(value: Any) -> dict[str, float]:
    return {str(k): float(v) for k, v in _dict(value).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _module_root(module: types.ModuleType) -> tuple[str, Path] | None:
    """``(top-level name, file)`` of a module backed by a file, else None (builtin, namespace)."""
    top = sys.modules.get(module.__name__.split(".", 1)[0], module)
    file = getattr(top, "__file__", None) or getattr(module, "__file__", None)
    return (top.__name__, Path(file).resolve()) if file else None


def _installed_prefixes() -> list[Path]:
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]}
    try:
        paths.update(site.getsitepackages())
        paths.add(site.getusersitepackages())
    except AttributeError:  # some virtualenvs ship an old site.py without these
        pass
    return [Path(p).resolve() for p in paths if p]


def _outside_modules(names: set[str], project: Path) -> list[types.ModuleType]:
    """Modules among ``names`` whose code the instance will not have."""
    prefixes = _installed_prefixes()
    outside: dict[str, types.ModuleType] = {}
    for name in names:
        module = sys.modules.get(name)
        if module is None or name == "__main__" or name.split(".", 1)[0] in _ALWAYS_THERE:
            continue
        root = _module_root(module)
        if root is None:
            continue
        top_name, file = root
        if file.is_relative_to(project) or any(file.is_relative_to(p) for p in prefixes):
            continue
        top = sys.modules.get(top_name)
        if top is not None:
            outside[top_name] = top
    return list(outside.values())


def _project_sys_path(names: set[str], project: Path) -> list[str]:
    """``sys.path`` entries, relative to the project, from which referenced project modules were imported."""
    prefixes = _installed_prefixes()  # a virtualenv inside the project is not project code
    entries: list[str] = []
    for name in names:
        file = getattr(sys.modules.get(name), "__file__", None)
        if not file or name == "__main__":
            continue
        path = Path(file).resolve()
        if not path.is_relative_to(project) or any(path.is_relative_to(p) for p in prefixes):
            continue
        # the folder `import a.b.c` was resolved from: up one level per dotted part
        depth = name.count(".") + (1 if path.name == "__init__.py" else 0)
        base = path.parents[depth]
        if not base.is_relative_to(project):
            continue
        rel = base.relative_to(project).as_posix()
        if rel != "." and rel not in entries:
            entries.append(rel)
    return entries


# ----------------------------------------------------------------------------- errors
def unpicklable_error(roots: dict[str, Any], exc: BaseException) -> ConfigError:
    """A ConfigError naming the first object under ``roots`` that cannot be pickled."""
    for name, obj in roots.items():
        found = _find_unpicklable(obj, name, set(), 0)
        if found is not None:
            path, culprit, error = found
            return ConfigError(
                f"{path} (a {_type_name(culprit)}) cannot be sent to the remote instance: {error}. "
                "Create it on the instance instead (in setup() or a hook), or exclude it from pickling "
                "(__getstate__)"
            )
    return ConfigError(f"the objects for the remote instance cannot be pickled: {type(exc).__name__}: {exc}")


def _find_unpicklable(obj: Any, path: str, seen: set[int], depth: int) -> tuple[str, Any, BaseException] | None:
    try:
        _cloudpickle(obj)
        return None
    except Exception as exc:
        error = exc
    if depth < _MAX_WALK_DEPTH:
        for child_path, child in _children(obj, path):
            if id(child) in seen:
                continue
            seen.add(id(child))
            found = _find_unpicklable(child, child_path, seen, depth + 1)
            if found is not None:
                return found
    return path, obj, error


def _children(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, (str, bytes, int, float, bool, type(None))) or _is_tensor(obj):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield f"{path}[{key!r}]", value
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for i, value in enumerate(obj):
            yield f"{path}[{i}]", value
        return
    if isinstance(obj, types.FunctionType):
        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or ()):
            try:
                yield f"{path}.<closure {name}>", cell.cell_contents
            except ValueError:  # an empty cell
                continue
        return
    state = getattr(obj, "__dict__", None)
    if isinstance(state, dict):
        modules = state.get("_modules")
        if isinstance(modules, dict):  # torch.nn.Module: show children as model.encoder.layer
            for name, child in modules.items():
                yield f"{path}.{name}", child
        for key, value in state.items():
            if key not in ("_modules", "_parameters", "_buffers"):
                yield f"{path}.{key}", value
    for slot in getattr(type(obj), "__slots__", ()):
        if isinstance(slot, str) and hasattr(obj, slot):
            yield f"{path}.{slot}", getattr(obj, slot)


def _is_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


# ----------------------------------------------------------------------------- metrics
def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of a Lightning metrics dict, as floats (tensors, numpy and Python numbers)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            if hasattr(value, "numel") and value.numel() != 1:
                continue
            number = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError, RuntimeError):
            continue
        out[str(key)] = number  # NaN and inf included: a diverged run should look diverged
    return out
