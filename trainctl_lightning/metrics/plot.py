"""Plotting a run's metrics to an image file (``trainctl plot``), with matplotlib.

matplotlib is optional: ``pip install 'trainctl-lightning[plot]'``. Drawing uses the Agg
canvas directly, so it works without a display and never changes the backend of a process
that already uses pyplot. Example::

    from trainctl_lightning.metrics import read
    from trainctl_lightning.metrics.plot import plot_metrics

    url = "s3://bucket/runs/exp1"
    plot_metrics(read.read_metrics(url), ["train_loss", "val_loss"], "exp1.png", title=url)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainctl_lightning.errors import ConfigError
from trainctl_lightning.metrics.records import MetricRecord
from trainctl_lightning.metrics.view import format_value, metric_series, select_metrics

__all__ = ["DPI", "MARK_POINTS_UP_TO", "PANEL_HEIGHT_IN", "PANEL_WIDTH_IN", "plot_metrics"]

PANEL_WIDTH_IN = 6.0
PANEL_HEIGHT_IN = 3.2
DPI = 110
#: Points are marked on a line that has at most this many.
MARK_POINTS_UP_TO = 60


def plot_metrics(
    records: Sequence[MetricRecord],
    metrics: list[str] | None,
    out_path: str | Path,
    title: str = "",
) -> Path:
    """Draw one panel per metric against step and save it to ``out_path``.

    Each panel has one line: the metric's value at each step (a step logged more than once,
    as after a resume from an earlier checkpoint, shows its latest value), NaN and infinite
    values left out. The format follows the file's extension (``.png``, ``.svg``, ``.pdf``...).

    Args:
        records: the run's metric records (:func:`trainctl_lightning.metrics.read.read_metrics`).
        metrics: names to draw, in this order; None for every metric but ``epoch``.
        out_path: image file to write (its folder is created).
        title: the figure's title, e.g. the run URL.

    Returns:
        The path written.

    Raises:
        ConfigError: no records, a metric that is not in them (the message lists those that
            are), an unknown image format, or matplotlib is not installed.
    """
    if not records:
        raise ConfigError("no metric records to plot: the run has not logged any metrics yet")
    names = select_metrics(records, metrics)
    series = {name: _by_step(metric_series(records, name)) for name in names}
    empty = [n for n, points in series.items() if not points]
    if empty and len(empty) == len(names):
        raise ConfigError(f"nothing to plot: {', '.join(empty)} has only NaN or infinite values")

    Figure, FigureCanvasAgg = _matplotlib()
    out = Path(out_path)
    cols = 1 if len(names) <= 3 else 2
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(PANEL_WIDTH_IN * cols + 0.5, PANEL_HEIGHT_IN * rows + 0.6), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    colors = [f"C{i}" for i in range(10)]
    for i, name in enumerate(names):
        ax = axes[i // cols][i % cols]
        points = series[name]
        steps = [s for s, _ in points]
        values = [v for _, v in points]
        label = f"{name} (last {format_value(values[-1])})" if values else f"{name} (no finite values)"
        ax.plot(
            steps,
            values,
            color=colors[i % len(colors)],
            linewidth=1.5,
            marker="o" if len(points) <= MARK_POINTS_UP_TO else None,
            markersize=3,
            label=label,
        )
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    for j in range(len(names), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    if title:
        fig.suptitle(title)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
    except ValueError as exc:  # matplotlib's "Format 'xyz' is not supported"
        raise ConfigError(f"cannot write a plot to {str(out)!r}: {exc}") from None
    return out


def _by_step(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Finite values, sorted by step; for a repeated step the later record wins."""
    latest: dict[int, float] = {}
    for step, value in points:
        if math.isfinite(value):
            latest[step] = value
    return sorted(latest.items())


def _matplotlib() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'trainctl-lightning[plot]'") from None
    return Figure, FigureCanvasAgg
