"""Launch defaults from real trainctl.toml / pyproject.toml files, and `trainctl config` as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from trainctl_lightning.config import (
    Settings,
    find_config_file,
    load_config,
    read_config_file,
    validate_file,
)
from trainctl_lightning.errors import ConfigError
from trainctl_lightning.paths import default_store_url
from trainctl_lightning.providers import provider_names

TRAINCTL = [sys.executable, "-m", "trainctl_lightning.cli.app"]

PROJECT_TOML = """\
provider = "aws"
store = "s3://team-bucket/runs"
region = "us-east-1"
env = { WANDB_PROJECT = "mnist" }
forward_env = ["WANDB_API_KEY"]
setup = ["pip install -e ."]
default_profile = "gpu"

[profiles.gpu]
instance_type = "g5.xlarge"
spot = true
max_hours = 12
env = { NCCL_DEBUG = "WARN" }

[profiles.dev]
provider = "local"
store = "memory://dev-runs"
setup = []
"""


def trainctl(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {}), "COLUMNS": "200"}
    return subprocess.run([*TRAINCTL, *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=120)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project with a trainctl.toml at its root and a nested source folder."""
    write(tmp_path / "proj" / "trainctl.toml", PROJECT_TOML)
    (tmp_path / "proj" / "src" / "pkg").mkdir(parents=True)
    return tmp_path / "proj"


# --- finding the file ---------------------------------------------------------------------------


def test_pyproject_tool_table_is_found_from_a_subdirectory(tmp_path):
    pyproject = write(
        tmp_path / "repo" / "pyproject.toml",
        '[project]\nname = "demo"\n\n[tool.trainctl]\nprovider = "aws"\nregion = "eu-west-1"\n\n'
        '[tool.trainctl.profiles.big]\ninstance_type = "p4d.24xlarge"\n',
    )
    # a nearer pyproject.toml without [tool.trainctl] (a sub-package) is not a config file
    write(tmp_path / "repo" / "libs" / "pyproject.toml", '[project]\nname = "lib"\n')
    start = tmp_path / "repo" / "libs" / "src"
    start.mkdir(parents=True)

    assert find_config_file(start) == pyproject
    resolved = load_config(start, profile="big")
    assert (resolved.settings.provider, resolved.settings.region) == ("aws", "eu-west-1")
    assert resolved.settings.instance_type == "p4d.24xlarge"
    assert resolved.files == [str(pyproject)]
    assert resolved.sources["region"] == str(pyproject)
    assert resolved.sources["instance_type"] == f"{pyproject} [profile big]"


def test_trainctl_toml_beats_pyproject_in_its_directory_and_the_nearest_directory_wins(tmp_path):
    root = tmp_path / "repo"
    write(root / "pyproject.toml", '[tool.trainctl]\nregion = "from-pyproject"\n')
    own = write(root / "trainctl.toml", 'region = "from-trainctl-toml"\n')
    assert find_config_file(root) == own
    assert load_config(root).settings.region == "from-trainctl-toml"

    nearer = write(root / "sub" / "pyproject.toml", '[tool.trainctl]\nregion = "from-sub"\n')
    assert find_config_file(root / "sub") == nearer
    assert load_config(root / "sub").settings.region == "from-sub", "the first directory with a config wins"


def test_without_a_file_everything_is_the_default(tmp_path):
    resolved = load_config(tmp_path)
    assert resolved.settings == Settings()
    assert (resolved.profile, resolved.files) == (None, [])
    assert set(resolved.sources.values()) == {"default"}
    assert resolved.settings.store_url() == default_store_url()
    assert os.environ["TRAINCTL_HOME"] in resolved.settings.store_url()


def test_load_config_searches_from_the_cwd_by_default(project, monkeypatch):
    monkeypatch.chdir(project / "src" / "pkg")
    assert load_config().files == [str(project / "trainctl.toml")]


def test_a_broken_pyproject_is_an_error_only_if_it_mentions_trainctl(tmp_path):
    write(tmp_path / "a" / "pyproject.toml", "[project\nname = 1\n")
    assert find_config_file(tmp_path / "a") is None, "someone else's broken pyproject.toml is not ours to report"

    write(tmp_path / "b" / "pyproject.toml", "[tool.trainctl]\nprovider = \n")
    with pytest.raises(ConfigError, match=r"pyproject.toml: invalid TOML: .*line 2"):
        find_config_file(tmp_path / "b")


# --- profiles and precedence ------------------------------------------------------------------------


def test_default_profile_applies_over_the_base_settings(project):
    resolved = load_config(project)
    s = resolved.settings
    assert resolved.profile == "gpu"
    assert (s.provider, s.store, s.region, s.instance_type, s.spot, s.max_hours) == (
        "aws",
        "s3://team-bucket/runs",
        "us-east-1",
        "g5.xlarge",
        True,
        12.0,
    )
    assert s.env == {"WANDB_PROJECT": "mnist", "NCCL_DEBUG": "WARN"}, "tables merge key by key"
    assert s.forward_env == ["WANDB_API_KEY"] and s.setup == ["pip install -e ."]
    path = str(project / "trainctl.toml")
    assert resolved.sources["spot"] == f"{path} [profile gpu]"
    assert resolved.sources["region"] == path
    assert resolved.sources["env"] == f"{path} [profile gpu]"
    assert resolved.sources["disk_gb"] == "default"


def test_profile_argument_beats_trainctl_profile_beats_default_profile(project, monkeypatch):
    monkeypatch.setenv("TRAINCTL_PROFILE", "dev")
    dev = load_config(project)
    assert dev.profile == "dev"
    assert (dev.settings.provider, dev.settings.store, dev.settings.instance_type) == ("local", "memory://dev-runs", None)
    assert dev.settings.setup == [], "lists are replaced, not appended"

    assert load_config(project, profile="gpu").profile == "gpu"


def test_env_vars_beat_the_file_and_overrides_beat_everything(project, monkeypatch):
    monkeypatch.setenv("TRAINCTL_PROVIDER", "local")
    monkeypatch.setenv("TRAINCTL_STORE", "memory://from-env")
    resolved = load_config(project, overrides={"store": "file:///tmp/cli-runs", "instance_type": None, "spot": False})
    s = resolved.settings
    assert s.provider == "local" and resolved.sources["provider"] == "env TRAINCTL_PROVIDER"
    assert s.store == "file:///tmp/cli-runs" and resolved.sources["store"] == "command line"
    assert s.spot is False and resolved.sources["spot"] == "command line", "False is a value, not 'not given'"
    assert s.instance_type == "g5.xlarge", "a None override (flag not given) leaves the file's value"
    assert resolved.sources["instance_type"].endswith("[profile gpu]")


def test_merged_skips_none_merges_tables_and_validates_again():
    base = Settings(provider="aws", env={"A": "1"}, setup=["make"], max_hours=2)
    out = base.merged(instance_type="g5.xlarge", region=None, env={"B": "2"}, setup=["make deps"], max_hours=3)
    assert (out.provider, out.instance_type, out.region, out.max_hours) == ("aws", "g5.xlarge", None, 3.0)
    assert out.env == {"A": "1", "B": "2"} and out.setup == ["make deps"]
    assert base.env == {"A": "1"}, "the original is untouched"

    with pytest.raises(ConfigError, match=r"^max_hours = -1 must be a finite number > 0$"):
        base.merged(max_hours=-1)
    with pytest.raises(ConfigError, match=r"unknown setting 'instance'.*did you mean 'instance_type'\?"):
        base.merged(instance="g5")
    with pytest.raises(ConfigError, match=r"env.GITHUB_TOKEN looks like a secret"):
        base.merged(env={"GITHUB_TOKEN": "x"})


def test_settings_normalize_and_validate_on_construction():
    from trainctl_lightning.jobs.spec import EnvMode

    s = Settings(env_mode=EnvMode.ISOLATED, code_max_mb=5, disk_gb=200)
    assert s.env_mode == "isolated" and isinstance(s.code_max_mb, float)
    with pytest.raises(ConfigError, match=r"^disk_gb = 1.5 must be a whole number, got a float$"):
        Settings(disk_gb=1.5)
    with pytest.raises(ConfigError, match=r"provider = 'gcp' is not a provider"):
        Settings(provider="gcp")


def test_every_setting_has_a_check():
    from trainctl_lightning.config import _CHECKS

    assert set(_CHECKS) == {f.name for f in fields(Settings)}


# --- validation messages ---------------------------------------------------------------------------

ALLOWED_PROVIDERS = ", ".join(provider_names())

BAD_FILES = [
    pytest.param('instanse_type = "g5.xlarge"\n', ["unknown key 'instanse_type'", "did you mean 'instance_type'?"], id="typo"),
    pytest.param(
        '[profiles.gpu]\nregoin = "us-east-1"\n',
        ["unknown key 'profiles.gpu.regoin'", "did you mean 'region'?"],
        id="typo-in-profile",
    ),
    pytest.param(
        "zzz = 1\n", ["unknown key 'zzz'", "known keys: code_max_mb, default_profile, disk_gb"], id="unknown-no-suggestion"
    ),
    pytest.param('provider = "gcp"\n', [f"provider = 'gcp' is not a provider: choose one of {ALLOWED_PROVIDERS}"], id="provider"),
    pytest.param(
        '[profiles.gpu]\nenv_mode = "fresh"\n',
        ["profiles.gpu.env_mode = 'fresh' is not valid: choose one of auto, reuse, isolated"],
        id="env_mode",
    ),
    pytest.param('disk_gb = "100"\n', ["disk_gb = '100' must be a whole number, got a string"], id="type-int"),
    pytest.param('spot = "yes"\n', ["spot = 'yes' must be true or false, got a string"], id="type-bool"),
    pytest.param(
        'setup = "pip install ."\n', ["setup = 'pip install .' must be an array of strings", "got a string"], id="type-list"
    ),
    pytest.param("env = { SEED = 1 }\n", ["env.SEED = 1 must be a string (quote it), got an integer"], id="type-env-value"),
    pytest.param("max_hours = -2\n", ["max_hours = -2 must be a finite number > 0"], id="negative"),
    pytest.param("[profiles.cpu]\ncode_max_mb = 0\n", ["profiles.cpu.code_max_mb = 0 must be a finite number > 0"], id="zero"),
    pytest.param(
        'env = { AWS_SECRET_ACCESS_KEY = "abc" }\n',
        ["env.AWS_SECRET_ACCESS_KEY looks like a secret", 'forward_env = ["AWS_SECRET_ACCESS_KEY"]'],
        id="secret-env",
    ),
    pytest.param('forward_env = ["MY-VAR"]\n', ["forward_env[0] = 'MY-VAR' is not an environment variable name"], id="env-name"),
    pytest.param('store = "nope://bucket/runs"\n', ["store: unknown storage protocol 'nope'"], id="store"),
    pytest.param(
        'default_profile = "gpux"\n[profiles.gpu]\nspot = true\n',
        ["default_profile = 'gpux' is not a profile in this file; profiles in this file: gpu"],
        id="default_profile",
    ),
    pytest.param('profiles = "gpu"\n', ["profiles = 'gpu' must be a table"], id="profiles-not-a-table"),
    pytest.param('provider = "aws"\nregion = \nspot = true\n', ["invalid TOML", "line 2"], id="toml"),
]


@pytest.mark.parametrize("text, expected", BAD_FILES)
def test_bad_file_gives_one_line_naming_file_key_value_and_what_is_allowed(tmp_path, text, expected):
    path = write(tmp_path / "trainctl.toml", text)
    with pytest.raises(ConfigError) as info:
        validate_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for part in expected:
        assert part in message
    with pytest.raises(ConfigError) as loading:
        load_config(tmp_path)
    assert str(loading.value) == message, "loading refuses the file with the same message"


def test_pyproject_errors_name_the_full_dotted_key(tmp_path):
    path = write(tmp_path / "pyproject.toml", "[tool.trainctl.profiles.gpu]\nspot = 1\n")
    with pytest.raises(
        ConfigError, match=r"pyproject.toml: tool.trainctl.profiles.gpu.spot = 1 must be true or false, got an integer$"
    ):
        validate_file(path)
    write(tmp_path / "other" / "pyproject.toml", '[project]\nname = "x"\n')
    with pytest.raises(ConfigError, match=r"has no tool.trainctl table"):
        validate_file(tmp_path / "other" / "pyproject.toml")


def test_unknown_profile_names_the_known_ones(project, monkeypatch, tmp_path):
    path = project / "trainctl.toml"
    with pytest.raises(ConfigError, match=rf"^unknown profile 'gpx': profiles in {path}: dev, gpu$"):
        load_config(project, profile="gpx")
    monkeypatch.setenv("TRAINCTL_PROFILE", "prod")
    with pytest.raises(ConfigError, match=r"unknown profile 'prod' \(from TRAINCTL_PROFILE\): profiles in .*: dev, gpu"):
        load_config(project)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(ConfigError, match=r"unknown profile 'prod' \(from TRAINCTL_PROFILE\): no config file in "):
        load_config(elsewhere)


def test_bad_env_vars_and_overrides_say_where_they_came_from(project, monkeypatch):
    monkeypatch.setenv("TRAINCTL_PROVIDER", "gcp")
    with pytest.raises(
        ConfigError,
        match=rf"^environment variable TRAINCTL_PROVIDER: provider = 'gcp' is not a provider: choose one of {ALLOWED_PROVIDERS}$",
    ):
        load_config(project)
    monkeypatch.delenv("TRAINCTL_PROVIDER")
    with pytest.raises(ConfigError, match=r"^command line: disk_gb = -10 must be > 0$"):
        load_config(project, overrides={"disk_gb": -10})
    with pytest.raises(ConfigError, match=r"^command line: unknown setting 'instance_typ': did you mean 'instance_type'\?$"):
        load_config(project, overrides={"instance_typ": "g5"})


def test_read_config_file_lists_profiles_and_default(project):
    config = read_config_file(project / "trainctl.toml")
    assert sorted(config.profiles) == ["dev", "gpu"] and config.default_profile == "gpu"
    assert config.base["provider"] == "aws" and config.profiles["gpu"]["max_hours"] == 12.0


# --- the CLI --------------------------------------------------------------------------------------


def test_config_show_json_from_a_subdirectory(project):
    out = trainctl("config", "show", "--output", "json", cwd=project / "src" / "pkg", env={"TRAINCTL_STORE": "memory://x"})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    path = str(project / "trainctl.toml")
    assert data["profile"] == "gpu" and data["files"] == [path]
    assert data["settings"]["instance_type"] == "g5.xlarge" and data["settings"]["spot"] is True
    assert data["settings"]["store"] == "memory://x" and data["sources"]["store"] == "env TRAINCTL_STORE"
    assert data["sources"]["instance_type"] == f"{path} [profile gpu]" and data["sources"]["image"] == "default"
    assert set(data["settings"]) == set(data["sources"]) == {f.name for f in fields(Settings)}


def test_config_show_table_names_each_source(project):
    out = trainctl("config", "show", "--profile", "dev", cwd=project)
    assert out.returncode == 0, out.stderr
    assert "profile dev" in out.stdout
    provider_row = next(line for line in out.stdout.splitlines() if " provider " in line)
    assert "local" in provider_row and "[profile dev]" in provider_row
    assert "WANDB_PROJECT=mnist" in out.stdout


def test_config_show_bad_config_is_one_line_exit_1_and_creates_nothing(project):
    write(project / "src" / "trainctl.toml", 'provider = "gcp"\n')
    home = Path(os.environ["TRAINCTL_HOME"])
    before = sorted(home.rglob("*"))
    out = trainctl("config", "show", cwd=project / "src" / "pkg")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1, f"one line expected, got: {out.stderr!r}"
    assert "provider = 'gcp' is not a provider" in out.stderr and "Traceback" not in out.stderr
    assert sorted(home.rglob("*")) == before

    out = trainctl("config", "show", "--profile", "nope", cwd=project)
    assert out.returncode == 1 and "unknown profile 'nope'" in out.stderr


def test_config_validate_exit_codes(project, tmp_path):
    ok = trainctl("config", "validate", cwd=project / "src")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"ok: {project / 'trainctl.toml'} (profiles: dev, gpu)"

    bad = write(tmp_path / "bad" / "trainctl.toml", '[profiles.gpu]\ninstance_typ = "g5"\n')
    out = trainctl("config", "validate", str(bad), "--output", "json", cwd=tmp_path)
    assert out.returncode == 1
    assert json.loads(out.stdout) == {
        "error": f"{bad}: unknown key 'profiles.gpu.instance_typ': did you mean 'instance_type'?",
        "type": "ConfigError",
    }

    empty = tmp_path / "empty"
    empty.mkdir()
    out = trainctl("config", "validate", cwd=empty)
    assert out.returncode == 1 and "no config file in" in out.stderr
