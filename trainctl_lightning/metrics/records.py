"""Typed records of what a run reports: metric records and its live status (``status.json``).

Both are JSON in the run store (layout in ``docs/run-store.md``); readers ignore fields they
do not know, writers never remove one.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from trainctl_lightning.store.fields import opt_float, opt_int
from trainctl_lightning.timeutil import parse_time

__all__ = ["MIN_STALE_AFTER_S", "STALE_AFTER_INTERVALS", "STATUS_FORMAT", "GpuInfo", "MetricRecord", "Phase", "RunStatus"]

STATUS_FORMAT = "trainctl.status/1"
#: A run whose status was not refreshed for this many refresh intervals is shown as stale.
STALE_AFTER_INTERVALS = 3
MIN_STALE_AFTER_S = 30.0


class Phase(str, Enum):
    """What a run is doing, as it last reported."""

    STARTING = "starting"
    TRAINING = "training"
    VALIDATING = "validating"
    TESTING = "testing"
    FINISHED = "finished"
    FAILED = "failed"
    INTERRUPTED = "interrupted"

    def is_terminal(self) -> bool:
        return self in (Phase.FINISHED, Phase.FAILED, Phase.INTERRUPTED)


@dataclass(frozen=True)
class MetricRecord:
    """One ``log_metrics`` call: the values logged at one step."""

    step: int
    """The step Lightning logged these values at."""
    time: str
    """UTC ISO-8601 time the values were logged."""
    metrics: dict[str, float]
    """Metric name to value (Lightning adds ``epoch`` to training-step records)."""

    def to_json_line(self) -> str:
        return json.dumps({"t": self.time, "step": self.step, "metrics": self.metrics}, allow_nan=True)


@dataclass(frozen=True)
class GpuInfo:
    """The training device, when it is a CUDA GPU."""

    name: str
    memory_used_mb: float | None = None
    memory_total_mb: float | None = None
    utilization_pct: float | None = None
    """Percent of time the GPU was busy (needs NVML; None without it)."""


@dataclass(frozen=True)
class RunStatus:
    """The live status of a run, rewritten every few seconds while it trains."""

    phase: Phase
    updated_at: str
    """UTC time of this refresh; a run that stops refreshing is shown as stale."""
    started_at: str
    refresh_interval_s: float
    """How often the writer promised to refresh."""
    epoch: int | None = None
    global_step: int | None = None
    max_steps: int | None = None
    """Total optimizer steps the run will take, when max_steps / max_epochs make it known."""
    steps_per_s: float | None = None
    """Optimizer steps per second over the last minute or so."""
    eta_s: float | None = None
    """Seconds to ``max_steps`` at the current rate."""
    last_checkpoint: dict[str, Any] | None = None
    """Newest checkpoint published by CheckpointSync (``name``, ``id``, ``global_step``)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The latest value of every metric logged so far."""
    host: str = ""
    pid: int | None = None
    session: str = ""
    """Id of the process attempt that wrote this (changes when a run restarts)."""
    gpu: GpuInfo | None = None
    error: str | None = None
    """For a failed run: the exception, one line."""
    interruption: dict[str, Any] | None = None
    """The spot interruption notice the trainctl agent recorded for this run (``action``, ``time``),
    read from the run's ``job-state.json``; not written by MetricsReporter. A run that stopped
    after one shows as ``preempted``."""
    format: str = STATUS_FORMAT

    @property
    def stale_after_s(self) -> float:
        return max(MIN_STALE_AFTER_S, STALE_AFTER_INTERVALS * self.refresh_interval_s)

    def age_s(self, now: datetime | None = None) -> float:
        now = now or datetime.now(timezone.utc)
        return max(0.0, (now - parse_time(self.updated_at)).total_seconds())

    def is_stale(self, now: datetime | None = None) -> bool:
        """A live phase whose writer stopped refreshing (killed, hung, or the machine is gone)."""
        return not self.phase.is_terminal() and self.age_s(now) > self.stale_after_s

    def state(self, now: datetime | None = None) -> str:
        """The phase; ``"preempted"`` when it stopped (or went quiet) after a spot interruption
        notice; ``"stale"`` when it stopped reporting without ending."""
        stopped = self.phase in (Phase.INTERRUPTED, Phase.FAILED) or self.is_stale(now)
        if self.interruption and stopped:
            return "preempted"
        return "stale" if self.is_stale(now) else self.phase.value

    def to_json(self) -> bytes:
        data = asdict(self)
        data["phase"] = self.phase.value
        return json.dumps(data, indent=2, sort_keys=True, default=_finite).encode() + b"\n"

    def to_dict(self, now: datetime | None = None) -> dict[str, Any]:
        data = json.loads(self.to_json())
        data["state"] = self.state(now)
        data["age_s"] = round(self.age_s(now), 1)
        return data

    @classmethod
    def from_json(cls, raw: bytes) -> RunStatus:
        data = json.loads(raw)
        gpu = data.get("gpu")
        return cls(
            phase=Phase(data["phase"]),
            updated_at=str(data["updated_at"]),
            started_at=str(data.get("started_at", data["updated_at"])),
            refresh_interval_s=float(data.get("refresh_interval_s", 10.0)),
            epoch=opt_int(data.get("epoch")),
            global_step=opt_int(data.get("global_step")),
            max_steps=opt_int(data.get("max_steps")),
            steps_per_s=opt_float(data.get("steps_per_s")),
            eta_s=opt_float(data.get("eta_s")),
            last_checkpoint=data.get("last_checkpoint") if isinstance(data.get("last_checkpoint"), dict) else None,
            metrics={str(k): float(v) for k, v in (data.get("metrics") or {}).items() if v is not None},
            host=str(data.get("host", "")),
            pid=opt_int(data.get("pid")),
            session=str(data.get("session", "")),
            gpu=_gpu_info(gpu) if isinstance(gpu, dict) else None,
            error=None if data.get("error") is None else str(data.get("error")),
            interruption=data.get("interruption") if isinstance(data.get("interruption"), dict) else None,
            format=str(data.get("format", STATUS_FORMAT)),
        )


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _gpu_info(data: dict[str, Any]) -> GpuInfo:
    def number(key: str) -> float | None:
        value = data.get(key)
        return None if value is None else float(value)

    return GpuInfo(
        name=str(data.get("name", "")),
        memory_used_mb=number("memory_used_mb"),
        memory_total_mb=number("memory_total_mb"),
        utilization_pct=number("utilization_pct"),
    )
