"""A hostile store against remote calls: planted and tampered pickles, weights that are code,
credentials in storage options, remote exceptions of any type, and where the run's key lives.

Each case checks that no foreign code ran (a marker file a planted pickle would create stays
absent), that the user got one line naming the object, and that the key never reached the store.
"""

from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import wait_until
from tests.helpers.leftovers import assert_nothing_running
from trainctl_lightning import CheckpointSync, MetricsReporter, RunStore
from trainctl_lightning.errors import (
    AuthenticationError,
    ConfigError,
    IntegrityError,
    RemoteError,
    RemoteTraceback,
)
from trainctl_lightning.remote.function import remote
from trainctl_lightning.remote.payload import (
    FunctionPayload,
    dumps_payload,
    dumps_result,
    loads_payload,
    loads_result,
    sign_payload,
)
from trainctl_lightning.remote.session import RemoteRun, remote_exception
from trainctl_lightning.remote.strategy import (
    RemoteStrategy,
    _load_weights,
    load_state_dict,
    prune_weights_cache,
)
from trainctl_lightning.remote.worker import _failure
from trainctl_lightning.runkey import (
    RUN_KEY_ENV,
    forget_key,
    keys_dir,
    load_key,
    new_key,
    save_key,
    sign,
    verify,
)
from trainctl_lightning.store.layout import REMOTE_PAYLOAD, REMOTE_RESULT, run_url_in


class Planted:
    """What an attacker writes: unpickling it creates ``path`` (stands in for running any code)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


# ----------------------------------------------------------------------------- remote functions
# Defined here: tests/faults is outside the synced directory, so they travel by value.


def wait_for_planted_result() -> str:
    """Runs remotely: returns only once something else has put a result.pkl into this run."""
    path = Path(os.environ["TRAINCTL_RUN_URL"].removeprefix("file://")) / REMOTE_RESULT
    deadline = time.monotonic() + 60
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return "finished"


def wait_for_go(go: str) -> int:
    """Runs remotely: holds the run open until the test says go."""
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.05)
    return 7


def raise_unbuildable(message: str) -> None:
    class NeedsTwo(Exception):  # defined in a function: no import path leads to it here
        def __init__(self, a: str, b: str) -> None:
            super().__init__(a, b)

    raise NeedsTwo(message, "second")


def raise_value_error(message: str) -> None:
    raise ValueError(message)


# ----------------------------------------------------------------------------- the launcher's side


def test_a_result_planted_while_a_remote_call_runs_is_refused_and_never_unpickled(
    file_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "planted-code-ran"
    store_root = Path(file_store.removeprefix("file://"))
    planted: list[Path] = []

    def plant() -> None:  # a store writer racing the call: as soon as the run's folder appears
        payload = wait_until(lambda: next(iter(store_root.glob(f"*/{REMOTE_PAYLOAD}")), None), timeout=60, what="the run")
        assert payload is not None
        target = payload.parent.parent / REMOTE_RESULT
        target.write_bytes(pickle.dumps(Planted(marker)))
        planted.append(target)

    planter = threading.Thread(target=plant, daemon=True)
    planter.start()
    try:
        with pytest.raises(AuthenticationError) as refused:
            remote(wait_for_planted_result, store=file_store, stream=False)
    finally:
        planter.join(timeout=60)
    message = one_line(refused.value)
    assert planted and message.startswith(f"refusing {run_url_in(file_store, planted[0].parent.parent.name)}/{REMOTE_RESULT}")
    assert "not signed" in message
    assert not marker.exists(), "the planted pickle was unpickled"
    assert list(keys_dir().glob("*.key")) == [], "the run's key is forgotten once the call is over"
    assert_nothing_running()


def test_remote_exceptions_come_back_as_their_type_only_when_safe(
    file_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="plain bad value") as raised:
        remote(raise_value_error, "plain bad value", store=file_store, stream=False)
    assert type(raised.value) is ValueError and isinstance(raised.value.__cause__, RemoteTraceback)

    with pytest.raises(RemoteError) as unsafe:
        remote(raise_unbuildable, "needs two", store=file_store, stream=False)
    error = unsafe.value
    assert error.type_name.endswith("raise_unbuildable.<locals>.NeedsTwo")
    assert "needs two" in error.remote_message and "in raise_unbuildable" in error.remote_traceback
    assert "in raise_unbuildable" in "".join(traceback.format_exception(error))
    assert_nothing_running()


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (ValueError("bad value 3"), ValueError),
        (KeyError("missing-key"), KeyError),
        (ConfigError("bad setting x=1; set it to 2"), ConfigError),
        (AuthenticationError("refusing x"), AuthenticationError),
        (SystemExit(3), RemoteError),  # not an Exception: never rebuilt
        (subprocess.CalledProcessError(1, ["false"]), RemoteError),  # needs more than a message
    ],
)
def test_a_remote_exception_travels_as_text(raised: BaseException, expected: type[BaseException]) -> None:
    key, run_id = new_key(), "exc-run"
    try:
        raise raised
    except BaseException as error:
        result = _failure(error)
    back = loads_result(dumps_result(result, key=key, run_id=run_id), key=key, run_id=run_id, name="r")
    assert back.traceback and "test_a_remote_exception_travels_as_text" in back.traceback
    exc = remote_exception(back, RemoteRun(run_id=run_id, run_url="file:///s/exc-run", store_url="file:///s"))
    assert type(exc) is expected
    assert isinstance(exc.__cause__, RemoteTraceback)
    if isinstance(exc, RemoteError):
        assert exc.type_name == f"{type(raised).__module__}.{type(raised).__qualname__}"
        assert exc.remote_message == str(raised)
    else:
        assert exc.args == raised.args


def test_an_exception_type_not_imported_here_comes_back_as_text() -> None:
    key = new_key()
    try:
        raise ValueError("from a module we never imported")
    except ValueError as error:
        result = _failure(error)
    result.error_module, result.error_type = "not_imported_here_mod", "not_imported_here_mod.Boom"
    back = loads_result(dumps_result(result, key=key, run_id="r1"), key=key, run_id="r1", name="r")
    exc: Any = remote_exception(back, RemoteRun(run_id="r1", run_url="file:///s/r1", store_url="file:///s"))
    assert type(exc) is RemoteError and exc.type_name == "not_imported_here_mod.Boom"
    assert "not_imported_here_mod" not in sys.modules


def test_results_are_refused_unless_signed_for_this_run_and_purpose(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    key, run_id = new_key(), "result-run"
    good = dumps_result(_failure(RuntimeError("x")), key=key, run_id=run_id)
    name = f"file:///s/{run_id}/{REMOTE_RESULT}"
    cases = {
        "a plain pickle": pickle.dumps(Planted(marker)),
        "another key": dumps_result(_failure(RuntimeError("x")), key=new_key(), run_id=run_id),
        "another run": dumps_result(_failure(RuntimeError("x")), key=key, run_id="other-run"),
        "a payload replayed as a result": sign(key, pickle.dumps(Planted(marker)), purpose="payload", run_id=run_id),
        "a changed body": good[:-3] + b"xyz",
        "a forged header": b"trainctl-signed/1 result " + b"0" * 64 + b"\n" + pickle.dumps(Planted(marker)),
        "a tag that is not hex": "trainctl-signed/1 result \u00e9t\u00e9\n".encode() + pickle.dumps(Planted(marker)),
        "a header without a newline": b"trainctl-signed/1 result " + b"0" * 200,
    }
    for what, blob in cases.items():
        with pytest.raises(AuthenticationError) as refused:
            loads_result(blob, key=key, run_id=run_id, name=name)
        assert one_line(refused.value).startswith(f"refusing {name}"), what
    with pytest.raises(AuthenticationError, match="no key"):
        loads_result(good, key=None, run_id=run_id, name=name)
    assert not marker.exists()
    assert loads_result(good, key=key, run_id=run_id, name=name).error_message == "x"  # the control


# ----------------------------------------------------------------------------- the instance's side


def _worker(run_url: str, key: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != RUN_KEY_ENV}
    if key is not None:
        env[RUN_KEY_ENV] = key
    return subprocess.run(
        [sys.executable, "-m", "trainctl_lightning.remote.worker", run_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_worker_refuses_a_payload_not_signed_with_the_run_key(file_store: str, tmp_path: Path) -> None:
    """A real worker process: nothing in a payload runs unless it is signed with the key it was given."""
    marker = tmp_path / "payload-code-ran"
    data = dumps_payload({"fn": open}, FunctionPayload(fn=open, args=(str(marker), "w")), tmp_path)
    key = new_key()

    def run(case: str, blob_for: str | None, worker_key: str | None) -> tuple[subprocess.CompletedProcess[str], str]:
        run_id = f"worker-{case}"
        run_url = run_url_in(file_store, run_id)
        if blob_for == "unsigned":
            blob = data
        elif blob_for == "result":
            blob = sign(key, data, purpose="result", run_id=run_id)
        elif blob_for == "other-run":
            blob = sign_payload(data, key=key, run_id="another-run")
        else:
            blob = sign_payload(data, key=key, run_id=run_id)
        RunStore(run_url).objects.write(REMOTE_PAYLOAD, blob, create_only=True)
        return _worker(run_url, worker_key), run_url

    for case, blob_for, worker_key, says in [
        ("unsigned", "unsigned", key, "it is not signed"),
        ("wrong-key", "signed", new_key(), "does not match"),
        ("as-result", "result", key, "signed as a 'result' object"),
        ("other-run", "other-run", key, "does not match"),
        ("no-key", "signed", None, "no key"),
    ]:
        proc, run_url = run(case, blob_for, worker_key)
        assert proc.returncode == 2, (case, proc.stderr)
        assert proc.stderr.count("\n") == 1 and says in proc.stderr and REMOTE_PAYLOAD in proc.stderr, (case, proc.stderr)
        assert not marker.exists(), f"{case}: the payload ran"
        raw = RunStore(run_url).objects.read(REMOTE_RESULT)
        if worker_key is None:
            assert raw is None, "without a key the worker cannot sign a result"
        elif worker_key == key:
            assert raw is not None  # the launcher gets the refusal as one line
            exc = remote_exception(
                loads_result(raw, key=key, run_id=f"worker-{case}", name="r"),
                RemoteRun(run_id=f"worker-{case}", run_url=run_url, store_url=file_store),
            )
            assert type(exc) is AuthenticationError and says in one_line(exc)

    proc, _ = run("control", "signed", key)  # signed with the run's key: it runs
    assert proc.returncode == 0, proc.stderr
    assert marker.exists()


# ----------------------------------------------------------------------------- weights


def test_final_weights_that_are_code_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "weights-code-ran"
    as_torch, as_pickle = tmp_path / "torch.ckpt", tmp_path / "pickle.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": Planted(marker)}, as_torch)
    as_pickle.write_bytes(pickle.dumps(Planted(marker)))
    for path in (as_torch, as_pickle):
        with pytest.raises(IntegrityError) as refused:
            load_state_dict(path, name=f"s3://b/run/checkpoints/x/{path.name}")
        message = one_line(refused.value)
        assert message.startswith(f"refusing to load s3://b/run/checkpoints/x/{path.name}") and "weights_only=False" in message
        assert not marker.exists()
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 1, "hyper_parameters": {"lr": 0.1}}, good)
    assert torch.equal(load_state_dict(good, name="good")["w"], torch.ones(2))


def test_a_final_checkpoint_replaced_in_the_store_is_refused(file_store: str, tmp_path: Path) -> None:
    """The result names the files the run published, with their sha256: a manifest that lists others is refused."""
    run_id = "weights-run"
    store = RunStore(run_url_in(file_store, run_id))
    marker = tmp_path / "replaced-code-ran"
    evil = tmp_path / "final.ckpt"
    evil.write_bytes(pickle.dumps(Planted(marker)))
    manifest = store.publish_checkpoint([evil], name="final.ckpt", global_step=1)
    record = RemoteRun(run_id=run_id, run_url=store.url, store_url=file_store)
    final = {"store_url": store.url, "id": manifest.id, "url": store.checkpoint_url(manifest), "files": {"final.ckpt": "0" * 64}}
    model = torch.nn.Linear(2, 1)
    with pytest.raises(AuthenticationError) as refused:
        _load_weights(model, final, record, cache_runs=2)  # type: ignore[arg-type]
    assert one_line(refused.value).startswith(f"refusing {final['url']}")
    # the files match what the run reported, but they are not tensors: weights_only refuses them
    final["files"] = {e.path: e.sha256 for e in manifest.files}
    with pytest.raises(IntegrityError, match="refusing to load"):
        _load_weights(model, final, record, cache_runs=2)  # type: ignore[arg-type]
    assert not marker.exists()


def test_the_remote_weights_cache_keeps_the_newest_runs(tmp_path: Path) -> None:
    root = tmp_path / "cache" / "remote"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not ours")
    now = time.time()
    for i, name in enumerate(["run-a", "run-b", "run-c", "run-d"]):
        (root / name / "ckpt").mkdir(parents=True)
        (root / name / "ckpt" / "final.ckpt").write_bytes(b"w" * 10)
        os.utime(root / name, (now - 100 + i, now - 100 + i))
    (root / "link").symlink_to(outside, target_is_directory=True)
    os.utime(root / "run-a", (now, now))  # newest by time, but run-b was just loaded
    removed = prune_weights_cache(root, keep=2, current="run-b")
    assert sorted(p.name for p in removed) == ["run-c", "run-d"]
    assert sorted(p.name for p in root.iterdir()) == ["link", "run-a", "run-b"]
    assert (outside / "keep.txt").read_text() == "not ours"
    prune_weights_cache(root, keep=0)
    assert [p.name for p in root.iterdir()] == ["link"]
    with pytest.raises(ConfigError, match="cache_runs=-1"):
        RemoteStrategy(cache_runs=-1)


# ----------------------------------------------------------------------------- secrets


def test_storage_options_credentials_never_reach_the_payload(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secrets = ["AKIA-FAKE-ACCESS-1", "fake-secret-value-2", "fake-session-token-3", "fake-password-4"]
    options = {
        "key": secrets[0],
        "secret": secrets[1],
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "aws_session_token": secrets[2]},
        "password": secrets[3],
        "anon": False,
    }
    sync = CheckpointSync("s3://bucket/run", storage_options=options, check_store=False)
    reporter = MetricsReporter("s3://bucket/run", storage_options=options)
    caplog.set_level("INFO")
    data = dumps_payload({"sync": sync, "reporter": reporter}, FunctionPayload(fn=len, args=(sync, reporter)), tmp_path)
    for secret in secrets:
        assert secret.encode() not in data, secret
        assert secret not in caplog.text, "values are never logged"
    assert "client_kwargs.aws_session_token" in caplog.text and "secret" in caplog.text
    shipped_sync, shipped_reporter = loads_payload(data).args
    expected = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "anon": False}
    assert shipped_sync.storage_options == expected and shipped_reporter.storage_options == expected
    assert sync.storage_options == options, "the callback here keeps its credentials"


def test_run_keys_are_private_and_never_reach_the_store(file_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    go = tmp_path / "go"
    seen: dict[str, object] = {}

    def watch() -> None:  # while the call runs: the launcher's copy of the key
        path = wait_until(lambda: next(iter(keys_dir().glob("*.key")), None), timeout=60, what="the run's key file")
        assert path is not None
        seen["key"] = path.read_text()
        seen["mode"] = stat.S_IMODE(path.stat().st_mode)
        seen["dir_mode"] = stat.S_IMODE(keys_dir().stat().st_mode)
        go.touch()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert remote(wait_for_go, str(go), store=file_store, stream=False) == 7
    finally:
        watcher.join(timeout=60)
    key = seen.get("key")
    assert isinstance(key, str) and len(key) == 64
    assert (seen["mode"], seen["dir_mode"]) == (0o600, 0o700)
    assert list(keys_dir().glob("*.key")) == [], "forgotten after the call"
    home = Path(os.environ["TRAINCTL_HOME"])
    stored = files_under(Path(file_store.removeprefix("file://"))) + files_under(home)
    assert stored, "the run left files to search"
    for path in stored:
        assert key.encode() not in path.read_bytes(), f"the run's key is in {path}"
    assert_nothing_running()


def test_saved_keys_are_private_files() -> None:
    path = save_key("key-run-1", "k" * 64)
    assert load_key("key-run-1") == "k" * 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in keys_dir().iterdir()] == ["key-run-1.key"], "no temporary file left behind"
    forget_key("key-run-1")
    forget_key("key-run-1")  # idempotent
    assert load_key("key-run-1") is None
    with pytest.raises(ConfigError, match="run id '../escape' is not valid"):
        save_key("../escape", "k")
    key = new_key()
    assert verify(key, sign(key, b"body", purpose="payload"), purpose="payload", name="n") == b"body"
