"""Shared fixtures: a real S3 endpoint (moto's server on 127.0.0.1), run stores, tiny models."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import pytest

from tests.helpers.agent import stop_started_agents
from tests.helpers.aws import serve_placement_groups
from trainctl_lightning.testing import DUMMY_ENV, LocalS3

BUCKET = "trainctl-test"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test reads real AWS config, or writes outside its temp dirs."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("TRAINCTL_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("TRAINCTL_RUN_URL", raising=False)
    monkeypatch.delenv("TRAINCTL_PROFILE", raising=False)
    # local-provider instances and the default store live under TRAINCTL_HOME
    monkeypatch.setenv("TRAINCTL_HOME", str(tmp_path_factory.mktemp("trainctl-home")))
    # Whatever a test writes to a relative path (Lightning's default checkpoint and log folders)
    # lands in its own temp dir, never in the checkout.
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session")
def s3_server():
    server = LocalS3().start()
    serve_placement_groups()  # moto has no placement groups: see tests/helpers/aws.py
    yield server
    server.stop()


@dataclass
class S3:
    server: LocalS3
    bucket: str

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def url(self, name: str | None = None) -> str:
        return f"s3://{self.bucket}/runs/{name or uuid.uuid4().hex[:8]}"

    def env(self) -> dict[str, str]:
        return self.server.env()


def _clear_fsspec_caches() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3(s3_server: LocalS3, monkeypatch: pytest.MonkeyPatch) -> S3:
    """An empty bucket on a freshly reset moto server, with dummy credentials in the env."""
    s3_server.reset()
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    _clear_fsspec_caches()
    s3_server.create_bucket(BUCKET)
    yield S3(s3_server, BUCKET)
    _clear_fsspec_caches()


@pytest.fixture
def file_url(tmp_path) -> str:
    return f"file://{tmp_path}/store/run"


@pytest.fixture
def memory_url() -> str:
    url = f"memory://trainctl-tests/{uuid.uuid4().hex[:8]}"
    yield url
    import fsspec

    fs = fsspec.filesystem("memory")
    path = url.removeprefix("memory://")
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture(params=["file", "memory", "s3"])
def store_url(request: pytest.FixtureRequest) -> str:
    """The same test against every backend we support."""
    if request.param == "s3":
        return request.getfixturevalue("s3").url()
    return request.getfixturevalue(f"{request.param}_url")


__all__ = ["DUMMY_ENV", "S3"]


@pytest.fixture
def file_store(tmp_path) -> str:
    """A store root on the local disk (runs go below it)."""
    return f"file://{tmp_path}/store"


@pytest.fixture
def workdir(tmp_path):
    """The agent's working directory for a test; agents the test started are stopped when it ends."""
    yield tmp_path / "agent-work"
    stop_started_agents()
