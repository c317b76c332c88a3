"""Secrets and file modes through code sync, as a user launches a project full of credential files:
none of them reaches the store, the blob cache or the instance, each is named, modes survive,
and what trainctl keeps on this machine is private to the user."""

from __future__ import annotations

import json
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.cli import trainctl
from tests.helpers.jobs import release_local_instances
from tests.helpers.leftovers import assert_nothing_running
from trainctl_lightning.paths import trainctl_home

#: Credential files as tools leave them in a project (path -> file name the tool uses).
CREDENTIAL_FILES = [
    "credentials",
    ".aws/credentials",
    ".aws/config",
    ".ssh/id_ecdsa",
    ".ssh/id_rsa",
    ".ssh/config",
    ".ssh/known_hosts",
    ".ssh/authorized_keys",
    "deploy/id_ed25519",
    ".git-credentials",
    ".netrc",
    ".docker/config.json",
    ".kaggle/kaggle.json",
    "certs/client.p12",
    "certs/client.pfx",
    "certs/server.pem",
    "certs/server.key",
    ".pgpass",
    ".envrc",
    ".env",
    "config/.env.production",
    ".npmrc",
    ".pypirc",
    "gcloud/application_default_credentials.json",
]
#: How each is reported: a whole folder by its name.
REPORTED = sorted({".aws/", ".ssh/"} | {p for p in CREDENTIAL_FILES if not p.startswith((".aws/", ".ssh/"))})


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def files_below(*roots: Path) -> list[Path]:
    return [Path(d) / name for root in roots for d, _, names in os.walk(root) for name in names]


@pytest.fixture(autouse=True)
def _release_instances() -> Iterator[None]:
    yield
    release_local_instances()


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A project holding every credential file (each with its own secret), links to secrets, a
    private config file and an executable script. Returns it with path -> secret content."""
    root = tmp_path / "project"
    secrets = {}
    for rel in CREDENTIAL_FILES:
        secrets[rel] = f"SECRET-{uuid.uuid4().hex}".encode()
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(secrets[rel])
    outside = tmp_path / "home" / ".aws" / "credentials"
    outside.parent.mkdir(parents=True)
    secrets["outside"] = f"SECRET-{uuid.uuid4().hex}".encode()
    outside.write_bytes(secrets["outside"])
    (root / "settings.cfg").symlink_to(root / ".env")  # a link to .env is .env
    (root / "conf").mkdir()
    (root / "conf" / "aws.ini").symlink_to(outside)  # a link out of the project
    (root / "private.cfg").write_text("lr = 0.1\n")
    (root / "private.cfg").chmod(0o600)
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "train.py").write_text("print('trained', flush=True)\n")
    return root, secrets


def test_launch_uploads_no_credential_file_names_them_and_keeps_modes(project: tuple[Path, dict[str, bytes]]) -> None:
    root, secrets = project
    created = trainctl("create", "--output", "json", cwd=root)
    assert created.returncode == 0, created.stderr
    instance = json.loads(created.stdout)

    result = trainctl("launch", "train.py", "--instance", instance["id"], "--output", "json", cwd=root)
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)
    assert run["state"] == "succeeded" and "trained" in result.stderr

    # every skipped file is named (names only) in the launch's output
    [line] = [ln for ln in result.stderr.splitlines() if "may hold secrets" in ln]
    named = line.split("): ", 1)[1].split(" (a '!NAME' line")[0].split(", ")
    assert named == sorted([*REPORTED, "settings.cfg", "conf/aws.ini"])

    home = trainctl_home()
    cache = Path(os.environ["TRAINCTL_CACHE_DIR"])
    code = Path(instance["details"]["workdir"]) / "runs" / run["run_id"] / "code"
    assert sorted(p.relative_to(code).as_posix() for p in files_below(code)) == ["private.cfg", "run.sh", "train.py"]

    # no secret in any object of the store, the blob cache, the instance copy, logs or records
    leaks = [
        f"{path}: {name}"
        for path in files_below(home, cache)
        for name, secret in secrets.items()
        if not path.is_symlink() and secret in path.read_bytes()
    ]
    assert leaks == []

    # the run's key went to the agent only: a finished plain launch keeps no copy here
    assert not (home / "keys").exists() or list((home / "keys").iterdir()) == []

    # modes survive the round trip: private stays private, executable stays executable
    assert mode_of(code / "private.cfg") == 0o600
    assert mode_of(code / "run.sh") == 0o755
    assert mode_of(code / "train.py") == mode_of(root / "train.py")
    manifest = json.loads((home / "store" / run["run_id"] / "code.json").read_bytes())
    assert {p: e["mode"] for p, e in manifest["files"].items()} == {
        "private.cfg": 0o600,
        "run.sh": 0o755,
        "train.py": mode_of(root / "train.py"),
    }

    # what trainctl keeps on this machine is the user's only
    folders = [Path(d) for d, _, _ in os.walk(home)] + [Path(d) for d, _, _ in os.walk(cache)]
    assert {str(d): oct(mode_of(d)) for d in folders if mode_of(d) != 0o700} == {}
    kept = files_below(home / "store", home / "local" / "instances" / instance["id"], cache)
    not_private = {str(p): oct(mode_of(p)) for p in kept if code not in p.parents and mode_of(p) != 0o600}
    assert not_private == {}

    ended = trainctl("terminate", instance["id"], cwd=root)
    assert ended.returncode == 0, ended.stderr
    assert_nothing_running()
