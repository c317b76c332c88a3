"""``trainctl create``, ``ls``, ``stop``, ``terminate``: the instances trainctl created."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from trainctl_lightning import launch as api
from trainctl_lightning.cli.common import OutputOption, handle_errors
from trainctl_lightning.cli.output import Format, emit_json, stdout
from trainctl_lightning.errors import ConfigError
from trainctl_lightning.providers.api import CreatePlan, Instance

__all__ = ["create", "ls", "stop", "terminate"]


def _tags(pairs: list[str] | None) -> dict[str, str]:
    tags = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--tag takes KEY=VALUE, got {pair!r}")
        tags[key] = value
    return tags


def _render(instances: list[Instance], title: str) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("ID", no_wrap=True)
    for col in ("PROVIDER", "STATE", "TYPE", "REGION"):
        table.add_column(col, no_wrap=True)
    table.add_column("RUN", overflow="fold")
    table.add_column("CREATED", no_wrap=True)
    table.add_column("$/H", justify="right", no_wrap=True)
    for i in instances:
        table.add_row(
            i.id,
            i.provider,
            i.state.value,
            i.instance_type + (" (spot)" if i.spot else ""),
            i.region or "-",
            i.run_id or "-",
            (i.created_at or "-")[5:16].replace("T", " "),
            "-" if i.price_per_hour is None else f"{i.price_per_hour:.3f}",
        )
    stdout.print(table)


@handle_errors
def create(
    provider: Optional[str] = typer.Option(None, "--provider", "-p", help="local (default), aws, ..."),
    instance_type: Optional[str] = typer.Option(None, "--instance-type", "-t", help="Instance type, e.g. g5.xlarge."),
    spot: Optional[bool] = typer.Option(None, "--spot/--on-demand", help="Spot capacity (cheaper, can be reclaimed)."),
    region: Optional[str] = typer.Option(None, "--region", help="Cloud region."),
    image: Optional[str] = typer.Option(None, "--image", help="Machine image (AWS: AMI id); default: a GPU-ready image."),
    disk_gb: Optional[int] = typer.Option(None, "--disk-gb", help="Root disk size in GB."),
    max_hours: Optional[float] = typer.Option(None, "--max-hours", help="Hard limit on the instance's life."),
    name: Optional[str] = typer.Option(None, "--name", help="A name shown in listings."),
    tag: Optional[list[str]] = typer.Option(None, "--tag", help="KEY=VALUE tag (repeatable); trainctl's own are always added."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Config profile."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show exactly what would be created; create nothing."),
    output: Format = OutputOption,
) -> None:
    """Create an instance to run jobs on (trainctl launch --instance ID)."""
    result = api.create_instance(
        provider,
        instance_type=instance_type,
        spot=spot,
        region=region,
        image=image,
        disk_gb=disk_gb,
        max_hours=max_hours,
        tags=_tags(tag),
        name=name,
        profile=profile,
        dry_run=dry_run,
    )
    if isinstance(result, CreatePlan):
        if output is Format.json:
            emit_json({"dry_run": True, **result.to_dict()})
        else:
            stdout.print(result.describe(), highlight=False)
        return
    if output is Format.json:
        emit_json(result.to_dict())
    else:
        stdout.print(f"created {result.provider} instance {result.id} ({result.state.value})", highlight=False)


@handle_errors
def ls(
    provider: Optional[str] = typer.Option(None, "--provider", "-p", help="Provider to list (default: the configured one)."),
    all_: bool = typer.Option(False, "--all", "-a", help="Include terminated instances."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Config profile."),
    output: Format = OutputOption,
) -> None:
    """List the instances trainctl created (found by tag), newest first."""
    found = api.list_resources(provider, include_terminated=all_, profile=profile)
    if output is Format.json:
        emit_json({"instances": [i.to_dict() for i in found]})
        return
    if not found:
        stdout.print("no instances" + ("" if all_ else " (--all includes terminated ones)"))
        return
    _render(found, "instances")


@handle_errors
def stop(
    instance_id: str = typer.Argument(..., help="Instance id (trainctl ls)."),
    provider: Optional[str] = typer.Option(None, "--provider", "-p", help="Default: guessed from the id."),
    output: Format = OutputOption,
) -> None:
    """Stop an instance: its jobs get SIGTERM (Lightning saves and stops), its disk is kept."""
    inst = api.stop(instance_id, provider)
    if output is Format.json:
        emit_json(inst.to_dict())
    else:
        stdout.print(f"{inst.id}: {inst.state.value}", highlight=False, markup=False)
        for note in inst.details.get("notes", []):  # what had to be done: a dead agent, a killed job
            stdout.print(f"  {note}", highlight=False, markup=False)


@handle_errors
def terminate(
    instance_id: str = typer.Argument(..., help="Instance id (trainctl ls)."),
    provider: Optional[str] = typer.Option(None, "--provider", "-p", help="Default: guessed from the id."),
    output: Format = OutputOption,
) -> None:
    """Terminate an instance and everything on it (idempotent)."""
    inst = api.terminate(instance_id, provider)
    if output is Format.json:
        emit_json(inst.to_dict())
    else:
        stdout.print(f"{inst.id}: {inst.state.value}", highlight=False, markup=False)
        for note in inst.details.get("notes", []):  # what had to be done: a dead agent, a killed job
            stdout.print(f"  {note}", highlight=False, markup=False)
