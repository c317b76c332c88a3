"""``trainctl gc``: instances trainctl created that no live run needs (and, with --yes, terminate them)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from trainctl_lightning.cli.common import OutputOption, handle_errors
from trainctl_lightning.cli.output import Format, emit_json, stdout

__all__ = ["gc"]


@handle_errors
def gc(
    provider: Optional[str] = typer.Option(None, "--provider", "-p", help="Provider to clean up; default: the configured one."),
    region: Optional[str] = typer.Option(None, "--region", help="Cloud region (aws)."),
    store: Optional[str] = typer.Option(None, "--store", help="Store to look runs up in for instances without a store tag."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Terminate what is listed as garbage; without it, only list."),
    grace_minutes: float = typer.Option(
        30.0, "--grace-minutes", help="Keep instances younger than this that have no run record yet (still booting)."
    ),
    output: Format = OutputOption,
) -> None:
    """List instances whose run has ended, went silent or never existed; --yes terminates them.

    Only instances tagged by trainctl are considered; anything whose run cannot be read is kept.
    """
    from trainctl_lightning.gc import collect_garbage
    from trainctl_lightning.launch import provider_for

    report = collect_garbage(provider_for(provider, region=region), store, yes=yes, boot_grace_s=grace_minutes * 60)
    if output is Format.json:
        emit_json(report.to_dict())
    else:
        if not report.items:
            stdout.print(f"no live {report.provider} instances created by trainctl")
        else:
            table = Table(title=f"{report.provider} instances created by trainctl", title_justify="left")
            for col in ("ID", "STATE", "RUN", "VERDICT", "REASON"):
                table.add_column(col, overflow="fold")
            for item in report.items:
                if not item.garbage:
                    verdict = "keep"
                elif item.terminated:
                    verdict = "[green]terminated[/green]"
                elif item.error:
                    verdict = "[red]terminate failed[/red]"
                else:
                    verdict = "[yellow]garbage[/yellow]"
                reason = item.reason + (f": {item.error}" if item.error else "")
                table.add_row(item.instance.id, item.instance.state.value, item.instance.run_id or "-", verdict, escape(reason))
            stdout.print(table)
            if report.garbage and not yes:
                stdout.print(f"{len(report.garbage)} to clean up: run again with --yes to terminate them", highlight=False)
        for group in report.groups:
            done = "deleted" if group.deleted else (f"delete failed: {group.error}" if group.error else "")
            verdict = ("garbage" if group.garbage else "keep") + (f", {done}" if done else "")
            stdout.print(escape(f"recovery group {group.name}: {verdict} ({group.reason})"), highlight=False)
        for resource in report.cluster:
            done = "deleted" if resource.deleted else (f"delete failed: {resource.error}" if resource.error else "")
            verdict = ("garbage" if resource.garbage else "keep") + (f", {done}" if done else "")
            stdout.print(escape(f"multi-node {resource.kind} {resource.id}: {verdict} ({resource.reason})"), highlight=False)
        for credential in report.credentials:
            done = "deleted" if credential.deleted else (f"delete failed: {credential.error}" if credential.error else "")
            verdict = ("garbage" if credential.garbage else "keep") + (f", {done}" if done else "")
            stdout.print(escape(f"run credentials {credential.name}: {verdict} ({credential.reason})"), highlight=False)
    if (
        any(item.error for item in report.garbage)
        or any(c.error for c in report.credentials)
        or any(g.error for g in report.groups)
        or any(c.error for c in report.cluster)
    ):
        raise typer.Exit(1)
