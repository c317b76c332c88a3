"""``trainctl runs``: the runs under a store URL, with their state, progress and latest metrics."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Optional

import typer
from rich.table import Table

from trainctl_lightning.cli.common import OutputOption, handle_errors
from trainctl_lightning.cli.output import Format, emit_json, shown, stdout
from trainctl_lightning.errors import ConfigError, TrainctlError
from trainctl_lightning.humanize import human_ago
from trainctl_lightning.metrics import read, view
from trainctl_lightning.store import layout
from trainctl_lightning.store.layout import run_id_of

log = logging.getLogger(__name__)

__all__ = ["app", "ls", "run_name"]

app = typer.Typer(help="List runs: state, progress and latest metrics.", no_args_is_help=True)


def run_name(url: str) -> str:
    """The last path part of a run URL (``s3://b/runs/exp1`` -> ``exp1``)."""
    return run_id_of(url)


@app.command("ls")
@handle_errors
def ls(
    url: Optional[str] = typer.Argument(
        None, help="A run's store URL, or a prefix holding runs (e.g. s3://bucket/runs); default: the configured store."
    ),
    metric: Optional[list[str]] = typer.Option(
        None, "--metric", "-m", help="Metric to show (repeatable); default: the first 3 by name, epoch left out."
    ),
    output: Format = OutputOption,
) -> None:
    """List the run at URL, or every run directly below it.

    STATE is the phase the run last reported (training, finished, failed...) or "stale" when it stopped reporting without ending (killed, hung, machine gone). AGE is the time since its status was last refreshed. Exits 1 if there is no run at URL.
    """
    if url is None:
        from trainctl_lightning.launch import store_url_for

        url = store_url_for()
    runs = read.list_runs(url)
    if not runs:
        raise ConfigError(
            f"no runs at {url}: no {layout.STATUS} or {layout.CHECKPOINTS} there or in the folders directly below it"
        )
    now = datetime.now(timezone.utc)
    if output is Format.json:
        emit_json(
            {"url": url, "runs": [{"name": run_name(r.url), **r.to_dict(), "recovering": _recovering(r.url)} for r in runs]}
        )
        return
    table = Table(title=f"runs in {shown(url)}", title_justify="left")
    table.add_column("RUN", overflow="fold", min_width=10)
    table.add_column("STATE", no_wrap=True)
    for col in ("EPOCH", "STEP", "STEPS/S", "ETA", "AGE", "CKPTS"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("METRICS", overflow="fold")
    for r in runs:
        s = r.status
        state = "recovering" if _recovering(r.url) else s.state(now) if s else "unknown"
        table.add_row(
            shown(run_name(r.url)),
            view.state_text(state),
            "-" if s is None or s.epoch is None else str(s.epoch),
            view.format_step(s),
            view.format_rate(s.steps_per_s if s else None),
            view.format_eta(s, now),
            human_ago(s.age_s(now)) if s else "-",
            str(r.checkpoints),
            shown(view.latest_metrics_text(s.metrics, metric)).replace(" ", "\n") if s else "",
        )
    stdout.print(table)


def _recovering(run_url: str) -> bool:
    """Whether a managed run is between attempts (its job state says ``recovering``)."""
    from trainctl_lightning.jobs.spec import JobPhase
    from trainctl_lightning.jobs.store import JobStore

    try:
        state = JobStore(run_url).read_state()
    except TrainctlError as exc:  # the run is still listed; its job state is named as damaged
        log.warning("%s", exc)
        return False
    return state is not None and state.phase is JobPhase.RECOVERING and not state.lost
