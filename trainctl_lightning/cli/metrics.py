"""``trainctl monitor``, ``trainctl metrics`` and ``trainctl plot``: a run's live status and metrics.

Top-level commands (registered in :mod:`trainctl_lightning.cli.app`). What they show is built by
:mod:`trainctl_lightning.metrics.view` and :mod:`trainctl_lightning.metrics.plot`; this module
only reads the store, loops and picks exit codes.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer
from rich.live import Live

from trainctl_lightning.cli.common import OutputOption, handle_errors, resolve_run
from trainctl_lightning.cli.output import Format, emit_json, stderr, stdout
from trainctl_lightning.errors import ConfigError, TrainctlError
from trainctl_lightning.metrics import read, view
from trainctl_lightning.metrics.records import MetricRecord, Phase, RunStatus
from trainctl_lightning.store import RunStore, layout, run_urls_in
from trainctl_lightning.store.layout import run_id_of

__all__ = [
    "EXIT_CTRL_C",
    "EXIT_FAILED",
    "EXIT_FINISHED",
    "EXIT_INTERRUPTED",
    "EXIT_STALE",
    "METRIC",
    "RUN",
    "F",
    "MetricsFormat",
    "load_run",
    "metrics",
    "monitor",
    "plot",
]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

#: ``trainctl monitor`` exit codes (also in its --help).
EXIT_FINISHED = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 3
EXIT_STALE = 4
EXIT_CTRL_C = 130

RUN = typer.Argument(
    ..., help="The run's store URL (s3://bucket/runs/exp1, file:///data/runs/exp1) or a launched run's id.", callback=resolve_run
)
METRIC = typer.Option(None, "--metric", "-m", help="Only this metric (repeatable); default: every metric.")


class MetricsFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def _no_run_error(url: str) -> TrainctlError:
    children = run_urls_in(url)
    if children:
        names = ", ".join(run_id_of(c) for c in children[:5]) + (", ..." if len(children) > 5 else "")
        runs = f"{len(children)} run{'s' if len(children) != 1 else ''}"
        return ConfigError(f"{url} holds {runs} ({names}), not one run: pass a run's URL, e.g. {children[0]}")
    return ConfigError(f"no run at {url}: nothing reported there (no {layout.STATUS}, metrics or checkpoints); check the URL")


def load_run(url: str) -> tuple[RunStatus | None, list[MetricRecord]]:
    """The run's status and every metric record.

    Raises:
        ConfigError: nothing at ``url`` is a run (the message says so, or lists the runs below it).
    """
    status = read.read_status(url)
    records = read.read_metrics(url)
    if status is None and not records:
        store = RunStore(url)
        if not store.list_checkpoints():
            raise _no_run_error(url)
    return status, records


# ------------------------------------------------------------------ monitor
def monitor(
    url: str = typer.Argument(
        ..., help="The run's store URL (or a prefix holding exactly one run), or a launched run's id.", callback=resolve_run
    ),
    interval: float = typer.Option(2.0, "--interval", "-n", min=0.2, help="Seconds between refreshes."),
    once: bool = typer.Option(False, "--once", help="Print one frame and exit 0 (for scripts); exit 1 if the run has no status."),
    metric: Optional[list[str]] = typer.Option(None, "--metric", "-m", help="Only this metric (repeatable)."),
    output: Format = OutputOption,
) -> None:
    """Watch a run live: state, step, ETA, host, GPU, last checkpoint, latest metrics with a trend.

    Refreshes every --interval seconds until the run ends. Before the run's first status it waits (unless --once). --output json needs --once.

    Exit codes:
    0 the run finished (and always with --once);
    1 the run failed, or an error (bad URL, no status with --once);
    3 the run was interrupted (Ctrl-C or SIGTERM in the training process) or preempted (spot);
    4 the run is stale: it stopped reporting without ending (killed, hung, machine gone);
    130 you stopped the monitor with Ctrl-C.
    """
    try:
        code = _monitor(url, interval, once, metric or None, output=output)
    except KeyboardInterrupt:
        stderr.print("stopped", style="dim")
        raise typer.Exit(EXIT_CTRL_C) from None
    if code:
        raise typer.Exit(code)


@handle_errors
def _monitor(url: str, interval: float, once: bool, names: list[str] | None, output: Format) -> int:
    if output is Format.json and not once:
        raise ConfigError(
            "--output json needs --once (the live view is for people); e.g. trainctl monitor URL --once --output json"
        )
    status = read.read_status(url)
    if status is None:
        children = run_urls_in(url)
        if len(children) == 1:  # a prefix holding one run: that run
            url = children[0]
            status = read.read_status(url)
        elif children:
            raise _no_run_error(url)
    if status is None:
        if once:
            store = RunStore(url)
            if not (store.list_checkpoints() or read.read_metrics(url)):
                raise _no_run_error(url)
            raise ConfigError(
                f"{url} has no status yet: the run has not reported (MetricsReporter writes {layout.run_url_in(url, layout.STATUS)})"
            )
        status = _wait_for_status(url, interval)

    if once:
        records = read.read_metrics(url)
        state, _ = _managed(url)
        if output is Format.json:
            emit_json(view.monitor_json(url, status, records, names=names, state=state))
        else:
            stdout.print(view.monitor_renderable(url, status, records, names=names, state=state))
        return 0

    follower = read.MetricsFollower(url)
    with Live(console=stdout, auto_refresh=False, transient=False, redirect_stderr=False) as live:
        while True:
            records = follower.records()  # after the status: a final status comes after the last records
            state, going_on = _managed(url)
            live.update(view.monitor_renderable(url, status, records, names=names, state=state), refresh=True)
            if (status.phase.is_terminal() or status.is_stale()) and not going_on:
                break
            time.sleep(interval)
            status = read.read_status(url) or status
    if not stdout.is_terminal:
        stdout.line()  # rich ends a live view with a newline only on a terminal
    return _exit_code(status)


def _managed(url: str) -> tuple[str | None, bool]:
    """For a managed run (``--recover``): ``"recovering"`` while it is between attempts (else
    None), and whether it goes on although its status ended (the last attempt's status; the next
    attempt has not reported yet). (None, False) for any other run."""
    from trainctl_lightning.jobs.spec import JobPhase
    from trainctl_lightning.jobs.store import JobStore

    try:
        job = JobStore(url).read_state()
    except TrainctlError as exc:  # the monitor goes on with the run's status alone
        log.warning("%s", exc)
        return None, False
    if job is None or not job.attempts or job.lost:
        return None, False
    recovering = job.phase is JobPhase.RECOVERING
    return ("recovering" if recovering else None), not job.phase.is_terminal()


def _wait_for_status(url: str, interval: float) -> RunStatus:
    stderr.print(f"waiting for {url} to report…", highlight=False, soft_wrap=True)
    while True:
        time.sleep(interval)
        status = read.read_status(url)
        if status is not None:
            return status


def _exit_code(status: RunStatus) -> int:
    if status.state() == "preempted":
        return EXIT_INTERRUPTED
    if status.is_stale():
        return EXIT_STALE
    return {Phase.FINISHED: EXIT_FINISHED, Phase.FAILED: EXIT_FAILED, Phase.INTERRUPTED: EXIT_INTERRUPTED}.get(status.phase, 0)


# ------------------------------------------------------------------ metrics
@handle_errors
def metrics(
    run: str = RUN,
    output: MetricsFormat = typer.Option(
        MetricsFormat.table, "--output", case_sensitive=False, help="table for people; json or csv for programs."
    ),
    metric: Optional[list[str]] = METRIC,
) -> None:
    """Every metric record of a run, in the order logged (all attempts of a restarted run).

    csv: a header step,time,<metric>... and one row per record, an empty cell where a record has no value for a metric (like Lightning's CSVLogger). json: a list of {step, time, metrics}.
    """
    _, records = load_run(run)
    if metric:
        names = view.select_metrics(records, metric)
        records = view.filter_records(records, names)
    else:
        names = read.metric_names(records)
    if output is MetricsFormat.json:
        emit_json(view.records_json(records))
    elif output is MetricsFormat.csv:
        sys.stdout.write(view.records_csv(records, names))
        sys.stdout.flush()
    elif not records:
        stdout.print(f"no metrics logged in {run} yet")
    else:
        stdout.print(view.records_table(records, names, title=f"metrics of {run}"))


# ------------------------------------------------------------------ plot
@handle_errors
def plot(
    run: str = RUN,
    out: Path = typer.Option(..., "-o", "--out", help="Image file to write (.png, .svg, .pdf...)."),
    metric: Optional[list[str]] = typer.Option(
        None, "--metric", "-m", help="Metric to draw (repeatable); default: every metric but epoch."
    ),
    title: Optional[str] = typer.Option(None, help="Figure title (default: the run URL)."),
    output: Format = OutputOption,
) -> None:
    """Plot a run's metrics to an image: one panel per metric against step (needs matplotlib)."""
    from trainctl_lightning.metrics.plot import plot_metrics

    _, records = load_run(run)
    path = plot_metrics(records, metric or None, out, title=run if title is None else title)
    names = view.select_metrics(records, metric)
    if output is Format.json:
        emit_json({"url": run, "path": str(path), "metrics": names})
    else:
        stdout.print(f"wrote {path} ({len(names)} panel{'s' if len(names) != 1 else ''}: {', '.join(names)})", highlight=False)
