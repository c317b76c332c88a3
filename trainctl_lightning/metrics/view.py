"""Turning a run's status and metric records into what people read: no terminal, no store access.

``trainctl runs ls``, ``monitor`` and ``metrics`` build their output with these functions, so
everything they show can be tested (and reused) without a terminal. Example::

    from rich.console import Console
    from trainctl_lightning.metrics import read, view

    url = "s3://bucket/runs/exp1"
    Console().print(view.monitor_renderable(url, read.read_status(url), read.read_metrics(url)))
    print(view.sparkline([3.0, 2.5, 2.7, 1.2]))  # '█▆▇▁'
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from trainctl_lightning.errors import ConfigError
from trainctl_lightning.humanize import human_ago, human_duration, printable
from trainctl_lightning.metrics.read import metric_names
from trainctl_lightning.metrics.records import MetricRecord, Phase, RunStatus
from trainctl_lightning.timeutil import parse_time

__all__ = [
    "SPARK_BLOCKS",
    "STATE_STYLES",
    "TREND_POINTS",
    "MetricSummary",
    "filter_records",
    "format_checkpoint",
    "format_eta",
    "format_gpu",
    "format_rate",
    "format_step",
    "format_value",
    "latest_metrics_text",
    "metric_series",
    "monitor_json",
    "monitor_renderable",
    "records_csv",
    "records_json",
    "records_table",
    "select_metrics",
    "sparkline",
    "state_text",
    "summarize_metrics",
    "waiting_renderable",
]

#: Eight block heights, lowest first, for :func:`sparkline`.
SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
#: How many of the latest values of each metric the monitor's trend shows.
TREND_POINTS = 24

STATE_STYLES = {
    Phase.STARTING.value: "cyan",
    Phase.TRAINING.value: "bold cyan",
    Phase.VALIDATING.value: "cyan",
    Phase.TESTING.value: "cyan",
    Phase.FINISHED.value: "bold green",
    Phase.FAILED.value: "bold red",
    Phase.INTERRUPTED.value: "bold yellow",
    "preempted": "bold yellow",
    "recovering": "bold yellow",
    "stale": "bold red",
    "unknown": "dim",
}


# ------------------------------------------------------------------ small formatters
def sparkline(values: Iterable[float], width: int = TREND_POINTS) -> str:
    """The last ``width`` finite values as a row of block characters, scaled min to max.

    NaN and infinite values are skipped; a constant series is a flat middle row; no finite
    value gives ``""``.

    Example::

        sparkline([1, 2, 3, 4, 5, 6, 7, 8])  # '▁▂▃▄▅▆▇█'
    """
    if width < 1:
        raise ConfigError(f"sparkline width must be >= 1, got {width}")
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))][-width:]
    if not finite:
        return ""
    lo, hi = min(finite), max(finite)
    if hi - lo <= 1e-12 * max(1.0, abs(hi), abs(lo)):
        return SPARK_BLOCKS[3] * len(finite)
    top = len(SPARK_BLOCKS) - 1
    return "".join(SPARK_BLOCKS[min(top, round((v - lo) / (hi - lo) * top))] for v in finite)


def format_value(value: float | None) -> str:
    """A metric value, compactly (``0.1235``, ``1.2e-05``, ``nan``); ``-`` when missing."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"


def format_step(status: RunStatus | None) -> str:
    """``120/400`` (``/max`` when the run knows its total), ``120``, or ``-``."""
    if status is None or status.global_step is None:
        return "-"
    return f"{status.global_step}/{status.max_steps}" if status.max_steps else str(status.global_step)


def format_rate(steps_per_s: float | None) -> str:
    return "-" if not steps_per_s else f"{steps_per_s:.3g}"


def format_eta(status: RunStatus | None, now: datetime | None = None) -> str:
    """Time left at the current rate; ``-`` for a run that is not live (ended or stale)."""
    if status is None or status.phase.is_terminal() or status.is_stale(now):
        return "-"
    return human_duration(status.eta_s)


def format_checkpoint(ckpt: dict[str, Any] | None) -> str:
    if not ckpt:
        return "-"
    name = str(ckpt.get("name") or ckpt.get("id") or "?")
    step = ckpt.get("global_step")
    return f"{name} (step {step})" if step is not None else name


def format_gpu(status: RunStatus) -> str:
    gpu = status.gpu
    if gpu is None:
        return "-"
    parts = [gpu.name]
    if gpu.memory_used_mb is not None and gpu.memory_total_mb:
        parts.append(f"{gpu.memory_used_mb / 1024:.1f}/{gpu.memory_total_mb / 1024:.1f} GiB")
    if gpu.utilization_pct is not None:
        parts.append(f"{gpu.utilization_pct:.0f}% busy")
    return " · ".join(parts)


def state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, ""))


# ------------------------------------------------------------------ metric history
@dataclass(frozen=True)
class MetricSummary:
    """One metric of a run: its latest value and range over the records."""

    name: str
    last: float
    step: int | None
    """Step of the latest value (None when only the status knows the value)."""
    min: float | None
    max: float | None
    count: int
    trend: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": _json_float(self.last),
            "step": self.step,
            "min": _json_float(self.min),
            "max": _json_float(self.max),
            "count": self.count,
            "trend": self.trend,
        }


def select_metrics(records: Sequence[MetricRecord], requested: Sequence[str] | None = None) -> list[str]:
    """The metric names to show: ``requested`` (checked) or every name in the records.

    With nothing requested, ``epoch`` is left out unless it is the only metric.

    Raises:
        ConfigError: a requested name is not in the records (the message lists the ones that are).
    """
    available = metric_names(list(records))
    if requested:
        missing = [m for m in requested if m not in available]
        if missing:
            have = ", ".join(available) if available else "none"
            raise ConfigError(f"no metric named {', '.join(repr(m) for m in missing)} in this run; available: {have}")
        return list(dict.fromkeys(requested))
    return [m for m in available if m != "epoch"] or available


def metric_series(records: Iterable[MetricRecord], name: str) -> list[tuple[int, float]]:
    """``(step, value)`` of one metric in record order, non-finite values included."""
    return [(r.step, r.metrics[name]) for r in records if name in r.metrics]


def summarize_metrics(
    records: Sequence[MetricRecord],
    status: RunStatus | None = None,
    names: Sequence[str] | None = None,
    trend_points: int = TREND_POINTS,
) -> list[MetricSummary]:
    """Latest value, range and trend of each metric (``epoch`` left out unless named).

    Values come from the records; a metric only the status knows (its records not written yet)
    is shown with the status's value and no history.
    """
    chosen = list(names) if names else [m for m in metric_names(list(records)) if m != "epoch"]
    if not names and status is not None:
        chosen += sorted(k for k in status.metrics if k != "epoch" and k not in chosen)
    out = []
    for name in chosen:
        series = metric_series(records, name)
        if series:
            finite = [v for _, v in series if math.isfinite(v)]
            step, last = series[-1]
            out.append(
                MetricSummary(
                    name=name,
                    last=last,
                    step=step,
                    min=min(finite) if finite else None,
                    max=max(finite) if finite else None,
                    count=len(series),
                    trend=sparkline((v for _, v in series), trend_points),
                )
            )
        elif status is not None and name in status.metrics:
            value = status.metrics[name]
            out.append(MetricSummary(name=name, last=value, step=None, min=None, max=None, count=0, trend=""))
    return out


def latest_metrics_text(metrics: dict[str, float], names: Sequence[str] | None = None, limit: int = 3) -> str:
    """``train_loss=0.1234 val_loss=0.2`` for a run list: the named ones, or the first ``limit``
    (alphabetically, ``epoch`` left out)."""
    keys = [n for n in names if n in metrics] if names else sorted(k for k in metrics if k != "epoch")[:limit]
    return " ".join(f"{k}={format_value(metrics[k])}" for k in keys)


# ------------------------------------------------------------------ monitor
def monitor_renderable(
    url: str,
    status: RunStatus,
    records: Sequence[MetricRecord],
    now: datetime | None = None,
    names: Sequence[str] | None = None,
    state: str | None = None,
) -> RenderableType:
    """One frame of ``trainctl monitor``: the run's status and a table of its latest metrics.

    ``state`` overrides the status's own (``"recovering"``: a managed run between attempts,
    whose status is still the last attempt's).
    """
    now = now or datetime.now(timezone.utc)
    state = state or status.state(now)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")

    headline = Text.assemble(state_text(state))
    if state == "stale":
        headline.append(
            f"  (last reported {status.phase.value}, {human_ago(status.age_s(now))}; stale after "
            f"{human_duration(status.stale_after_s)} without a refresh)",
            style="dim",
        )
    if state == "recovering":
        headline.append(f"  (a replacement attempt is starting; the last attempt {status.state(now)})", style="dim")
    grid.add_row("state", headline)
    grid.add_row("epoch", "-" if status.epoch is None else str(status.epoch))
    step_cell: RenderableType = Text(format_step(status))
    if status.max_steps and status.global_step is not None:
        done = min(status.global_step, status.max_steps)
        bar = ProgressBar(total=status.max_steps, completed=done, width=30)
        step_cell = Table.grid(padding=(0, 1))
        step_cell.add_row(Text(format_step(status)), bar, Text(f"{100 * done / status.max_steps:.0f}%"))
    grid.add_row("step", step_cell)
    grid.add_row("steps/s", format_rate(status.steps_per_s))
    grid.add_row("ETA", format_eta(status, now))
    grid.add_row("started", human_ago((now - parse_time(status.started_at)).total_seconds()))
    host = status.host or "-"
    if status.pid is not None:
        host += f" (pid {status.pid})"
    grid.add_row("host", Text(printable(host)))
    if status.gpu is not None:
        grid.add_row("GPU", Text(printable(format_gpu(status))))
    grid.add_row("checkpoint", Text(printable(format_checkpoint(status.last_checkpoint))))
    grid.add_row("updated", human_ago(status.age_s(now)))
    if status.error:
        grid.add_row("error", Text(printable(status.error), style="red"))

    parts: list[RenderableType] = [Text(printable(url), style="bold"), grid]
    summaries = summarize_metrics(records, status, names)
    if summaries:
        table = Table(title="metrics", title_justify="left", expand=False)
        table.add_column("METRIC", overflow="fold")
        for col in ("LAST", "STEP", "MIN", "MAX"):
            table.add_column(col, justify="right", no_wrap=True)
        table.add_column(f"TREND (last {TREND_POINTS})", no_wrap=True, style="cyan")
        for m in summaries:
            table.add_row(
                Text(printable(m.name)),
                format_value(m.last),
                "-" if m.step is None else str(m.step),
                format_value(m.min),
                format_value(m.max),
                m.trend,
            )
        parts.append(table)
    else:
        parts.append(Text("no metrics logged yet", style="dim"))
    return Group(*parts)


def waiting_renderable(url: str, waited_s: float) -> RenderableType:
    return Text(f"waiting for {url} to report… ({human_duration(waited_s)}; Ctrl-C to stop)", style="dim")


def monitor_json(
    url: str,
    status: RunStatus,
    records: Sequence[MetricRecord],
    now: datetime | None = None,
    names: Sequence[str] | None = None,
    state: str | None = None,
) -> dict[str, Any]:
    """``trainctl monitor --once --output json``: the status and each metric's latest value
    (``state`` as in :func:`monitor_renderable`)."""
    now = now or datetime.now(timezone.utc)
    return {
        "url": url,
        "state": state or status.state(now),
        "status": status.to_dict(now),
        "metrics": {m.name: m.to_dict() for m in summarize_metrics(records, status, names)},
    }


# ------------------------------------------------------------------ every record
def filter_records(records: Sequence[MetricRecord], names: Sequence[str]) -> list[MetricRecord]:
    """The records that hold at least one of ``names``, reduced to those metrics."""
    wanted = set(names)
    out = []
    for r in records:
        kept = {k: v for k, v in r.metrics.items() if k in wanted}
        if kept:
            out.append(MetricRecord(step=r.step, time=r.time, metrics=kept))
    return out


def records_csv(records: Sequence[MetricRecord], names: Sequence[str] | None = None) -> str:
    """Every record as CSV, like Lightning's CSVLogger: ``step,time,<metric>...``, one row per
    record, an empty cell where a record has no value for a metric.

    Values are written exactly (Python's shortest round-trip repr; ``nan`` for NaN).
    """
    columns = list(names) if names is not None else metric_names(list(records))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["step", "time", *columns])
    for r in records:
        writer.writerow([r.step, r.time, *(repr(r.metrics[c]) if c in r.metrics else "" for c in columns)])
    return buf.getvalue()


def records_json(records: Sequence[MetricRecord]) -> list[dict[str, Any]]:
    """Every record as ``{"step", "time", "metrics"}`` (NaN and infinities as null)."""
    return [{"step": r.step, "time": r.time, "metrics": {k: _json_float(v) for k, v in r.metrics.items()}} for r in records]


def records_table(records: Sequence[MetricRecord], names: Sequence[str], title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("STEP", justify="right", no_wrap=True)
    table.add_column("TIME", no_wrap=True)
    for n in names:
        table.add_column(Text(printable(n)), justify="right", no_wrap=True)
    for r in records:
        table.add_row(
            str(r.step), Text(printable(r.time)), *(format_value(r.metrics[n]) if n in r.metrics else "" for n in names)
        )
    return table


def _json_float(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None
