"""``trainctl config``: the launch defaults in effect here, and a check of the config file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from trainctl_lightning.cli.common import OutputOption, handle_errors
from trainctl_lightning.cli.output import Format, emit_json, stdout
from trainctl_lightning.config import (
    CONFIG_FILE,
    PYPROJECT_FILE,
    find_config_file,
    load_config,
    read_config_file,
)
from trainctl_lightning.errors import ConfigError

__all__ = ["app", "show", "validate"]

app = typer.Typer(
    help="Show and check launch defaults (trainctl.toml, or the tool.trainctl table of pyproject.toml).",
    no_args_is_help=True,
)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return "\n".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return "\n".join(str(v) for v in value) or "-"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


@app.command("show")
@handle_errors
def show(
    profile: Optional[str] = typer.Option(
        None, "--profile", "-p", help="Profile to apply (default: $TRAINCTL_PROFILE, else the file's default_profile)."
    ),
    output: Format = OutputOption,
) -> None:
    """Show the settings a launch from this directory would use, and where each comes from.

    The config file is the first trainctl.toml, or pyproject.toml with a tool.trainctl table, found from here upward. Exits 1 if it (or a TRAINCTL_* variable, or the profile) is invalid.
    """
    resolved = load_config(profile=profile)
    settings = resolved.settings
    if output is Format.json:
        emit_json(
            {
                "profile": resolved.profile,
                "files": resolved.files,
                "settings": settings.to_dict(),
                "sources": resolved.sources,
                "store_url": settings.store_url(),
            }
        )
        return
    where = resolved.files[0] if resolved.files else f"no config file found (defaults; create {CONFIG_FILE} to set some)"
    title = f"settings from {where}" + (f", profile {resolved.profile}" if resolved.profile else "")
    table = Table(title=Text(title), title_justify="left")
    table.add_column("KEY", no_wrap=True)
    table.add_column("VALUE", overflow="fold")
    table.add_column("SOURCE", overflow="fold")
    for key, value in settings.to_dict().items():
        source = resolved.sources[key]
        if key == "store" and value is None:
            value = f"{settings.store_url()} (default store)"
        table.add_row(key, Text(_cell(value)), Text(source, style="dim" if source == "default" else ""))
    stdout.print(table)


@app.command("validate")
@handle_errors
def validate(
    path: Optional[Path] = typer.Argument(
        None, help="Config file to check (trainctl.toml or pyproject.toml); default: the one found from here upward."
    ),
    output: Format = OutputOption,
) -> None:
    """Check a config file and every profile in it; print "ok: PATH (profiles: ...)" or the first problem, in one line, and exit 1."""
    if path is None:
        found = find_config_file()
        if found is None:
            raise ConfigError(
                f"no config file in {os.getcwd()} or above: create {CONFIG_FILE}, or add a tool.trainctl table to {PYPROJECT_FILE}"
            )
        path = found
    elif path.is_dir():
        raise ConfigError(f"{path} is a directory: give the config file ({path / CONFIG_FILE} or {path / PYPROJECT_FILE})")
    config = read_config_file(path)
    names = sorted(config.profiles)
    if output is Format.json:
        emit_json({"ok": True, "file": str(config.path), "profiles": names, "default_profile": config.default_profile})
        return
    typer.echo(f"ok: {config.path} (profiles: {', '.join(names) or 'none'})")
