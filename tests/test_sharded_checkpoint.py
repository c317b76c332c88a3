"""Sharded (folder) checkpoints published from every node, and resumed per rank.

Two "nodes" are two real torchrun invocations on 127.0.0.1 (c10d rendezvous, one process each,
gloo), each in its own folder with its own checkpoint folder and download cache, training a tiny
model with a strategy that saves DCP folders on CPU (tests/helpers/sharded.py).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from tests.helpers.sharded import torchrun_pair
from trainctl_lightning import CheckpointSync
from trainctl_lightning.checkpoint.resume import resume_path
from trainctl_lightning.checkpoint.sharded import fetch_for_rank, needed_files, owner_of
from trainctl_lightning.errors import IntegrityError
from trainctl_lightning.store import RunStore, layout
from trainctl_lightning.store.manifest import CheckpointManifest, FileEntry


def _done(results: list, marker: str = "DONE") -> dict[int, str]:
    """rank -> its final line, asserting both nodes exited 0."""
    lines = {}
    for result in results:
        assert result.returncode == 0, result.stdout[-4000:]
        found = re.search(rf"^RANK (\d) NODE \d WORLD 2 {marker}.*$", result.stdout, re.M)
        assert found, result.stdout[-4000:]
        lines[int(found.group(1))] = found.group(0)
    assert sorted(lines) == [0, 1]
    return lines


def _manifest_files(store_dir: Path) -> dict[int, dict]:
    out = {}
    for path in sorted(store_dir.glob("checkpoints/*/MANIFEST.json")):
        data = json.loads(path.read_text())
        out[data["global_step"]] = data
    return out


@pytest.mark.slow
def test_two_nodes_publish_their_own_shards_and_resume_from_them(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    _done(torchrun_pair(nodes, [f"file://{store_dir}", "ckpts", "4"]))

    # each node's disk holds only its own rank's shards (rank zero's node: also .metadata and meta.pt)
    local = [sorted(p.name for p in (n / "ckpts" / "epoch=0-step=4.ckpt").iterdir()) for n in nodes]
    assert sorted(local, key=len) == [["__1_0.distcp"], [".metadata", "__0_0.distcp", "meta.pt"]]

    manifests = _manifest_files(store_dir)
    assert sorted(manifests) == [2, 4]
    latest = manifests[4]
    assert latest["sharded"] == {"folder": "epoch=0-step=4.ckpt", "format": "torch.distributed.checkpoint", "world_size": 2}
    listed = {f["path"]: f for f in latest["files"]}
    assert set(listed) == {f"epoch=0-step=4.ckpt/{n}" for n in (".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt")}
    for path, entry in listed.items():
        assert entry["rank"] == owner_of(path)
        stored = store_dir / "checkpoints" / latest["id"] / path
        assert entry["size"] == stored.stat().st_size
        assert entry["sha256"] == __import__("hashlib").sha256(stored.read_bytes()).hexdigest()

    lines = _done(torchrun_pair(nodes, [f"file://{store_dir}", "ckpts", "6", "resume"]))
    for line in lines.values():
        assert f"resumed={latest['id']} resumed_step=4" in line and "step=6" in line
    manifest = RunStore(f"file://{store_dir}").get_checkpoint(latest["id"])
    for node in nodes:  # each node downloaded exactly what its rank reads, each file verified
        cached = sorted((node / "cache").rglob("*.distcp")) + sorted((node / "cache").rglob("meta.pt"))
        assert cached and all(p.parent.name == "epoch=0-step=4.ckpt" for p in cached)
    assert sorted(_manifest_files(store_dir)) == [2, 4, 6]
    assert manifest.sharded is not None


@pytest.mark.slow
def test_a_rank_whose_upload_fails_leaves_no_manifest(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    # rank 1's first upload (step 2) goes through, every later one fails
    results = torchrun_pair(nodes, [f"file://{store_dir}", "ckpts", "4"], env={"FAIL_UPLOAD_RANK": "1", "FAIL_UPLOAD_AFTER": "1"})
    # every rank learns that step 4 was not published, so both nodes end failed (neither waits on the other)
    assert [r.returncode for r in results] == [1, 1], [r.stdout[-3000:] for r in results]
    output = "\n".join(r.stdout for r in results)
    assert output.count("UploadError: CheckpointSync(") >= 2
    assert "rank 1: OSError: injected upload failure" in output
    store = RunStore(f"file://{store_dir}")
    assert [m.global_step for m in store.list_checkpoints()] == [2]  # step 4: no manifest
    assert store.latest_checkpoint().global_step == 2
    # what the other ranks uploaded for step 4 was removed, not left as an orphan
    assert not [p for p in (store_dir / "checkpoints").iterdir() if p.name.startswith("0000000004")]


def _publish_fake_sharded(store: RunStore, tmp_path: Path, files: dict[str, bytes]) -> CheckpointManifest:
    """A sharded checkpoint in the store, written as the ranks would (for the refusal tests)."""
    import hashlib

    ckpt_id = store.new_checkpoint_id("last.ckpt", 3)
    entries = []
    for rel, data in files.items():
        local = tmp_path / "src" / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
        store.objects.upload(local, layout.checkpoint_object(ckpt_id, rel))
        entries.append(FileEntry(rel, len(data), hashlib.sha256(data).hexdigest(), rank=owner_of(rel)))
    manifest = CheckpointManifest(
        id=ckpt_id,
        name="last.ckpt",
        epoch=0,
        global_step=3,
        created_at="2025-01-01T00:00:00Z",
        files=tuple(entries),
        package_version="test",
        sharded={"format": "torch.distributed.checkpoint", "folder": "last.ckpt", "world_size": 2},
    )
    store.commit_manifest(manifest)
    return manifest


def test_a_shard_whose_bytes_do_not_match_is_refused_in_one_line(tmp_path: Path) -> None:
    store = RunStore(f"file://{tmp_path / 'store'}")
    manifest = _publish_fake_sharded(store, tmp_path, {"last.ckpt/__1_0.distcp": b"shard of rank 1", "last.ckpt/meta.pt": b"m"})
    (tmp_path / "store" / "checkpoints" / manifest.id / "last.ckpt" / "__1_0.distcp").write_bytes(b"shard of rank 9")
    with pytest.raises(IntegrityError) as caught:
        fetch_for_rank(store, manifest, tmp_path / "dest", rank=None, world_size=None)
    message = str(caught.value)
    assert "\n" not in message and "__1_0.distcp" in message and "checksum" in message
    assert not (tmp_path / "dest" / "last.ckpt" / "__1_0.distcp").exists()


def test_a_manifest_naming_a_shard_outside_its_folder_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store_dir = tmp_path / "store"
    store = RunStore(f"file://{store_dir}")
    manifest = _publish_fake_sharded(store, tmp_path, {"last.ckpt/__0_0.distcp": b"zero", "last.ckpt/meta.pt": b"m"})
    path = store_dir / "checkpoints" / manifest.id / layout.CHECKPOINT_MANIFEST
    data = json.loads(path.read_text())
    data["files"][0]["path"] = "last.ckpt/../../../escaped.distcp"
    path.write_text(json.dumps(data))
    with pytest.raises(IntegrityError) as caught:
        store.get_checkpoint(manifest.id)
    assert "\n" not in str(caught.value) and "unsafe path" in str(caught.value)
    assert resume_path(f"file://{store_dir}", cache_dir=tmp_path / "cache") is None  # never used
    assert "skipping unreadable checkpoint" in caplog.text
    assert not list(tmp_path.rglob("escaped.distcp"))
    # a folder name that leaves the checkpoint is refused the same way
    data["files"][0]["path"] = "last.ckpt/__0_0.distcp"
    data["sharded"]["folder"] = ".."
    path.write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="unsafe"):
        store.get_checkpoint(manifest.id)


def test_a_rank_fetches_only_the_shards_it_reads() -> None:
    """A tensor in several chunks (sharded) is read from the rank's own file; one stored whole
    (replicated, deduplicated by DCP onto one file) from wherever it is."""
    props = TensorProperties(dtype=torch.float32)
    sharded = TensorStorageMetadata(
        props,
        torch.Size([4]),
        [ChunkStorageMetadata(torch.Size([0]), torch.Size([2])), ChunkStorageMetadata(torch.Size([2]), torch.Size([2]))],
    )
    whole = TensorStorageMetadata(props, torch.Size([2]), [ChunkStorageMetadata(torch.Size([0]), torch.Size([2]))])

    class Info:
        def __init__(self, relative_path: str) -> None:
            self.relative_path = relative_path

    metadata = Metadata(
        state_dict_metadata={"w": sharded, "b": whole},
        storage_data={
            MetadataIndex("w", torch.Size([0])): Info("__0_0.distcp"),
            MetadataIndex("w", torch.Size([2])): Info("__1_0.distcp"),
            MetadataIndex("b", torch.Size([0])): Info("__2_0.distcp"),
        },
    )
    files = [".metadata", "meta.pt", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp"]
    manifest = CheckpointManifest(
        id="x",
        name="c",
        epoch=0,
        global_step=0,
        created_at="2025-01-01T00:00:00Z",
        files=tuple(FileEntry(f"c/{f}", 1, "0" * 64, rank=owner_of(f)) for f in files),
        package_version="test",
        sharded={"format": "torch.distributed.checkpoint", "folder": "c", "world_size": 4},
    )
    assert needed_files(manifest, metadata, 1) == {"c/.metadata", "c/meta.pt", "c/__1_0.distcp", "c/__2_0.distcp"}
    assert needed_files(manifest, metadata, 3) == {"c/.metadata", "c/meta.pt", "c/__3_0.distcp", "c/__2_0.distcp"}


def test_one_file_manifests_read_and_write_as_before() -> None:
    manifest = CheckpointManifest(
        id="0000000001-last-abcdef12",
        name="last.ckpt",
        epoch=0,
        global_step=1,
        created_at="2025-01-01T00:00:00Z",
        files=(FileEntry("last.ckpt", 3, "a" * 64),),
        package_version="test",
    )
    data = json.loads(manifest.to_json())
    assert "sharded" not in data and "rank" not in data["files"][0]
    data["future_field"] = {"ignored": True}
    assert CheckpointManifest.from_json(json.dumps(data).encode(), "test") == manifest
    assert CheckpointSync("file:///tmp/x")._sharded is None


class _RunsCode:
    """An object whose unpickling would run code: writes a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self.marker),))


def _dcp_files(tmp_path: Path, state: dict) -> dict[str, bytes]:
    """The files DCP writes for ``state`` on one rank (no process group), as a checkpoint folder."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "dcp-src"
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return {f"last.ckpt/{p.name}": p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("rank", [0, None])
def test_a_sharded_checkpoint_is_proven_code_free_before_anything_unpickles_it(tmp_path: Path, rank: int | None) -> None:
    """DCP unpickles .metadata and loads non-tensor items with weights_only=False: a store that
    holds code there (consistently listed in its manifest) is refused before either runs."""
    marker = tmp_path / "code-ran"
    store = RunStore(f"file://{tmp_path / 'store'}")
    clean = _dcp_files(tmp_path / "clean", {"w": torch.ones(2), "step": 3, "hp": {"lr": 0.1}})
    good = _publish_fake_sharded(store, tmp_path / "g", {**clean, "last.ckpt/meta.pt": _saved({"loops": {"x": 1}})})
    fetch_for_rank(store, good, tmp_path / "ok", rank=rank, world_size=1)  # tensors and plain data: fine

    hostile_item = _dcp_files(tmp_path / "item", {"w": torch.ones(2), "evil": _RunsCode(str(marker))})
    hostile_meta = {**clean, "last.ckpt/meta.pt": _saved({"evil": _RunsCode(str(marker))})}
    import pickle

    forged_metadata = {**clean, "last.ckpt/.metadata": pickle.dumps(_RunsCode(str(marker)))}
    for i, (files, words) in enumerate(
        [
            (hostile_item, "item 'evil' in __0_0.distcp holds more than tensors"),
            (hostile_meta, "meta.pt holds more than tensors"),
            (forged_metadata, "its DCP metadata names pathlib.Path.touch"),
        ]
    ):
        manifest = _publish_fake_sharded(store, tmp_path / f"h{i}", files)
        with pytest.raises(IntegrityError, match=re.escape(words)) as caught:
            fetch_for_rank(store, manifest, tmp_path / f"dest{i}", rank=rank, world_size=1)
        assert "\n" not in str(caught.value)
        assert not marker.exists(), "code from the store ran"


def _saved(obj: object) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _output(results: list) -> str:
    return "\n".join(r.stdout for r in results)


@pytest.mark.slow
def test_keep_last_keep_local_the_metrics_gate_and_checkpoint_now_for_folders(tmp_path: Path) -> None:
    """keep_last prunes old sharded checkpoints in the store (manifest first), keep_local=False
    deletes each node's folders once published, every manifest waits for the metrics of its
    steps, and a SIGUSR1 (a spot notice) on rank zero saves a folder at once, from both nodes."""
    store_dir = tmp_path / "store"
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    env = {"KEEP_LAST": "2", "KEEP_LOCAL": "0", "METRICS": "1", "SIGNAL_AT_STEP": "3"}
    results = torchrun_pair(nodes, [f"file://{store_dir}", "ckpts", "8"], env=env)
    _done(results)
    output = _output(results)
    requested = re.search(r"(preempt-step=\d+\.ckpt) \(step (\d+)\) published as \S+/checkpoints/(\S+),", output)
    assert requested, output[-4000:]
    # the list ends at its bracket: another process's output may follow on the same line
    gates = re.findall(r"^GATE (\S+) step=(\d+) missing=(\[[^\]]*\])", output, re.M)
    # 4 saves by ModelCheckpoint, each written only after the metrics of its steps, and the requested
    # one, which does not wait for the metrics of the step it was saved in (Lightning logs those after
    # the batch-end hooks; it is published at once, as a single-file one is)
    assert sorted(int(step) for name, step, _ in gates if name.startswith("epoch=")) == [2, 4, 6, 8], gates
    assert [name for name, _, _ in gates if not name.startswith("epoch=")] == [requested.group(1)], gates
    for name, step, missing in gates:
        assert missing == "[]" or (name == requested.group(1) and missing == f"[{int(step) - 1}]"), gates
    store = RunStore(f"file://{store_dir}")
    assert [m.global_step for m in store.list_checkpoints()] == [6, 8]  # keep_last=2 of the 5 published
    kept = {p.name for p in (store_dir / "checkpoints").iterdir()}
    assert kept == {m.id for m in store.list_checkpoints()}, "the pruned ones are gone entirely"
    for node in nodes:  # keep_local=False: every node deleted its own folders once published
        assert not list((node / "ckpts").rglob("*.distcp")), sorted((node / "ckpts").rglob("*"))


@pytest.mark.slow
def test_on_s3_rotated_folders_are_deleted_remotely_and_each_rank_fetches_its_shards(tmp_path: Path, s3: Any) -> None:
    """Against S3 (moto): two nodes publish their shards; ModelCheckpoint(save_top_k=1) rotating a
    folder away deletes it on every node and in the store (mirror_deletes); each rank's resume
    fetch gets, verified, what it reads, and the whole checkpoint loads."""
    url = s3.url()
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    _done(torchrun_pair(nodes, [url, "ckpts", "4"], env={"SAVE_TOP_K": "1"}))
    store = RunStore(url)
    assert [m.global_step for m in store.list_checkpoints()] == [4]  # step 2 was rotated away
    assert not store.find_orphans(older_than_s=0)
    for node in nodes:
        assert [p.name for p in (node / "ckpts").iterdir()] == ["epoch=0-step=4.ckpt"]
    newest = store.latest_checkpoint()
    assert newest is not None and newest.sharded is not None
    for rank in (0, 1):  # what CheckpointSync(resume=True) does on each rank, against S3
        folder = fetch_for_rank(store, newest, tmp_path / f"cache{rank}", rank=rank, world_size=2)
        shards = sorted(p.name for p in Path(folder).glob("*.distcp"))
        assert f"__{rank}_0.distcp" in shards
    path = resume_path(url, cache_dir=tmp_path / "cache")
    assert path is not None
    state = _load_whole(path, tmp_path)
    assert state["state_dict"] and state["optimizer_0"]


def _load_whole(folder: str, tmp_path: Path) -> dict:
    """Load a downloaded sharded checkpoint in one process (DCP's own converter), as a proof that
    every shard is there and reads."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, tmp_path / "whole.pt")
    return torch.load(tmp_path / "whole.pt", weights_only=True)


@pytest.mark.slow
def test_a_rank_killed_while_uploading_leaves_no_manifest_and_the_previous_one_resumable(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    started = time.monotonic()
    # rank 1 SIGKILLs itself in its second upload: its shard of step 4
    results = torchrun_pair(nodes, [f"file://{store_dir}", "ckpts", "6"], env={"KILL_UPLOAD_RANK": "1", "KILL_AT_UPLOAD": "2"})
    elapsed = time.monotonic() - started
    assert all(r.returncode != 0 for r in results), _output(results)[-4000:]
    assert "RANK 1 KILLED uploading checkpoints/0000000004" in _output(results)
    assert elapsed < 90, f"the surviving node took {elapsed:.0f}s to end"
    store = RunStore(f"file://{store_dir}")
    assert [m.global_step for m in store.list_checkpoints()] == [2]
    assert not store.find_orphans(older_than_s=0), "rank zero removed what it had uploaded for step 4"
    path = resume_path(f"file://{store_dir}", cache_dir=tmp_path / "cache")
    assert path is not None and path.endswith("epoch=0-step=2.ckpt")
    state = _load_whole(path, tmp_path)
    assert "state_dict" in state and "optimizer_0" in state


@pytest.mark.slow
def test_a_store_outage_during_a_sharded_publish_is_bounded_and_training_goes_on(tmp_path: Path) -> None:
    """Every object of step 4 is refused (a transient error, retried for RETRY_TIMEOUT seconds):
    no manifest for it, training goes on and publishes step 6, and both nodes end with one
    UploadError naming step 4."""
    store_dir = tmp_path / "store"
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    started = time.monotonic()
    results = torchrun_pair(nodes, [f"file://{store_dir}", "ckpts", "6"], env={"OUTAGE_STEP": "4", "RETRY_TIMEOUT": "2"})
    elapsed = time.monotonic() - started
    assert [r.returncode for r in results] == [1, 1], _output(results)[-4000:]
    output = _output(results)
    assert "injected outage" in output
    failed = re.findall(r"FAILED UploadError: CheckpointSync\(.*not every sharded checkpoint was published: (.*)$", output, re.M)
    assert len(failed) == 2 and all("epoch=0-step=4.ckpt" in f and "step=6" not in f for f in failed), failed
    store = RunStore(f"file://{store_dir}")
    assert [m.global_step for m in store.list_checkpoints()] == [2, 6]
    assert not store.find_orphans(older_than_s=0)
    assert elapsed < 60, f"{elapsed:.0f}s"
