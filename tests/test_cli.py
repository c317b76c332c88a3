"""`trainctl ckpt ...` as a user runs it: a real subprocess, against file:// and a real S3 endpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.cli import trainctl
from trainctl_lightning import RunStore


def _lightning_like_ckpt(path: Path, step: int) -> Path:
    torch.save({"epoch": step // 10, "global_step": step, "state_dict": {"w": torch.full((256, 256), float(step))}}, path)
    return path


@pytest.fixture(params=["file", "s3"])
def cli_store(request, tmp_path):
    if request.param == "s3":
        s3 = request.getfixturevalue("s3")
        return s3.url(), s3.env()
    return f"file://{tmp_path}/store/run", {}


@pytest.mark.slow
def test_upload_ls_download_verify_round_trip(cli_store, tmp_path):
    url, env = cli_store
    first = _lightning_like_ckpt(tmp_path / "epoch=0-step=5.ckpt", 5)
    second = _lightning_like_ckpt(tmp_path / "last.ckpt", 20)

    up = trainctl("ckpt", "upload", str(first), url, "--output", "json", env=env)
    assert up.returncode == 0, up.stderr
    uploaded = json.loads(up.stdout)
    assert uploaded["global_step"] == 5 and uploaded["epoch"] == 0, "step and epoch read from the file"
    assert trainctl("ckpt", "upload", str(second), url, env=env).returncode == 0

    ls = trainctl("ckpt", "ls", url, "--output", "json", env=env)
    assert ls.returncode == 0, ls.stderr
    listed = json.loads(ls.stdout)["checkpoints"]
    assert [(c["name"], c["global_step"], c["latest"]) for c in listed] == [
        ("epoch=0-step=5.ckpt", 5, False),
        ("last.ckpt", 20, True),
    ]
    table = trainctl("ckpt", "ls", url, env=env)
    assert "last.ckpt" in table.stdout and "epoch=0-step=5.ckpt" in table.stdout

    # latest by default, a named one on request
    dl = trainctl("ckpt", "download", url, "-o", str(tmp_path / "dl"), "--output", "json", env=env)
    assert dl.returncode == 0, dl.stderr
    got = Path(json.loads(dl.stdout)["local_path"])
    assert got.read_bytes() == second.read_bytes()
    dl = trainctl("ckpt", "download", url, "epoch=0-step=5.ckpt", "-o", str(tmp_path / "dl2"), env=env)
    assert dl.returncode == 0 and (tmp_path / "dl2" / "epoch=0-step=5.ckpt").read_bytes() == first.read_bytes()

    ok = trainctl("ckpt", "verify", url, env=env)
    assert ok.returncode == 0 and "matches its manifest" in ok.stdout


def test_verify_names_the_corrupt_object_and_exits_1(file_url, tmp_path):
    store = RunStore(file_url)
    m = store.publish_checkpoint([_lightning_like_ckpt(tmp_path / "x.ckpt", 3)], global_step=3)
    obj = Path(store.objects.path("checkpoints", m.id, "x.ckpt"))
    obj.write_bytes(obj.read_bytes()[:-10] + b"0123456789")

    out = trainctl("ckpt", "verify", file_url)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1, f"one line expected, got: {out.stderr!r}"
    assert "x.ckpt fails its checksum" in out.stderr and "Traceback" not in out.stderr

    js = trainctl("ckpt", "download", file_url, "-o", str(tmp_path / "dl"), "--output", "json")
    assert js.returncode == 1
    assert json.loads(js.stdout)["type"] == "IntegrityError"
    assert not (tmp_path / "dl" / "x.ckpt").exists()


@pytest.mark.slow
def test_errors_are_one_line_with_what_to_do(tmp_path, s3):
    cases = [
        (("ckpt", "ls", "nosuch://bucket/run"), "unknown storage protocol 'nosuch'"),
        (("ckpt", "download", f"file://{tmp_path}/empty"), "no complete checkpoint in"),
        (("ckpt", "upload", str(tmp_path / "missing.ckpt"), f"file://{tmp_path}/s"), "does not exist"),
        (
            ("ckpt", "upload", str(_lightning_like_ckpt(tmp_path / "a.ckpt", 1)), "s3://no-such-bucket/run"),
            "bucket of s3://no-such-bucket/run does not exist: create it first",
        ),
        # an empty listing on a missing bucket is a typo, not "no checkpoints"
        (("ckpt", "ls", "s3://no-such-bucket/x"), "bucket 'no-such-bucket' of s3://no-such-bucket/x does not exist"),
        (("runs", "ls", "s3://no-such-bucket/x"), "bucket 'no-such-bucket' of s3://no-such-bucket/x does not exist"),
    ]
    for args, message in cases:
        out = trainctl(*args, env=s3.env())
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert message in out.stderr and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr


@pytest.mark.slow
def test_secrets_never_reach_output(tmp_path, s3):
    secret = "sEcReT-do-not-print-123"
    env = {**s3.env(), "AWS_SECRET_ACCESS_KEY": secret}
    # each command must really run (read the store, fail on it, log verbosely) for its silence to mean anything
    ckpt = str(_lightning_like_ckpt(tmp_path / "a.ckpt", 1))
    cases = [
        (("ckpt", "ls", s3.url(), "--output", "json"), 0),
        (("ckpt", "upload", ckpt, "s3://no-such-bucket/x"), 1),
        (("-v", "ckpt", "ls", s3.url()), 0),
    ]
    for args, returncode in cases:
        out = trainctl(*args, env=env)
        assert out.returncode == returncode, (args, out.stdout, out.stderr)
        assert secret not in out.stdout + out.stderr


def test_version_and_help():
    out = trainctl("--version")
    assert out.returncode == 0 and out.stdout.startswith("trainctl-lightning ")
    helped = trainctl("ckpt", "--help")
    for command in ("ls", "download", "upload", "verify"):
        assert command in helped.stdout


def test_gc_lists_then_deletes_orphaned_upload_data(file_url, tmp_path):
    store = RunStore(file_url)
    good = store.publish_checkpoint([_lightning_like_ckpt(tmp_path / "good.ckpt", 1)], global_step=1)
    orphan = Path(store.objects.path("checkpoints", "0000000009-half-0badf00d", "half.ckpt"))
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"partial")

    listed = trainctl("ckpt", "gc", file_url, "--older-than", "0")
    assert listed.returncode == 0 and "would delete" in listed.stdout and "0000000009-half-0badf00d" in listed.stdout
    assert orphan.exists()
    young = trainctl("ckpt", "gc", file_url, "--yes", "--output", "json")  # default: only folders older than 1 h
    assert json.loads(young.stdout)["orphans"] == [] and orphan.exists()
    deleted = trainctl("ckpt", "gc", file_url, "--older-than", "0", "--yes", "--output", "json")
    assert json.loads(deleted.stdout)["orphans"] == [{"id": "0000000009-half-0badf00d", "deleted_objects": 1}]
    assert not orphan.exists()
    assert [m.id for m in store.list_checkpoints()] == [good.id]
