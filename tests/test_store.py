"""The run store contract, the same on file://, memory:// and a real S3 endpoint."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import pytest

from trainctl_lightning import (
    CheckpointNotFoundError,
    ConfigError,
    ConflictError,
    IntegrityError,
    RunStore,
    StoreError,
)
from trainctl_lightning.retry import RetryPolicy, is_transient
from trainctl_lightning.store.layout import CHECKPOINT_MANIFEST as MANIFEST_NAME
from trainctl_lightning.store.manifest import CheckpointManifest


def _ckpt_file(tmp_path, name: str, size: int = 3 * 2**20, seed: int = 0) -> str:
    path = tmp_path / name
    path.write_bytes(bytes((i * 7 + seed) % 251 for i in range(256)) * (size // 256))
    return str(path)


def _put(store: RunStore, path: str, data: bytes) -> None:
    """Write an object behind the store's back, as a crash or a bad actor would."""
    store.objects.fs.makedirs(store.objects.fs._parent(path), exist_ok=True)
    store.objects.fs.pipe_file(path, data)
    store.objects.fs.invalidate_cache(path)


def test_publish_then_list_latest_download_verify(store_url, tmp_path):
    store = RunStore(store_url)
    store.check_writable()
    assert store.list_checkpoints() == []
    assert store.latest_checkpoint() is None

    first = store.publish_checkpoint(
        [_ckpt_file(tmp_path, "epoch=0-step=10.ckpt")],
        epoch=0,
        global_step=10,
        monitor="val_loss",
        monitor_value=0.5,
        metrics={"val_loss": 0.5},
    )
    second = store.publish_checkpoint([_ckpt_file(tmp_path, "last.ckpt", seed=1)], epoch=1, global_step=20)

    listed = store.list_checkpoints()
    assert [m.id for m in listed] == [first.id, second.id]
    assert store.latest_checkpoint() == second
    assert listed[0].monitor == "val_loss" and listed[0].monitor_value == 0.5
    assert listed[0].files[0].size == 3 * 2**20
    assert listed[0].package_version and listed[0].created_at

    # lookups by name, by id, and "latest"
    assert store.get_checkpoint("epoch=0-step=10.ckpt") == first
    assert store.get_checkpoint("epoch=0-step=10") == first
    assert store.get_checkpoint(second.id) == second
    assert store.get_checkpoint() == second
    with pytest.raises(CheckpointNotFoundError, match="nope.*names there: epoch=0-step=10.ckpt, last.ckpt"):
        store.get_checkpoint("nope")

    out = store.download_checkpoint(first, tmp_path / "dl")
    assert out == tmp_path / "dl" / "epoch=0-step=10.ckpt"
    assert out.read_bytes() == (tmp_path / "epoch=0-step=10.ckpt").read_bytes()
    store.verify_checkpoint(first)


def test_manifest_is_written_last_and_describes_every_file(store_url, tmp_path, monkeypatch):
    store = RunStore(store_url)
    reader = RunStore(store_url)
    # What another reader sees the moment each data object has landed: no checkpoint yet.
    seen_after_data_upload: list[tuple[str, list[str]]] = []
    real_upload = store.objects.upload

    def recording_upload(local, rel, **kwargs):
        result = real_upload(local, rel, **kwargs)
        seen_after_data_upload.append((rel.rsplit("/", 1)[-1], [c.id for c in reader.list_checkpoints()]))
        return result

    monkeypatch.setattr(store.objects, "upload", recording_upload)
    m = store.publish_checkpoint([_ckpt_file(tmp_path, "a.ckpt")], epoch=2, global_step=7)
    assert seen_after_data_upload == [("a.ckpt", [])]  # data first: uploaded while no manifest existed
    assert [c.id for c in reader.list_checkpoints()] == [m.id]  # manifest last: visible once publish returns
    raw = json.loads(store.objects.fs.cat_file(store.objects.path("checkpoints", m.id, MANIFEST_NAME)))
    assert raw["format"] == "trainctl.checkpoint/1"
    assert raw["name"] == "a.ckpt" and raw["epoch"] == 2 and raw["global_step"] == 7
    assert raw["files"] == [{"path": "a.ckpt", "size": 3 * 2**20, "sha256": m.files[0].sha256}]
    assert m.id.startswith("0000000007-a-")


def test_data_without_manifest_does_not_exist(store_url, tmp_path):
    store = RunStore(store_url)
    published = store.publish_checkpoint([_ckpt_file(tmp_path, "good.ckpt")], global_step=1)
    # an upload that died before its manifest: data objects only
    orphan = store.objects.path("checkpoints", "0000000099-half-deadbeef", "half.ckpt")
    _put(store, orphan, b"partial data")
    assert [m.id for m in store.list_checkpoints()] == [published.id]
    assert store.latest_checkpoint() == published


def test_corrupt_object_is_refused_naming_it(store_url, tmp_path):
    store = RunStore(store_url)
    m = store.publish_checkpoint([_ckpt_file(tmp_path, "x.ckpt")], global_step=3)
    obj = store.objects.path("checkpoints", m.id, "x.ckpt")
    data = bytearray(store.objects.fs.cat_file(obj))
    data[1000] ^= 0xFF
    _put(store, obj, bytes(data))
    with pytest.raises(IntegrityError, match=r"x\.ckpt fails its checksum"):
        store.verify_checkpoint(m)
    with pytest.raises(IntegrityError, match=r"x\.ckpt fails its checksum"):
        store.download_checkpoint(m, tmp_path / "dl")
    assert not any((tmp_path / "dl").iterdir()), "a refused download must leave nothing behind"


def test_truncated_and_missing_objects_are_refused(store_url, tmp_path):
    store = RunStore(store_url)
    m = store.publish_checkpoint([_ckpt_file(tmp_path, "t.ckpt")], global_step=3)
    obj = store.objects.path("checkpoints", m.id, "t.ckpt")
    _put(store, obj, store.objects.fs.cat_file(obj)[:1000])
    with pytest.raises(IntegrityError, match=r"t\.ckpt is 1000 bytes but its manifest says 3145728"):
        store.download_checkpoint(m, tmp_path / "dl")
    store.objects.fs.rm_file(obj)
    with pytest.raises(IntegrityError, match="missing from the store"):
        store.verify_checkpoint(m)


def test_manifest_is_create_only(store_url, tmp_path):
    store = RunStore(store_url)
    m = store.publish_checkpoint([_ckpt_file(tmp_path, "c.ckpt")], global_step=5)
    before = store.objects.fs.cat_file(store.objects.path("checkpoints", m.id, MANIFEST_NAME))
    with pytest.raises(ConflictError, match="already exists.*not overwritten"):
        store.publish_checkpoint([_ckpt_file(tmp_path, "c.ckpt", seed=9)], global_step=5, checkpoint_id=m.id)
    assert store.objects.fs.cat_file(store.objects.path("checkpoints", m.id, MANIFEST_NAME)) == before
    store.verify_checkpoint(store.get_checkpoint(m.id))


def test_backend_create_only_write_never_replaces(store_url):
    """The conditional write itself: If-None-Match on S3, link(2) locally, exclusive mode in memory."""
    store = RunStore(store_url)
    rel = f"checkpoints/0000000001-x-00000000/{MANIFEST_NAME}"
    store.objects.write(rel, b"first", create_only=True)
    with pytest.raises(ConflictError, match="already exists; not overwritten"):
        store.objects.write(rel, b"second", create_only=True)
    assert store.objects.fs.cat_file(store.objects.path(rel)) == b"first"


def _race_create_only(store: RunStore, rel: str, data: Callable[[int], bytes], writers: int = 4) -> list[str]:
    """``writers`` threads released at once, each a create-only write of ``data(i)`` to ``rel``:
    their outcomes, sorted ("lost" for a ConflictError, "won" otherwise)."""
    results: list[str] = []
    barrier = threading.Barrier(writers)

    def write(i: int) -> None:
        barrier.wait()
        try:
            store.objects.write(rel, data(i), create_only=True)
            results.append("won")
        except ConflictError:
            results.append("lost")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(results)


def test_two_writers_racing_for_one_manifest_one_wins(store_url, tmp_path):
    if store_url.startswith("memory://"):
        pytest.skip("memory:// checks then writes (documented); atomic create is an S3 and local-disk guarantee")
    store = RunStore(store_url)
    manifest = store.publish_checkpoint([_ckpt_file(tmp_path, "r.ckpt")], global_step=1)
    rel = f"checkpoints/0000000002-race-00000000/{MANIFEST_NAME}"
    results = _race_create_only(store, rel, lambda i: manifest.to_json().replace(b'"r.ckpt"', f'"w{i}"'.encode(), 1))
    assert results == ["lost", "lost", "lost", "won"]


def test_create_only_writes_have_one_winner_on_the_moto_stand_in_too(s3, tmp_path, monkeypatch):
    """S3 makes a conditional PUT atomic; moto's threaded server checks, then stores, in two steps
    (two create-only writers once both won in CI). LocalS3 serializes moto's object writes, so the
    tests check our code, not moto's race: here with moto's window widened on purpose."""
    from moto.s3.responses import S3Response

    checksum = S3Response._get_checksum

    def slow(self, *args, **kwargs):  # runs between moto's existence check and its store
        time.sleep(0.02)
        return checksum(self, *args, **kwargs)

    monkeypatch.setattr(S3Response, "_get_checksum", slow)
    store = RunStore(s3.url("race"), s3.server.storage_options())
    for attempt in range(3):
        assert _race_create_only(store, f"race/{attempt}", lambda i: b"%d" % i) == ["lost", "lost", "lost", "won"]


def test_same_name_published_twice_gets_two_ids_and_latest_wins(store_url, tmp_path):
    store = RunStore(store_url)
    a = store.publish_checkpoint([_ckpt_file(tmp_path, "last.ckpt")], global_step=10)
    b = store.publish_checkpoint([_ckpt_file(tmp_path, "last.ckpt", seed=3)], global_step=10)
    assert a.id != b.id
    assert store.get_checkpoint("last.ckpt") == b
    store.verify_checkpoint(a)
    store.verify_checkpoint(b)


def test_delete_removes_manifest_and_data_only_inside_the_run(store_url, tmp_path):
    store = RunStore(store_url)
    sibling = RunStore(store_url + "-sibling")
    keep = sibling.publish_checkpoint([_ckpt_file(tmp_path, "s.ckpt")], global_step=1)
    m = store.publish_checkpoint([_ckpt_file(tmp_path, "d.ckpt")], global_step=1)
    store.delete_checkpoint(m)
    store.delete_checkpoint(m)  # idempotent
    assert store.list_checkpoints() == []
    assert not store.objects.fs.exists(store.objects.path("checkpoints", m.id, "d.ckpt"))
    assert sibling.list_checkpoints() == [keep]
    bad = CheckpointManifest(**{**m.__dict__, "id": "../../escape"})
    with pytest.raises(ConfigError):
        store.delete_checkpoint(bad)


def test_folder_checkpoint_round_trips(store_url, tmp_path):
    folder = tmp_path / "sharded.ckpt"
    (folder / "shard").mkdir(parents=True)
    (folder / "meta.pt").write_bytes(b"meta")
    (folder / "shard" / "0.distcp").write_bytes(b"x" * 1000)
    store = RunStore(store_url)
    m = store.publish_checkpoint([folder], global_step=4)
    assert sorted(f.path for f in m.files) == ["sharded.ckpt/meta.pt", "sharded.ckpt/shard/0.distcp"]
    out = store.download_checkpoint(m, tmp_path / "dl")
    assert (out / "sharded.ckpt" / "shard" / "0.distcp").read_bytes() == b"x" * 1000


def test_unreadable_manifest_is_skipped_with_a_warning(store_url, tmp_path, caplog):
    store = RunStore(store_url)
    good = store.publish_checkpoint([_ckpt_file(tmp_path, "g.ckpt")], global_step=1)
    _put(store, store.objects.path("checkpoints", "0000000009-bad-00000000", MANIFEST_NAME), b"{not json")
    assert store.list_checkpoints() == [good]
    assert "not a readable trainctl checkpoint manifest" in caplog.text


def test_large_file_goes_up_in_concurrent_parts(s3, tmp_path):
    store = RunStore(s3.url(), max_concurrency=4, part_size=5 * 2**20)
    big = _ckpt_file(tmp_path, "big.ckpt", size=23 * 2**20)
    m = store.publish_checkpoint([big], global_step=1)
    head = s3.server.client().head_object(
        Bucket=s3.bucket, Key=store.objects.path("checkpoints", m.id, "big.ckpt").split("/", 1)[1]
    )
    assert head["ETag"].strip('"').endswith("-5"), "expected a 5-part multipart upload"
    store.verify_checkpoint(m)


# ------------------------------------------------------------------ bad input
def test_unknown_protocol_and_missing_backend_are_config_errors():
    with pytest.raises(ConfigError, match="unknown storage protocol 'nosuch'"):
        RunStore("nosuch://bucket/run")
    with pytest.raises(ConfigError, match="non-empty string"):
        RunStore("")


def test_missing_bucket_is_one_clear_line(s3):
    with pytest.raises(StoreError, match=r"^bucket of s3://no-such-bucket/run does not exist: create it"):
        RunStore("s3://no-such-bucket/run").check_writable()


def test_no_credentials_is_one_clear_line(s3, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(StoreError, match=r"^no credentials to write to s3://.*set AWS_PROFILE"):
        RunStore(s3.url()).check_writable()


def test_unwritable_location_is_one_clear_line():
    with pytest.raises(StoreError, match=r"^permission denied to write to file:///sys/"):
        RunStore("file:///sys/trainctl-test").check_writable()


def test_repr_never_shows_secrets():
    store = RunStore("memory://x/run", {"key": "AKIAXXXX", "secret": "hunter2"})
    assert "hunter2" not in repr(store) and "AKIA" not in repr(store)


# ------------------------------------------------------------------ retries
def test_transient_errors_are_retried_and_permanent_ones_are_not():
    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert RetryPolicy(deadline_s=10, initial_backoff_s=0.01).call(flaky, what="flaky") == "ok"
    assert len(calls) == 3

    def denied():
        calls.append(1)
        raise PermissionError("AccessDenied")

    calls.clear()
    with pytest.raises(PermissionError):
        RetryPolicy(deadline_s=10, initial_backoff_s=0.01).call(denied, what="denied")
    assert len(calls) == 1


def test_retry_gives_up_at_the_deadline_and_when_stopped():
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        RetryPolicy(deadline_s=0.3, initial_backoff_s=0.05).call(lambda: (_ for _ in ()).throw(TimeoutError()), what="t")
    assert time.monotonic() - start < 2
    stop = threading.Event()
    stop.set()
    with pytest.raises(ConnectionError):
        RetryPolicy(deadline_s=60).call(lambda: (_ for _ in ()).throw(ConnectionError()), what="s", stop=stop)


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (FileNotFoundError(), False),
        (PermissionError(), False),
        (ValueError(), False),
    ],
)
def test_transient_classification(exc, transient):
    assert is_transient(exc) is transient


def test_throttling_and_5xx_client_errors_are_transient():
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
    )

    slow = ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")
    denied = ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "PutObject")
    assert is_transient(slow)
    assert not is_transient(denied)
    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    wrapped = OSError("wrapped")
    wrapped.__cause__ = NoCredentialsError()
    assert not is_transient(wrapped)


# ------------------------------------------------------------------ resume_path
def test_resume_path_returns_none_then_the_newest_verified_checkpoint(store_url, tmp_path):
    from trainctl_lightning import resume_path

    assert resume_path(store_url, cache_dir=tmp_path / "cache") is None
    store = RunStore(store_url)
    store.publish_checkpoint([_ckpt_file(tmp_path, "a.ckpt")], global_step=1)
    newest = store.publish_checkpoint([_ckpt_file(tmp_path, "b.ckpt", seed=2)], global_step=2)
    path = resume_path(store_url, cache_dir=tmp_path / "cache")
    assert path.endswith(f"{newest.id}/b.ckpt")
    assert open(path, "rb").read() == (tmp_path / "b.ckpt").read_bytes()
    # cached: a second call with the file in place downloads nothing (delete the store copy to prove it)
    store.objects.fs.rm_file(store.objects.path("checkpoints", newest.id, "b.ckpt"))
    assert resume_path(store_url, cache_dir=tmp_path / "cache") == path


def test_resume_path_skips_a_corrupt_newest_checkpoint_loudly(store_url, tmp_path, caplog):
    from trainctl_lightning import resume_path

    store = RunStore(store_url)
    older = store.publish_checkpoint([_ckpt_file(tmp_path, "a.ckpt")], global_step=1)
    newest = store.publish_checkpoint([_ckpt_file(tmp_path, "b.ckpt", seed=2)], global_step=2)
    _put(store, store.objects.path("checkpoints", newest.id, "b.ckpt"), b"garbage")
    path = resume_path(store_url, cache_dir=tmp_path / "cache")
    assert path.endswith(f"{older.id}/a.ckpt")
    assert f"not resuming from {newest.id}" in caplog.text
    with pytest.raises(IntegrityError, match="b.ckpt is 7 bytes"):
        resume_path(store_url, cache_dir=tmp_path / "cache2", fallback=False)


def test_orphaned_upload_data_is_found_and_collected_only_when_old(store_url, tmp_path):
    from trainctl_lightning.checkpoint.api import collect_orphans

    store = RunStore(store_url)
    good = store.publish_checkpoint([_ckpt_file(tmp_path, "good.ckpt")], global_step=1)
    _put(store, store.objects.path("checkpoints", "0000000002-half-deadbeef", "half.ckpt"), b"partial data")
    assert store.find_orphans(older_than_s=3600) == [], "a fresh folder may be an upload in flight"
    assert store.find_orphans(older_than_s=0) == ["0000000002-half-deadbeef"]
    assert collect_orphans(store_url, older_than_s=0) == [{"id": "0000000002-half-deadbeef", "deleted_objects": 0}]
    assert store.find_orphans(older_than_s=0) == ["0000000002-half-deadbeef"], "listing deletes nothing"
    assert collect_orphans(store_url, older_than_s=0, delete=True) == [{"id": "0000000002-half-deadbeef", "deleted_objects": 1}]
    assert store.find_orphans(older_than_s=0) == []
    assert store.list_checkpoints() == [good]
    store.verify_checkpoint(good)
    with pytest.raises(ConflictError, match="is complete"):
        store.delete_orphan(good.id)


def test_a_long_lived_reader_sees_a_manifest_written_by_another_process(s3, tmp_path):
    """s3fs caches folder listings; a reader that listed a checkpoint folder mid-upload (data,
    no manifest yet) must still see the manifest once another process writes it."""
    url = s3.url()
    ckpt = tmp_path / "a.ckpt"
    ckpt.write_bytes(b"weights" * 100)
    published = RunStore(url).publish_checkpoint([ckpt], global_step=5)
    manifest_key = f"{url.removeprefix(f's3://{s3.bucket}/')}/checkpoints/{published.id}/{MANIFEST_NAME}"
    client = s3.server.client()  # another writer: not this process's s3fs instance or its cache
    body = client.get_object(Bucket=s3.bucket, Key=manifest_key)["Body"].read()
    client.delete_object(Bucket=s3.bucket, Key=manifest_key)

    reader = RunStore(url)
    reader.objects.fs.invalidate_cache()
    assert reader.list_checkpoints() == []  # mid-upload: data only, and that listing is now cached
    client.put_object(Bucket=s3.bucket, Key=manifest_key, Body=body)
    assert [m.id for m in reader.list_checkpoints()] == [published.id]
