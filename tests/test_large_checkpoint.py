"""Large checkpoints: reused snapshot buffers, one-pass hashed uploads, parallel verified downloads."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.helpers.models import TinyRegressor, trainer_kwargs
from tests.helpers.stores import s3_in_subprocess
from trainctl_lightning import CheckpointSync
from trainctl_lightning.checkpoint.snapshot import BufferPool, take_snapshot
from trainctl_lightning.errors import IntegrityError, StoreError
from trainctl_lightning.store import RunStore, layout

PART = 5 * 2**20  # S3's smallest part: several parts and ranges from a small file


def _data_ptrs(snapshot: Any) -> set[int]:
    return {buf.data_ptr() for buf in snapshot.buffers}


def test_snapshots_reuse_the_same_host_buffers() -> None:
    w = torch.randn(64, 64)
    state = {"w": w, "tied": w, "b": torch.randn(8)}
    pool = BufferPool()
    first = take_snapshot(state, pool)
    assert torch.equal(first.checkpoint["w"], state["w"])
    assert first.checkpoint["tied"].untyped_storage().data_ptr() == first.checkpoint["w"].untyped_storage().data_ptr()
    ptrs = _data_ptrs(first)
    first.release()
    state["w"].add_(1.0)
    second = take_snapshot(state, pool)
    assert _data_ptrs(second) == ptrs, "the second snapshot should land in the first one's buffers"
    assert torch.equal(second.checkpoint["w"], state["w"])
    assert pool.allocated == 2
    second.release()
    # A state that changed shape: the old buffers are dropped, not kept beside the new ones.
    third = take_snapshot({"w": torch.randn(32, 32)}, pool)
    third.release()
    assert pool.free_bytes() == 32 * 32 * 4


def _fit_allocations(tmp_path: Path, url: str, saves: int) -> int:
    sync = CheckpointSync(url)
    trainer = Trainer(
        **trainer_kwargs(max_steps=2 * saves, limit_val_batches=0),
        callbacks=[ModelCheckpoint(dirpath=tmp_path / f"ckpts{saves}", every_n_train_steps=2, save_top_k=-1), sync],
        default_root_dir=tmp_path,
    )
    trainer.fit(TinyRegressor())
    assert sync.last_flush is not None and sync.last_flush.ok and len(sync.last_flush.published) == saves
    plugin = sync._io  # the plugin of that fit
    assert plugin is not None and plugin.buffer_pool is not None
    assert plugin.buffer_pool.free_bytes() > 0, "the buffers are kept for the next save"
    return plugin.buffer_pool.allocated


def test_host_buffers_do_not_grow_with_the_number_of_saves(tmp_path: Path, file_url: str) -> None:
    two = _fit_allocations(tmp_path, file_url + "/a", 2)
    six = _fit_allocations(tmp_path, file_url + "/b", 6)
    assert two > 0 and six == two


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_private_file_is_hashed_while_uploading_without_a_second_read(tmp_path: Path, file_url: str) -> None:
    data = os.urandom(24 * 2**20)
    local = tmp_path / "big.ckpt"
    local.write_bytes(data)
    store = RunStore(file_url)
    before = _rchar()
    manifest = store.publish_checkpoint([str(local)], verify_unchanged=False)
    read = _rchar() - before
    assert manifest.files[0].sha256 == hashlib.sha256(data).hexdigest()
    assert read < 1.5 * len(data), f"read {read} bytes to publish {len(data)}: the file was read twice"


def _store(s3: Any, name: str) -> RunStore:
    return RunStore(s3.url(name), s3.server.storage_options(), max_concurrency=3, part_size=PART)


def test_parallel_multipart_upload_and_ranged_download_verified(tmp_path: Path, s3: Any) -> None:
    data = os.urandom(3 * PART + 12345)
    local = tmp_path / "big.ckpt"
    local.write_bytes(data)
    store = _store(s3, "large")
    fd = os.open(local, os.O_RDONLY)
    try:
        manifest = store.publish_checkpoint([(f"/proc/self/fd/{fd}", "big.ckpt")], name="big.ckpt", verify_unchanged=False)
    finally:
        os.close(fd)
    assert manifest.files[0].sha256 == hashlib.sha256(data).hexdigest()
    rel = layout.checkpoint_object(manifest.id, "big.ckpt")
    parts = s3.server.client().head_object(Bucket=s3.bucket, Key=store.objects.path(rel).split("/", 1)[1], PartNumber=1)
    assert parts.get("PartsCount") == 4, "uploaded as a multipart upload of part_size parts"
    path = store.download_checkpoint(manifest, tmp_path / "dl")
    assert Path(path).read_bytes() == data


def test_ranged_reads_on_threads_where_the_filesystem_maps_to_a_client_else_on_the_loop(tmp_path: Path, s3: Any) -> None:
    import s3fs

    from trainctl_lightning.store import transfer

    data = os.urandom(3 * PART + 4321)
    s3.server.client().put_object(Bucket=s3.bucket, Key="ranged/obj", Body=data)
    plain = s3fs.S3FileSystem(**s3.server.storage_options(), skip_instance_cache=True)
    extra = s3fs.S3FileSystem(  # s3fs adds these to its requests: not mapped, the loop's path is used
        **s3.server.storage_options(), s3_additional_kwargs={"ExpectedBucketOwner": "123456789012"}, skip_instance_cache=True
    )
    assert transfer._thread_client(plain, 3) is not None and transfer._thread_client(extra, 3) is None
    for i, fs in enumerate((plain, extra)):
        fd = os.open(tmp_path / f"dl{i}", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            got = transfer.download_verified(fs, f"{s3.bucket}/ranged/obj", fd, len(data), concurrency=3, part_size=PART)
        finally:
            os.close(fd)
        assert got == (hashlib.sha256(data).hexdigest(), len(data)) and (tmp_path / f"dl{i}").read_bytes() == data
    store = _store(s3, "ranged")
    with pytest.raises(IntegrityError, match="is missing from the store"):  # the client's NoSuchKey, as s3fs raises it
        store.objects.download("objs/absent", tmp_path / "absent", size=len(data), sha256=hashlib.sha256(data).hexdigest())


def test_uploads_on_threads_where_the_filesystem_maps_to_a_client_else_on_the_loop(tmp_path: Path, s3: Any) -> None:
    import s3fs

    from trainctl_lightning.store import transfer

    data = os.urandom(3 * PART + 4321)
    local = tmp_path / "big.ckpt"
    local.write_bytes(data)
    plain = s3fs.S3FileSystem(**s3.server.storage_options(), skip_instance_cache=True)
    extra = s3fs.S3FileSystem(  # s3fs adds these to its requests: not mapped, the loop's path is used
        **s3.server.storage_options(), s3_additional_kwargs={"ExpectedBucketOwner": "123456789012"}, skip_instance_cache=True
    )
    assert transfer._thread_client(plain, 3) is not None and transfer._thread_client(extra, 3) is None
    client = s3.server.client()
    for i, fs in enumerate((plain, extra)):
        for size in (len(data), PART // 2):  # multipart, and one PUT
            fd = os.open(local, os.O_RDONLY)
            try:
                got = transfer.upload_hashed(fs, fd, f"{s3.bucket}/up/{i}-{size}", size, concurrency=3, part_size=PART)
            finally:
                os.close(fd)
            assert got == (hashlib.sha256(data[:size]).hexdigest(), size)
            assert client.get_object(Bucket=s3.bucket, Key=f"up/{i}-{size}")["Body"].read() == data[:size]
    assert client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []
    with pytest.raises(FileNotFoundError):  # the client's NoSuchBucket, as s3fs raises it
        fd = os.open(local, os.O_RDONLY)
        try:
            transfer.upload_hashed(plain, fd, "no-such-bucket-here/x", len(data), concurrency=3, part_size=PART)
        finally:
            os.close(fd)


def test_over_plain_http_each_part_is_checked_once_by_its_signed_payload_hash_not_also_by_a_crc(
    tmp_path: Path, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over plain HTTP botocore signs every payload (SigV4 over its SHA-256, which S3 checks); a
    CRC-32 beside it would check the same bytes twice. Over HTTPS the CRC-32 stays (the payload is
    then unsigned), and so does any checksum setting the user made."""
    import s3fs

    from trainctl_lightning.store import transfer

    data = os.urandom(2 * PART + 99)
    local = tmp_path / "big.ckpt"
    local.write_bytes(data)
    fs = s3fs.S3FileSystem(**s3.server.storage_options(), skip_instance_cache=True)
    client = transfer._thread_client(fs, 3)
    assert client is not None
    sent: list[dict[str, str]] = []

    def record(request: Any, **_: Any) -> None:
        sent.append({k: v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()})

    client.meta.events.register("before-send.s3.UploadPart", record)
    fd = os.open(local, os.O_RDONLY)
    try:
        transfer.upload_hashed(fs, fd, f"{s3.bucket}/once/obj", len(data), concurrency=3, part_size=PART)
    finally:
        os.close(fd)
    assert len(sent) == 3
    parts = [data[i : i + PART] for i in range(0, len(data), PART)]
    for headers, part in zip(sorted(sent, key=lambda h: int(h["Content-Length"]), reverse=True), parts):
        assert headers["X-Amz-Content-SHA256"] == hashlib.sha256(part).hexdigest(), "the payload was not signed"
        assert not any(k.lower().startswith("x-amz-checksum-") for k in headers), headers
    assert s3.server.client().get_object(Bucket=s3.bucket, Key="once/obj")["Body"].read() == data

    def setting(**kwargs: Any) -> str:
        made = s3fs.S3FileSystem(key="k", secret="s", skip_instance_cache=True, **kwargs)
        made_client = transfer._thread_client(made, 3)
        assert made_client is not None
        return str(made_client.meta.config.request_checksum_calculation)

    assert setting(endpoint_url=s3.server.endpoint) == "when_required"
    assert setting(endpoint_url="https://s3.example.com") == "when_supported"
    assert (
        setting(endpoint_url=s3.server.endpoint, config_kwargs={"request_checksum_calculation": "when_supported"})
        == "when_supported"
    )
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")
    assert setting(endpoint_url=s3.server.endpoint) == "when_supported"


def test_the_ranged_read_client_is_the_filesystems_own_not_an_equal_ones(
    tmp_path: Path, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two s3fs filesystems built alike are equal (fsspec compares their arguments), yet each
    resolves its endpoint from the environment it was made in: the one that is asked must be the
    one whose client reads. (A client cached for an equal filesystem from an earlier test, made
    while the environment named a server since stopped, met a refused connection.)"""
    import s3fs

    from trainctl_lightning.store import transfer
    from trainctl_lightning.testing import LocalS3

    data = os.urandom(2 * PART + 99)
    s3.server.client().put_object(Bucket=s3.bucket, Key="ranged/obj", Body=data)
    with LocalS3() as gone:
        monkeypatch.setenv("AWS_ENDPOINT_URL", gone.endpoint)
        earlier = s3fs.S3FileSystem(skip_instance_cache=True)
        assert transfer._thread_client(earlier, 2) is not None
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.server.endpoint)
    now = s3fs.S3FileSystem(skip_instance_cache=True)
    assert now == earlier and now is not earlier  # equal arguments, different endpoints
    fd = os.open(tmp_path / "dl", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        got = transfer.download_verified(now, f"{s3.bucket}/ranged/obj", fd, len(data), concurrency=2, part_size=PART)
    finally:
        os.close(fd)
    assert got == (hashlib.sha256(data).hexdigest(), len(data)) and (tmp_path / "dl").read_bytes() == data
    del earlier


def test_a_corrupt_range_fails_the_download_and_leaves_nothing(tmp_path: Path, s3: Any) -> None:
    data = bytearray(os.urandom(3 * PART + 777))
    local = tmp_path / "big.ckpt"
    local.write_bytes(data)
    store = _store(s3, "corrupt")
    manifest = store.publish_checkpoint([str(local)], verify_unchanged=False)
    data[2 * PART + 5] ^= 0xFF  # one byte in the third range, same size
    key = store.objects.path(layout.checkpoint_object(manifest.id, "big.ckpt")).split("/", 1)[1]
    s3.server.client().put_object(Bucket=s3.bucket, Key=key, Body=bytes(data))
    dest = tmp_path / "dl"
    with pytest.raises(IntegrityError) as info:
        store.download_checkpoint(manifest, dest)
    assert "\n" not in str(info.value) and "checksum" in str(info.value)
    assert list(dest.iterdir()) == [], "nothing (not even a partial file) is left at the target"


def test_a_stopped_multipart_upload_is_aborted(tmp_path: Path, s3: Any) -> None:
    import threading

    local = tmp_path / "big.ckpt"
    local.write_bytes(os.urandom(3 * PART))
    store = _store(s3, "stopped")
    stop = threading.Event()
    stop.set()
    with pytest.raises(StoreError):
        store.objects.upload_hashed(str(local), "checkpoints/x/big.ckpt", size=3 * PART, stop=stop)
    client = s3.server.client()
    assert client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []
    assert store.list_checkpoints() == []


def test_repeated_transfers_keep_no_whole_part_in_the_heap(tmp_path: Path) -> None:
    """Parts travel in reused buffers outside the Python heap (an S3 server in another process, so
    that only this client is measured): the heap's peak during a multipart upload and a ranged
    download stays below one part, however many transfers are made."""
    import tracemalloc

    data = os.urandom(3 * PART + 4321)
    local = tmp_path / "big.ckpt"
    local.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    peaks = []
    with s3_in_subprocess() as options:
        store = RunStore("s3://trainctl-sub/heap", options, max_concurrency=3, part_size=PART)
        store.objects.upload_hashed(str(local), "objs/warm", size=len(data))  # clients, connections, caches
        store.objects.download("objs/warm", tmp_path / "warm", size=len(data), sha256=digest)  # the download's client
        tracemalloc.start()
        try:
            for i in range(3):
                base = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                assert store.objects.upload_hashed(str(local), f"objs/{i}", size=len(data)) == (digest, len(data))
                store.objects.download(f"objs/{i}", tmp_path / f"dl{i}", size=len(data), sha256=digest)
                peaks.append(tracemalloc.get_traced_memory()[1] - base)
                assert (tmp_path / f"dl{i}").read_bytes() == data
        finally:
            tracemalloc.stop()
    assert max(peaks) < PART, f"the heap held a whole part or more during a transfer: {peaks} bytes above the start"


class _KeepAliveObjects:
    """A minimal S3-like server that keeps connections open (HTTP/1.1), as S3 does and moto's does
    not: it serves ranged GETs of one object and counts the connections it accepted."""

    def __init__(self, data: bytes) -> None:
        import http.server
        import socketserver

        owner = self
        self.data = data
        self.connections = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                owner.connections += 1

            def do_GET(self) -> None:
                first, last = self.headers["Range"].removeprefix("bytes=").split("-")
                body = owner.data[int(first) : int(last) + 1]
                self.send_response(206)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Range", f"bytes {first}-{last}/{len(owner.data)}")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> _KeepAliveObjects:
        import threading

        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("into", [True, False], ids=["into-the-buffer", "in-chunks"])
def test_ranged_reads_reuse_their_connections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, into: bool) -> None:
    """Each range is read to its end and its connection goes back to the pool: a download opens at
    most ``concurrency`` connections, and the next one none (a body closed before its end would
    close its connection, and each range would open a new one)."""
    from trainctl_lightning.store import transfer
    from trainctl_lightning.store.objects import ObjectStore

    monkeypatch.setattr(transfer, "_READ_INTO", into)
    data = os.urandom(6 * PART + 11)
    digest = hashlib.sha256(data).hexdigest()
    with _KeepAliveObjects(data) as server:
        options = {"client_kwargs": {"endpoint_url": server.endpoint}, "key": "testing", "secret": "testing"}
        store = ObjectStore("s3://trainctl-keepalive", options, max_concurrency=3, part_size=PART)
        counts = []
        for i in range(2):
            before = server.connections
            store.download("obj", tmp_path / f"dl{i}", size=len(data), sha256=digest)
            counts.append(server.connections - before)
            assert (tmp_path / f"dl{i}").read_bytes() == data
    assert 1 <= counts[0] <= 3 and counts[1] == 0, f"connections opened per download of 7 ranges: {counts}"
