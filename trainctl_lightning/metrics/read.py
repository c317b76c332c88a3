"""Reading a run's metrics and status back from the store: what ``trainctl runs/monitor/metrics/plot`` call.

Example::

    from trainctl_lightning.metrics import read
    status = read.read_status("s3://bucket/runs/exp1")
    print(status.state(), status.global_step, status.eta_s)
    for record in read.read_metrics("s3://bucket/runs/exp1"):
        print(record.step, record.metrics.get("train_loss"))
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import Any

from trainctl_lightning.errors import IntegrityError
from trainctl_lightning.metrics.records import MetricRecord, Phase, RunStatus
from trainctl_lightning.store import RunStore, layout, run_urls_in
from trainctl_lightning.timeutil import parse_time

__all__ = [
    "MetricsFollower",
    "RunSummary",
    "list_runs",
    "metric_names",
    "parse_segment",
    "read_hparams",
    "read_metrics",
    "read_status",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSummary:
    """One run as ``trainctl runs ls`` shows it."""

    url: str
    status: RunStatus | None
    """None for a run that has checkpoints but never reported a status."""
    checkpoints: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "state": self.status.state() if self.status else "unknown",
            "status": self.status.to_dict() if self.status else None,
            "checkpoints": self.checkpoints,
        }


def read_status(url: str, storage_options: dict[str, Any] | None = None) -> RunStatus | None:
    """The run's latest status, or None if it never reported one.

    Raises:
        IntegrityError: ``status.json`` exists but is not a status this version can read.
    """
    store = RunStore(url, storage_options)
    raw = store.read_status()
    if raw is None:
        return None
    try:
        status = RunStatus.from_json(raw)
        parse_time(status.updated_at)  # every reader compares it to now: refuse it here
        parse_time(status.started_at)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise IntegrityError(
            f"{store.url_of(layout.STATUS)} is not a readable trainctl status ({type(exc).__name__}: {exc}); "
            "it is damaged or was written by something else"
        ) from None
    if (status.phase.is_terminal() and status.phase is not Phase.FINISHED) or status.is_stale():
        # why a launched run stopped is the agent's to say: a spot interruption shows as preempted
        notice = _interruption(store)
        if notice:
            status = replace(status, interruption=notice)
    return status


def _interruption(store: RunStore) -> dict[str, Any] | None:
    """The spot interruption notice in the run's ``job-state.json`` (written by the agent), if any."""
    raw = store.objects.read(layout.JOB_STATE)
    if raw is None:
        return None
    try:
        job = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        log.warning("ignoring %s: not JSON (%s)", store.url_of(layout.JOB_STATE), exc)
        return None
    if not isinstance(job, dict):
        log.warning("ignoring %s: not a JSON object", store.url_of(layout.JOB_STATE))
        return None
    notice = job.get("interruption")
    if isinstance(notice, dict) and notice:
        return notice
    if job.get("phase") == "preempted":
        return {"reason": job.get("error")}
    return None


def read_metrics(url: str, storage_options: dict[str, Any] | None = None) -> list[MetricRecord]:
    """Every metric record of the run, in the order written (all attempts, segment by segment)."""
    return MetricsFollower(url, storage_options).records()


class MetricsFollower:
    """Every record of a run, re-read on each call without re-downloading what it already has.

    Segments are immutable (written create-only, never changed), so each call lists them and
    fetches only new ones: a long run has thousands. This is what ``trainctl monitor`` polls.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.store = RunStore(url, storage_options)
        self._segments: dict[str, list[MetricRecord]] = {}

    def records(self) -> list[MetricRecord]:
        for name, data in self.store.read_metrics_segments(skip=self._segments):
            self._segments[name] = parse_segment(name, data)
        return [r for name in sorted(self._segments) for r in self._segments[name]]


def parse_segment(name: str, data: bytes) -> list[MetricRecord]:
    """The metric records of one segment; unreadable lines are skipped with a warning."""
    records = []
    for number, line in enumerate(data.decode(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item, dict) or "metrics" not in item:
                continue
            metrics = {str(k): (float(v) if v is not None else float("nan")) for k, v in item["metrics"].items()}
            records.append(MetricRecord(step=int(item.get("step", 0)), time=str(item.get("t", "")), metrics=metrics))
        except (ValueError, TypeError, AttributeError, RecursionError):
            log.warning("skipping unreadable line %d of metrics segment %s", number, name)
    return records


def read_hparams(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hyperparameters the run logged (later logs win)."""
    merged: dict[str, Any] = {}
    for _, data in RunStore(url, storage_options).read_metrics_segments():
        for line in data.decode(errors="replace").splitlines():
            try:
                item = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(item, dict) and isinstance(item.get("hparams"), dict):
                merged.update(item["hparams"])
    return merged


def metric_names(records: list[MetricRecord]) -> list[str]:
    """Every metric name, in first-seen order (``epoch`` last)."""
    seen: dict[str, None] = {}
    for r in records:
        for k in r.metrics:
            seen.setdefault(k, None)
    names = [k for k in seen if k != "epoch"]
    return names + (["epoch"] if "epoch" in seen else [])


def list_runs(url: str, storage_options: dict[str, Any] | None = None) -> list[RunSummary]:
    """The run at ``url``, or every run directly below it (a prefix holding several runs)."""
    store = RunStore(url, storage_options)
    urls = [store.url] if store.read_status() is not None or store.list_checkpoints() else run_urls_in(url, storage_options)
    out = []
    for run_url in urls:
        run = RunStore(run_url, storage_options)
        try:
            status = read_status(run_url, storage_options)
        except IntegrityError as exc:
            log.warning("%s", exc)
            status = None
        out.append(RunSummary(url=run.url, status=status, checkpoints=len(run.list_checkpoints())))
    return out
