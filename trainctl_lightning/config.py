"""Launch defaults from ``trainctl.toml`` or ``[tool.trainctl]`` in ``pyproject.toml``.

The file is found by searching from the current directory upward; the first directory holding
a ``trainctl.toml``, or a ``pyproject.toml`` with a ``[tool.trainctl]`` table, wins (both in one
directory: ``trainctl.toml``). Its top-level keys are the base settings; each
``[profiles.NAME]`` table overrides them when that profile is chosen::

    # trainctl.toml  (in pyproject.toml: the same under [tool.trainctl] and [tool.trainctl.profiles.gpu])
    provider = "aws"
    store = "s3://my-bucket/runs"
    region = "us-east-1"
    env = { WANDB_PROJECT = "mnist" }
    forward_env = ["WANDB_API_KEY"]        # secrets: passed from your environment, never stored
    setup = ["pip install -e ."]
    default_profile = "gpu"

    [profiles.gpu]
    instance_type = "g5.xlarge"
    spot = true
    max_hours = 12

    [profiles.dev]
    provider = "local"
    store = "file:///tmp/trainctl-runs"

Precedence, lowest first: the :class:`Settings` defaults, the file's base settings, the chosen
profile (``profile=`` argument, else ``$TRAINCTL_PROFILE``, else ``default_profile``),
``$TRAINCTL_PROVIDER`` / ``$TRAINCTL_STORE``, then ``overrides`` (command-line flags; ``None``
means "flag not given" and is skipped). Tables (``env``, ``tags``, ``options``) merge key by key
across these layers; every other value, lists included, is replaced.

Every value is checked when it is read: a bad one raises :class:`ConfigError` with one line
naming the file, the dotted key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from trainctl_lightning.errors import ConfigError
from trainctl_lightning.jobs.spec import EnvMode, looks_secret
from trainctl_lightning.limits import MAX_RUNTIME_LIMIT_S
from trainctl_lightning.paths import default_store_url
from trainctl_lightning.providers import provider_names

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

CONFIG_FILE = "trainctl.toml"
PYPROJECT_FILE = "pyproject.toml"
PROFILE_ENV = "TRAINCTL_PROFILE"
#: Settings that an environment variable can set, between the file and the command line.
ENV_VARS: dict[str, str] = {"provider": "TRAINCTL_PROVIDER", "store": "TRAINCTL_STORE"}


@dataclass(frozen=True)
class Settings:
    """Defaults for launching a job: where it runs, what it gets, where its run is stored.

    Every value is validated on construction (and by :meth:`merged`); a bad one raises
    :class:`ConfigError`.
    """

    provider: str = "local"
    """Where instances come from: one of :func:`trainctl_lightning.providers.provider_names`."""
    store: str | None = None
    """fsspec URL under which runs are stored; None: :func:`~trainctl_lightning.paths.default_store_url`."""
    instance_type: str | None = None
    """Provider's machine type, e.g. ``g5.xlarge``; None: the provider's default."""
    spot: bool = False
    """Ask for a spot / preemptible instance (cheaper; may be taken back, the run resumes from its checkpoint)."""
    region: str | None = None
    """Provider region, e.g. ``us-east-1``; None: the provider's default (for AWS, your AWS config)."""
    image: str | None = None
    """Machine image (AWS: an AMI id); None: the provider's default deep-learning image."""
    disk_gb: int | None = None
    """Root disk size in GB; None: the provider's default."""
    max_hours: float | None = None
    """Hard cap on a run and on the life of an instance it created, in hours; None: no cap."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables for the job, stored with it; secret-looking names are refused (use ``forward_env``)."""
    forward_env: list[str] = field(default_factory=list)
    """Names of variables passed from the launcher's environment to the job, never stored."""
    setup: list[str] = field(default_factory=list)
    """Shell commands run on the instance, in the code root, before the job."""
    env_mode: str = "auto"
    """How the job gets a Python environment: one of the :class:`~trainctl_lightning.jobs.spec.EnvMode` values."""
    code_max_mb: float = 100.0
    """Refuse to upload a code bundle larger than this (MB): usually data or checkpoints in the code folder."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra tags on everything the provider creates (beside trainctl's own)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Provider-specific options, checked by the provider.

    aws: ``subnet_id``, ``security_group_ids``, ``key_name``, ``iam_instance_profile``, ...
    """

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                # normalized copies: ints become floats, EnvMode becomes its value, tables are not shared
                object.__setattr__(self, f.name, _CHECKS[f.name](value, f.name, ""))

    def store_url(self) -> str:
        """The store URL to use: :attr:`store`, or the default store under ``$TRAINCTL_HOME``."""
        return self.store or default_store_url()

    def merged(self, **overrides: Any) -> Settings:
        """A copy with ``overrides`` applied; ``None`` values (flags not given) are skipped.

        Tables (``env``, ``tags``, ``options``) are merged key by key; other values replace.

        Raises:
            ConfigError: an unknown setting or an invalid value.

        Example::

            settings.merged(instance_type="g5.2xlarge", spot=None, env={"SEED": "1"})
        """
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            if value is None:
                continue
            _check_known(key, _FIELD_NAMES, "", what="setting")
            changes[key] = {**getattr(self, key), **value} if key in _TABLES and isinstance(value, dict) else value
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ResolvedConfig:
    """The settings in effect, and where each came from."""

    settings: Settings
    profile: str | None
    """The profile applied, or None."""
    sources: dict[str, str]
    """Field name -> where its value came from: ``"default"``, ``"<file>"``, ``"<file> [profile NAME]"``,
    ``"env TRAINCTL_..."`` or ``"command line"``."""
    files: list[str]
    """The config file read (at most one), as an absolute path."""


@dataclass(frozen=True)
class ConfigFile:
    """One config file, read and validated: base settings, profiles, default profile."""

    path: Path
    base: dict[str, Any]
    """The top-level settings (validated, normalized), only those the file sets."""
    profiles: dict[str, dict[str, Any]]
    """Profile name -> the settings it sets."""
    default_profile: str | None
    prefix: str
    """Where the settings table is in the file: ``""``, or ``"tool.trainctl."`` in a pyproject.toml."""


def find_config_file(start: str | Path | None = None) -> Path | None:
    """The config file that applies at ``start`` (a directory or a file in it; default: the cwd).

    Searches ``start`` and each parent up to the filesystem root; in the first directory with
    a ``trainctl.toml``, or a ``pyproject.toml`` that has a ``[tool.trainctl]`` table, returns
    that file (``trainctl.toml`` if both). None if there is none.

    Raises:
        ConfigError: a ``pyproject.toml`` on the way mentions trainctl but is not valid TOML.
    """
    here = Path(start if start is not None else os.getcwd()).expanduser().resolve()
    if here.is_file():
        here = here.parent
    for directory in (here, *here.parents):
        candidate = directory / CONFIG_FILE
        if candidate.is_file():
            return candidate
        pyproject = directory / PYPROJECT_FILE
        if pyproject.is_file() and _has_trainctl_table(pyproject):
            return pyproject
    return None


def read_config_file(path: str | Path) -> ConfigFile:
    """Read and validate one config file: every key of the base settings and of every profile.

    A file named ``pyproject.toml`` is read from its ``[tool.trainctl]`` table; any other file
    is a ``trainctl.toml`` (settings at the top level).

    Raises:
        ConfigError: the file is missing, not TOML, has no ``[tool.trainctl]`` (pyproject), or
            holds an unknown key or an invalid value. The one-line message names the file and key.
    """
    path = Path(path).expanduser().resolve()
    where = f"{path}: "
    document = _load_toml(path)
    prefix = ""
    table: Any = document
    if path.name == PYPROJECT_FILE:
        prefix = "tool.trainctl."
        table = document.get("tool", {}).get("trainctl") if isinstance(document.get("tool"), dict) else None
        if table is None:
            raise ConfigError(f"{where}has no tool.trainctl table: add one, or put the settings in {CONFIG_FILE}")
        if not isinstance(table, dict):
            raise _invalid(where, "tool.trainctl", table, f"must be a table, got {_toml_type(table)}")

    base = _read_settings(table, prefix, where, extra=("profiles", "default_profile"))

    raw_profiles = table.get("profiles", {})
    if not isinstance(raw_profiles, dict):
        problem = f"must be a table with one table per profile, got {_toml_type(raw_profiles)}"
        raise _invalid(where, f"{prefix}profiles", raw_profiles, problem)
    profiles: dict[str, dict[str, Any]] = {}
    for name, body in raw_profiles.items():
        key = f"{prefix}profiles.{name}"
        if not isinstance(body, dict):
            raise _invalid(where, key, body, f"must be a table of settings, got {_toml_type(body)}")
        profiles[name] = _read_settings(body, f"{key}.", where)

    default = table.get("default_profile")
    if default is not None:
        if not isinstance(default, str):
            raise _invalid(where, f"{prefix}default_profile", default, f"must be a string, got {_toml_type(default)}")
        if default not in profiles:
            problem = f"is not a profile in this file; {_known_profiles(profiles)}"
            raise _invalid(where, f"{prefix}default_profile", default, problem)
    return ConfigFile(path=path, base=base, profiles=profiles, default_profile=default, prefix=prefix)


def validate_file(path: str | Path) -> None:
    """Check one config file and every profile in it, without applying any of it.

    Raises:
        ConfigError: the first problem found, in one line naming the file and key.
    """
    read_config_file(path)


def load_config(
    start: str | Path | None = None,
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> ResolvedConfig:
    """The settings in effect at ``start`` (default: the cwd), with where each came from.

    Args:
        start: directory (or file) from which the config file is searched upward.
        profile: profile to apply; None: ``$TRAINCTL_PROFILE``, else the file's ``default_profile``.
        overrides: values from the command line, by field name; None values are skipped.

    Raises:
        ConfigError: a bad file, a bad ``TRAINCTL_*`` variable, an unknown profile, or a bad
            override. Nothing is created either way.

    Example::

        resolved = load_config(profile="gpu", overrides={"instance_type": args.instance_type})
        resolved.settings.store_url(), resolved.sources["instance_type"]
    """
    path = find_config_file(start)
    config = read_config_file(path) if path else None

    values: dict[str, Any] = {}
    sources = {name: "default" for name in _FIELD_NAMES}

    def apply(layer: dict[str, Any], label: str) -> None:
        for key, value in layer.items():
            values[key] = {**values[key], **value} if key in _TABLES and key in values else value
            sources[key] = label

    chosen, asked_by = _choose_profile(profile, config)
    if chosen is not None:
        if config is None:
            searched = Path(start if start is not None else os.getcwd()).expanduser().resolve()
            raise ConfigError(
                f"unknown profile {chosen!r}{asked_by}: no config file in {searched} or above "
                f"(create {CONFIG_FILE}, or add a tool.trainctl table to {PYPROJECT_FILE})"
            )
        if chosen not in config.profiles:
            raise ConfigError(f"unknown profile {chosen!r}{asked_by}: {_known_profiles(config.profiles, config.path)}")
    if config is not None:
        apply(config.base, str(config.path))
        if chosen is not None:
            apply(config.profiles[chosen], f"{config.path} [profile {chosen}]")

    for name, var in ENV_VARS.items():
        raw = os.environ.get(var, "").strip()
        if raw:
            apply({name: _CHECKS[name](raw, name, f"environment variable {var}: ")}, f"env {var}")

    given = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        _check_known(key, _FIELD_NAMES, "command line: ", what="setting")
        given[key] = _CHECKS[key](value, key, "command line: ")
    apply(given, "command line")

    return ResolvedConfig(
        settings=Settings(**values),
        profile=chosen,
        sources=sources,
        files=[str(config.path)] if config else [],
    )


# --- reading ---------------------------------------------------------------------------------


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        # the parser's message carries the position: "... (at line 3, column 9)"
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _has_trainctl_table(pyproject: Path) -> bool:
    try:
        document = _load_toml(pyproject)
    except ConfigError:
        # A broken pyproject.toml that never mentions us is someone else's problem; one that
        # does is surely meant as our config, and skipping it would silently change settings.
        try:
            mentions_us = "trainctl" in pyproject.read_text(errors="replace")
        except OSError:
            mentions_us = False
        if mentions_us:
            raise
        return False
    tool = document.get("tool")
    return isinstance(tool, dict) and "trainctl" in tool


def _read_settings(table: dict[str, Any], prefix: str, where: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Validated settings from one table; keys in ``extra`` are allowed and left to the caller."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in extra:
            continue
        _check_known(key, _FIELD_NAMES | set(extra), where, prefix=prefix)
        out[key] = _CHECKS[key](value, f"{prefix}{key}", where)
    return out


def _choose_profile(profile: str | None, config: ConfigFile | None) -> tuple[str | None, str]:
    """The profile to apply, and how it was asked for (for messages)."""
    if profile:
        return profile, ""
    from_env = os.environ.get(PROFILE_ENV, "").strip()
    if from_env:
        return from_env, f" (from {PROFILE_ENV})"
    if config is not None and config.default_profile:
        return config.default_profile, " (default_profile)"
    return None, ""


def _known_profiles(profiles: dict[str, Any], path: Path | None = None) -> str:
    place = f" {path}" if path else " this file"
    if not profiles:
        return f"{place.strip()} defines no profiles (add a profiles.NAME table)"
    return f"profiles in{place}: {', '.join(sorted(profiles))}"


# --- checks: each returns the normalized value or raises a one-line ConfigError ---------------


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array", dict: "a table"}
    return names.get(type(value), f"a {type(value).__name__}")


def _invalid(where: str, key: str, value: Any, problem: str) -> ConfigError:
    return ConfigError(f"{where}{key} = {_show(value)} {problem}")


def _check_known(key: str, known: set[str], where: str, prefix: str = "", what: str = "key") -> None:
    if key in known:
        return
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known {what}s: {', '.join(sorted(known))}"
    raise ConfigError(f"{where}unknown {what} {prefix + key!r}: {hint}")


def _text(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _invalid(where, key, value, f"must be a non-empty string, got {_toml_type(value)}")
    return value


def _boolean(value: Any, key: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise _invalid(where, key, value, f"must be true or false, got {_toml_type(value)}")
    return value


def _positive_int(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(where, key, value, f"must be a whole number, got {_toml_type(value)}")
    if value <= 0:
        raise _invalid(where, key, value, "must be > 0")
    return value


def _positive_number(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(where, key, value, f"must be a number, got {_toml_type(value)}")
    if not math.isfinite(value) or value <= 0:  # TOML spells inf and nan; inf > 0 holds
        raise _invalid(where, key, value, "must be a finite number > 0")
    return float(value)


def _max_hours(value: Any, key: str, where: str) -> float:
    hours = _positive_number(value, key, where)
    most = MAX_RUNTIME_LIMIT_S / 3600
    if hours > most:
        raise _invalid(where, key, value, f"must be a finite number > 0 and <= {most:g} (hours)")
    return hours


def _provider(value: Any, key: str, where: str) -> str:
    _text(value, key, where)
    if value not in provider_names():
        raise _invalid(where, key, value, f"is not a provider: choose one of {', '.join(provider_names())}")
    return value


def _store(value: Any, key: str, where: str) -> str:
    from trainctl_lightning.store import (
        validate_url,  # fsspec: loaded only when a store is configured
    )

    _text(value, key, where)
    try:
        validate_url(value)
    except ConfigError as exc:
        raise ConfigError(f"{where}{key}: {exc}") from None
    return value


def _env_mode(value: Any, key: str, where: str) -> str:
    allowed = [mode.value for mode in EnvMode]
    if isinstance(value, EnvMode):
        return value.value
    if value not in allowed:
        raise _invalid(where, key, value, f"is not valid: choose one of {', '.join(allowed)}")
    return value


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _env_name(name: Any, key: str, where: str) -> str:
    if not isinstance(name, str) or not _ENV_NAME.match(name):
        problem = "is not an environment variable name (letters, digits and '_', not starting with a digit)"
        raise _invalid(where, key, name, problem)
    return name


def _table(value: Any, key: str, where: str, example: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(where, key, value, f"must be a table, like {key} = {example}, got {_toml_type(value)}")
    return dict(value)


def _string_list(value: Any, key: str, where: str, example: str) -> list[str]:
    if not isinstance(value, (list, tuple)):
        problem = f"must be an array of strings, like {key} = {example}, got {_toml_type(value)}"
        raise _invalid(where, key, value, problem)
    for i, item in enumerate(value):
        _text(item, f"{key}[{i}]", where)
    return list(value)


def _env(value: Any, key: str, where: str) -> dict[str, str]:
    table = _table(value, key, where, '{ WANDB_PROJECT = "mnist" }')
    for name, item in table.items():
        _env_name(name, key, where)
        if looks_secret(name):
            raise ConfigError(
                f"{where}{key}.{name} looks like a secret and {key} is stored with the job: "
                f'list it in forward_env instead (forward_env = ["{name}"] passes it from your environment, '
                "never stored)"
            )
        if not isinstance(item, str):
            raise _invalid(where, f"{key}.{name}", item, f"must be a string (quote it), got {_toml_type(item)}")
    return table


def _forward_env(value: Any, key: str, where: str) -> list[str]:
    names = _string_list(value, key, where, '["WANDB_API_KEY"]')
    for i, name in enumerate(names):
        _env_name(name, f"{key}[{i}]", where)
    return names


def _setup(value: Any, key: str, where: str) -> list[str]:
    return _string_list(value, key, where, '["pip install -e ."]')


def _tags(value: Any, key: str, where: str) -> dict[str, str]:
    table = _table(value, key, where, '{ team = "vision" }')
    for name, item in table.items():
        if not isinstance(item, str):
            raise _invalid(where, f"{key}.{name}", item, f"must be a string (quote it), got {_toml_type(item)}")
    return table


def _options(value: Any, key: str, where: str) -> dict[str, Any]:
    return _table(value, key, where, '{ subnet_id = "subnet-0abc" }')


_CHECKS: dict[str, Callable[[Any, str, str], Any]] = {
    "provider": _provider,
    "store": _store,
    "instance_type": _text,
    "spot": _boolean,
    "region": _text,
    "image": _text,
    "disk_gb": _positive_int,
    "max_hours": _max_hours,
    "env": _env,
    "forward_env": _forward_env,
    "setup": _setup,
    "env_mode": _env_mode,
    "code_max_mb": _positive_number,
    "tags": _tags,
    "options": _options,
}
_FIELD_NAMES: set[str] = {f.name for f in fields(Settings)}
_TABLES = {"env", "tags", "options"}

__all__ = [
    "CONFIG_FILE",
    "ENV_VARS",
    "PROFILE_ENV",
    "PYPROJECT_FILE",
    "ConfigFile",
    "ResolvedConfig",
    "Settings",
    "find_config_file",
    "load_config",
    "read_config_file",
    "validate_file",
]
