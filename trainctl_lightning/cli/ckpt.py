"""``trainctl ckpt``: list, download, upload and verify a run's checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from trainctl_lightning.checkpoint import api
from trainctl_lightning.cli.common import OutputOption, handle_errors, resolve_run
from trainctl_lightning.cli.output import Format, emit_json, shown, stdout, transfer_progress
from trainctl_lightning.humanize import human_age, human_size
from trainctl_lightning.store.manifest import CheckpointManifest

__all__ = ["REF", "URL", "app", "download", "gc", "ls", "upload", "verify"]

app = typer.Typer(help="List, download, upload and verify a run's checkpoints.", no_args_is_help=True)

URL = typer.Argument(
    ..., help="The run's store URL (s3://bucket/runs/exp1, file:///data/runs/exp1) or a launched run's id.", callback=resolve_run
)
REF = typer.Argument(None, help="Checkpoint id or name (e.g. last.ckpt); default: the latest.")


def _summary(m: CheckpointManifest, **extra: object) -> dict[str, object]:
    return {**m.to_dict(), "size": m.size, **extra}


@app.command("ls")
@handle_errors
def ls(url: str = URL, output: Format = OutputOption) -> None:
    """List the run's complete checkpoints, oldest first; the latest is marked *."""
    found = api.list_checkpoints(url)
    if output is Format.json:
        emit_json({"url": url, "checkpoints": [_summary(m, latest=(m is found[-1])) for m in found]})
        return
    if not found:
        stdout.print(f"no complete checkpoints in {shown(url)}")
        return
    table = Table(title=f"checkpoints in {shown(url)}", title_justify="left")
    table.add_column("")
    table.add_column("ID", overflow="fold")
    table.add_column("NAME", overflow="fold")
    for col in ("EPOCH", "STEP", "SIZE"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("MONITOR", overflow="fold")
    table.add_column("TAKEN", justify="right", no_wrap=True)
    for m in found:
        monitor = f"{m.monitor}={m.monitor_value:.4g}" if m.monitor and m.monitor_value is not None else ""
        table.add_row(
            "*" if m is found[-1] else "",
            shown(m.id),
            shown(m.name),
            "" if m.epoch is None else str(m.epoch),
            "" if m.global_step is None else str(m.global_step),
            human_size(m.size),
            shown(monitor),
            human_age(m.created),
        )
    stdout.print(table)


@app.command("download")
@handle_errors
def download(
    url: str = URL,
    ref: Optional[str] = REF,
    dest: Path = typer.Option(Path("."), "-o", "--dest", help="Directory to download into."),
    output: Format = OutputOption,
) -> None:
    """Download a checkpoint (the latest by default), verifying every object's checksum."""
    manifest = api.RunStore(url).get_checkpoint(ref)
    with transfer_progress(f"downloading {shown(manifest.name)}", manifest.size, output) as cb:
        _, path = api.download_checkpoint(url, manifest.id, dest, callback=cb)
    if output is Format.json:
        emit_json(_summary(manifest, local_path=str(path)))
    else:
        stdout.print(f"downloaded {shown(manifest.id)} ({human_size(manifest.size)}, verified) to {shown(path)}")


@app.command("upload")
@handle_errors
def upload(
    file: Path = typer.Argument(..., help="Local checkpoint file (or folder) to publish."),
    url: str = URL,
    name: Optional[str] = typer.Option(None, help="Name in the store (default: the file name)."),
    step: Optional[int] = typer.Option(None, help="Global step to record (default: read from the file)."),
    epoch: Optional[int] = typer.Option(None, help="Epoch to record (default: read from the file)."),
    output: Format = OutputOption,
) -> None:
    """Publish a local checkpoint to the run: data first, then its manifest."""
    size = sum(p.stat().st_size for p in ([file] if file.is_file() else file.rglob("*"))) if file.exists() else 0
    with transfer_progress(f"uploading {file.name}", size, output) as cb:
        manifest = api.upload_checkpoint(file, url, name=name, epoch=epoch, global_step=step, callback=cb)
    if output is Format.json:
        emit_json(_summary(manifest))
    else:
        stdout.print(f"published {shown(file)} as {shown(manifest.id)} ({human_size(manifest.size)}) in {shown(url)}")


@app.command("verify")
@handle_errors
def verify(url: str = URL, ref: Optional[str] = REF, output: Format = OutputOption) -> None:
    """Re-read a stored checkpoint (the latest by default) and check every object's checksum."""
    manifest = api.RunStore(url).get_checkpoint(ref)
    with transfer_progress(f"verifying {shown(manifest.name)}", manifest.size, output) as cb:
        api.verify_checkpoint(url, manifest.id, callback=cb)
    if output is Format.json:
        emit_json(_summary(manifest, verified=True))
    else:
        stdout.print(
            f"ok: {shown(manifest.id)} ({len(manifest.files)} file(s), {human_size(manifest.size)}) matches its manifest"
        )


@app.command("gc")
@handle_errors
def gc(
    url: str = URL,
    older_than: float = typer.Option(1.0, "--older-than", min=0.0, help="Only folders untouched for this many hours."),
    yes: bool = typer.Option(False, "--yes", help="Delete them (default: only list)."),
    output: Format = OutputOption,
) -> None:
    """List (and with --yes delete) data that killed uploads left without a manifest.

    Readers never see such data; it only takes space. Folders younger than --older-than are left
    alone, so uploads still in flight are safe.
    """
    found = api.collect_orphans(url, older_than_s=older_than * 3600, delete=yes)
    if output is Format.json:
        emit_json({"url": url, "deleted": yes, "orphans": found})
        return
    if not found:
        stdout.print(f"no orphaned checkpoint data in {shown(url)}")
        return
    verb = "deleted" if yes else "would delete (run again with --yes)"
    for item in found:
        stdout.print(f"{verb}: checkpoints/{shown(item['id'])}/" + (f" ({item['deleted_objects']} object(s))" if yes else ""))
