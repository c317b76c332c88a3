"""`trainctl runs ls / monitor / metrics / plot` on runs that really trained, as a user runs them.

One real run (TinyRegressor, MetricsReporter) is trained per module against file:// and shared;
S3 gets its own small run. The CLI runs as a subprocess, like tests/test_cli.py.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from lightning.pytorch import Trainer
from rich.console import Console

from tests.helpers import wait_until
from tests.helpers.cli import TRAINCTL, trainctl
from tests.helpers.models import TinyRegressor, trainer_kwargs
from trainctl_lightning import ConfigError, RunStore
from trainctl_lightning.humanize import human_ago, human_duration
from trainctl_lightning.metrics import read, view
from trainctl_lightning.metrics.plot import plot_metrics
from trainctl_lightning.metrics.records import GpuInfo, MetricRecord, Phase, RunStatus
from trainctl_lightning.metrics.reporter import MetricsReporter

EPOCHS = 4
STEPS = EPOCHS * 8  # 64 samples, batch 8
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train(url: str, root, epochs: int = EPOCHS) -> None:
    kwargs = trainer_kwargs(max_epochs=epochs, log_every_n_steps=1, default_root_dir=str(root))
    kwargs.pop("logger")
    Trainer(logger=[MetricsReporter(url)], **kwargs).fit(TinyRegressor(lr=0.02))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    """A finished run in a local store: train_loss every step, val_loss every epoch."""
    base = tmp_path_factory.mktemp("trained")
    url = f"file://{base}/store/runs/exp1"
    train(url, base / "lightning")
    return url


def iso(dt: datetime) -> str:
    return dt.isoformat(timespec="seconds").replace("+00:00", "Z")


def write_status(url: str, phase: Phase, age_s: float = 0.0, **fields) -> RunStatus:
    now = datetime.now(timezone.utc)
    status = RunStatus(
        phase=phase,
        updated_at=iso(now - timedelta(seconds=age_s)),
        started_at=iso(now - timedelta(seconds=age_s + 600)),
        refresh_interval_s=5.0,
        **{
            "epoch": 2,
            "global_step": 50,
            "max_steps": 100,
            "steps_per_s": 4.0,
            "eta_s": 12.5,
            "metrics": {"train_loss": 0.25, "epoch": 2.0},
            "host": "gpu-box",
            **fields,
        },
    )
    RunStore(url).write_status(status.to_json())
    return status


def one_line_error(out: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    assert "Traceback" not in out.stderr
    for needle in needles:
        assert needle in out.stderr, out.stderr


# ------------------------------------------------------------------ pure helpers
def test_sparkline():
    assert view.sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert view.sparkline([8, 1]) == "█▁"
    assert view.sparkline([0.5, 0.5, 0.5]) == "▄▄▄", "a flat series is a flat middle row"
    assert view.sparkline([]) == "" and view.sparkline([float("nan")]) == ""
    assert view.sparkline([1, float("nan"), 3, float("inf"), 2]) == "▁█▅", "non-finite values skipped"
    assert view.sparkline(range(100), width=5) == "▁▃▅▆█", "only the last `width` values, rescaled"
    assert len(view.sparkline(range(100))) == view.TREND_POINTS
    with pytest.raises(ConfigError):
        view.sparkline([1], width=0)


def test_human_formatting():
    assert [human_duration(s) for s in (None, -1, 0, 45, 185, 7260, 3 * 86400 + 4 * 3600)] == [
        "-",
        "-",
        "0s",
        "45s",
        "3m05s",
        "2h01m",
        "3d04h",
    ]
    assert human_ago(61) == "1m01s ago"
    assert [view.format_value(v) for v in (None, float("nan"), 3.0, 0.123456, 1.5e-5)] == ["-", "nan", "3", "0.1235", "1.5e-05"]


def test_monitor_frame_renders_status_metrics_and_trend():
    now = datetime.now(timezone.utc)
    status = RunStatus(
        phase=Phase.TRAINING,
        updated_at=iso(now),
        started_at=iso(now - timedelta(minutes=5)),
        refresh_interval_s=5,
        epoch=1,
        global_step=12,
        max_steps=100,
        steps_per_s=2.5,
        eta_s=35.2,
        host="gpu-box",
        pid=42,
        gpu=GpuInfo(name="NVIDIA H100", memory_used_mb=10240, memory_total_mb=81920, utilization_pct=97),
        last_checkpoint={"name": "last.ckpt", "global_step": 10},
        metrics={"train_loss": 0.5, "lr": 0.1, "epoch": 1.0},
    )
    records = [MetricRecord(step=i, time=iso(now), metrics={"train_loss": 1.0 / (i + 1), "epoch": 0.0}) for i in range(12)]
    console = Console(record=True, width=140)
    console.print(view.monitor_renderable("s3://b/runs/x", status, records, now=now))
    text = console.export_text()
    for needle in (
        "s3://b/runs/x",
        "training",
        "12/100",
        "12%",
        "2.5",
        "35s",
        "gpu-box (pid 42)",
        "NVIDIA H100 · 10.0/80.0 GiB · 97% busy",
        "last.ckpt (step 10)",
        "train_loss",
        "lr",
    ):
        assert needle in text, (needle, text)
    assert view.sparkline(r.metrics["train_loss"] for r in records) in text
    assert "█▄▃▂▂▂▁▁▁▁▁▁" in text, "train_loss falls: its trend falls"

    data = view.monitor_json("s3://b/runs/x", status, records, now=now)
    assert data["state"] == "training" and data["status"]["global_step"] == 12
    assert data["metrics"]["train_loss"]["value"] == 1 / 12 and data["metrics"]["train_loss"]["step"] == 11
    assert data["metrics"]["lr"] == {"value": 0.1, "step": None, "min": None, "max": None, "count": 0, "trend": ""}, (
        "a metric only the status knows still shows"
    )
    assert "epoch" not in data["metrics"]


# ------------------------------------------------------------------ runs ls / metrics
def check_runs_ls_and_metrics(url: str, env: dict[str, str] | None = None) -> None:
    prefix = url.rsplit("/", 1)[0]
    for where in (url, prefix):
        out = trainctl("runs", "ls", where, "--output", "json", env=env)
        assert out.returncode == 0, out.stderr
        [run] = json.loads(out.stdout)["runs"]
        assert run["name"] == "exp1" and run["state"] == "finished"
        assert run["status"]["global_step"] == STEPS and run["status"]["max_steps"] == STEPS
    table = trainctl("runs", "ls", prefix, env=env)
    assert table.returncode == 0, table.stderr
    for needle in ("exp1", "finished", f"{STEPS}/{STEPS}", "train_loss=", "val_loss="):
        assert needle in table.stdout, (needle, table.stdout)

    records = read.read_metrics(url)
    assert len(records) == STEPS + EPOCHS, "a train_loss record every step, a val_loss record every epoch"
    out = trainctl("metrics", url, "--output", "csv", env=env)
    assert out.returncode == 0, out.stderr
    rows = list(csv.reader(io.StringIO(out.stdout)))
    assert rows[0] == ["step", "time", "train_loss", "val_loss", "epoch"]
    assert len(rows) == 1 + len(records)
    for row, rec in zip(rows[1:], records):
        assert int(row[0]) == rec.step and row[1] == rec.time
        got = {name: float(cell) for name, cell in zip(rows[0][2:], row[2:]) if cell != ""}
        assert got == rec.metrics, "exactly the logged values, empty cells for the rest"

    js = trainctl("metrics", url, "--output", "json", env=env)
    assert js.returncode == 0, js.stderr
    assert json.loads(js.stdout) == [{"step": r.step, "time": r.time, "metrics": r.metrics} for r in records]


def test_runs_ls_and_metrics_on_a_local_run(trained):
    check_runs_ls_and_metrics(trained)

    val = list(csv.reader(io.StringIO(trainctl("metrics", trained, "--output", "csv", "-m", "val_loss").stdout)))
    assert val[0] == ["step", "time", "val_loss"] and len(val) == 1 + EPOCHS
    assert [int(r[0]) for r in val[1:]] == [8 * (e + 1) - 1 for e in range(EPOCHS)]
    table = trainctl("metrics", trained)
    assert table.returncode == 0 and "train_loss" in table.stdout and "val_loss" in table.stdout


@pytest.mark.slow
def test_runs_ls_and_metrics_on_s3(s3, tmp_path):
    url = s3.url("exp1")
    train(url, tmp_path)
    check_runs_ls_and_metrics(url, env=s3.env())


# ------------------------------------------------------------------ plot
def test_plot_writes_one_panel_per_metric(trained, tmp_path):
    png = tmp_path / "plots" / "exp1.png"
    out = trainctl("plot", trained, "-o", str(png))
    assert out.returncode == 0, out.stderr
    assert "2 panels: train_loss, val_loss" in out.stdout
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000, len(data)

    js = trainctl("plot", trained, "-m", "val_loss", "-o", str(tmp_path / "val.svg"), "--output", "json")
    assert js.returncode == 0, js.stderr
    assert json.loads(js.stdout)["metrics"] == ["val_loss"]
    assert (tmp_path / "val.svg").read_text().lstrip().startswith("<?xml")


def test_plot_metrics_from_python(tmp_path, monkeypatch):
    records = [
        MetricRecord(step=i, time="", metrics={"loss": float("nan") if i == 3 else 1 / (i + 1), "epoch": 0.0}) for i in range(10)
    ]
    path = plot_metrics(records, None, tmp_path / "a.png", title="run")
    assert path.read_bytes().startswith(PNG_MAGIC)

    with pytest.raises(ConfigError, match="no metric named 'acc' in this run; available: loss, epoch"):
        plot_metrics(records, ["loss", "acc"], tmp_path / "b.png", title="run")
    with pytest.raises(ConfigError, match="no metric records"):
        plot_metrics([], None, tmp_path / "c.png")
    with pytest.raises(ConfigError, match="cannot write a plot"):
        plot_metrics(records, None, tmp_path / "d.nosuchformat")
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):  # as if not installed
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match=r"pip install 'trainctl-lightning\[plot\]'"):
        plot_metrics(records, None, tmp_path / "e.png")


# ------------------------------------------------------------------ monitor
def test_monitor_once_and_live_on_a_finished_run(trained):
    out = trainctl("monitor", trained, "--once")
    assert out.returncode == 0, out.stderr
    for needle in ("finished", f"{STEPS}/{STEPS}", "train_loss", "val_loss", "TREND"):
        assert needle in out.stdout, (needle, out.stdout)

    js = trainctl("monitor", trained, "--once", "--output", "json")
    assert js.returncode == 0, js.stderr
    data = json.loads(js.stdout)
    assert data["state"] == "finished" and data["status"]["global_step"] == STEPS
    assert set(data["metrics"]) == {"train_loss", "val_loss"}
    assert data["metrics"]["val_loss"]["value"] == read.read_status(trained).metrics["val_loss"]

    live = trainctl("monitor", trained, "--interval", "0.2")
    assert live.returncode == 0, live.stderr
    assert "finished" in live.stdout and live.stdout.endswith("\n")

    prefix = trained.rsplit("/", 1)[0]
    assert "finished" in trainctl("monitor", prefix, "--once").stdout, "a prefix holding one run: that run"


def test_stale_run_shows_stale(tmp_path):
    prefix = f"file://{tmp_path}/runs"
    write_status(f"{prefix}/dead", Phase.TRAINING, age_s=600)
    write_status(f"{prefix}/alive", Phase.TRAINING, age_s=0)

    rows = {r["name"]: r for r in json.loads(trainctl("runs", "ls", prefix, "--output", "json").stdout)["runs"]}
    assert rows["dead"]["state"] == "stale" and rows["alive"]["state"] == "training"
    table = trainctl("runs", "ls", prefix)
    assert table.returncode == 0
    [dead_line] = [line for line in table.stdout.splitlines() if "dead" in line]
    assert "stale" in dead_line and "50/100" in dead_line and "10m0" in dead_line and "train_loss=0.25" in dead_line

    once = trainctl("monitor", f"{prefix}/dead", "--once")
    assert once.returncode == 0 and "stale" in once.stdout and "last reported training" in once.stdout
    live = trainctl("monitor", f"{prefix}/dead", "--interval", "0.2")
    assert live.returncode == 4 and "stale" in live.stdout


@pytest.mark.parametrize("phase, code", [(Phase.FAILED, 1), (Phase.INTERRUPTED, 3)])
def test_monitor_exit_code_says_how_the_run_ended(file_url, phase, code):
    write_status(file_url, phase, error="RuntimeError: boom at step 50" if phase is Phase.FAILED else None)
    out = trainctl("monitor", file_url, "--interval", "0.2")
    assert out.returncode == code, (out.stdout, out.stderr)
    assert phase.value in out.stdout
    if phase is Phase.FAILED:
        assert "RuntimeError: boom at step 50" in out.stdout


def test_a_run_stopped_by_a_spot_interruption_shows_preempted(tmp_path):
    """The agent records the notice in job-state.json; readers of status.json show why it stopped."""
    prefix = f"file://{tmp_path}/runs"
    notice = {"action": "terminate", "time": "2026-11-26T16:46:40Z", "seen_at": "2026-11-26T16:44:41Z"}
    job_state = {"phase": "preempted", "interruption": notice, "error": "spot interruption notice at 2026-11-26T16:46:40Z"}
    for name, phase, age in (("interrupted", Phase.INTERRUPTED, 0), ("gone", Phase.TRAINING, 600)):
        write_status(f"{prefix}/{name}", phase, age_s=age)
        RunStore(f"{prefix}/{name}").objects.write("job-state.json", json.dumps(job_state).encode())
    write_status(f"{prefix}/plain", Phase.INTERRUPTED)  # Ctrl-C: no notice, stays interrupted

    rows = {r["name"]: r for r in json.loads(trainctl("runs", "ls", prefix, "--output", "json").stdout)["runs"]}
    assert {name: row["state"] for name, row in rows.items()} == {
        "interrupted": "preempted",
        "gone": "preempted",
        "plain": "interrupted",
    }
    assert rows["gone"]["status"]["interruption"] == notice
    out = trainctl("monitor", f"{prefix}/gone", "--interval", "0.2")
    assert out.returncode == 3 and "preempted" in out.stdout


def test_monitor_follower_fetches_only_new_segments(trained, file_url, monkeypatch):
    from trainctl_lightning.metrics.read import MetricsFollower

    assert MetricsFollower(trained).records() == read.read_metrics(trained)

    store = RunStore(file_url)
    follower = MetricsFollower(file_url)
    assert follower.records() == []
    store.write_metrics_segment("b-000001.jsonl", b'{"t": "t2", "step": 2, "metrics": {"loss": 0.5}}\n')
    assert [r.step for r in follower.records()] == [2]
    fetched: list[list[str]] = []
    cat = follower.store.objects.fs.cat
    monkeypatch.setattr(follower.store.objects.fs, "cat", lambda paths, **kw: fetched.append(list(paths)) or cat(paths, **kw))
    store.write_metrics_segment("a-000000.jsonl", b'{"t": "t1", "step": 1, "metrics": {"loss": null}}\nnot json\n')
    records = follower.records()
    assert [[p.rsplit("/", 1)[-1] for p in paths] for paths in fetched] == [["a-000000.jsonl"]], "only the new one"
    assert follower.records() == records and len(fetched) == 1, "nothing new: nothing fetched"
    assert repr(records) == repr(read.read_metrics(file_url)), "same records (NaN for null), in name order, as read_metrics"


def _monitor_process(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """`trainctl monitor` as on a terminal, writing to ``monitor.out``/``monitor.err`` in ``tmp_path``,
    which a test reads while it runs. TTY_COMPATIBLE makes rich draw every frame of the live view
    (to a plain file it draws only the last one), so a test can see what the monitor has seen."""
    with open(tmp_path / "monitor.out", "w") as out, open(tmp_path / "monitor.err", "w") as err:
        return subprocess.Popen(
            [*TRAINCTL, "monitor", *args],
            stdout=out,
            stderr=err,
            text=True,
            env={**os.environ, "COLUMNS": "200", "TTY_COMPATIBLE": "1", "TERM": "xterm", "NO_COLOR": "1"},
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background job may inherit SIG_IGN
        )


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_monitor_waits_for_the_first_status_and_follows_the_run_to_its_end(file_url, tmp_path):
    out, err = tmp_path / "monitor.out", tmp_path / "monitor.err"
    proc = _monitor_process(tmp_path, file_url, "--interval", "0.2")
    try:
        wait_until(lambda: f"waiting for {file_url} to report…" in err.read_text(), timeout=30, what="the monitor to wait")
        assert proc.poll() is None, "still waiting"
        write_status(file_url, Phase.TRAINING, global_step=10)
        wait_until(
            lambda: "training" in (text := out.read_text()) and "10/100" in text, timeout=30, what="a frame of the live run"
        )
        assert proc.poll() is None, "watching a live run"
        write_status(file_url, Phase.FINISHED, global_step=100, eta_s=None)
        proc.wait(timeout=30)
    finally:
        _stop(proc)
    stdout, stderr = out.read_text(), err.read_text()
    assert proc.returncode == 0, (stdout, stderr)
    assert "finished" in stdout and "100/100" in stdout


def test_monitor_ctrl_c_exits_130_quietly(file_url, tmp_path):
    write_status(file_url, Phase.TRAINING)
    out, err = tmp_path / "monitor.out", tmp_path / "monitor.err"
    proc = _monitor_process(tmp_path, file_url, "--interval", "0.2")
    try:
        # Ctrl-C once it shows the run (not while Python is still starting up)
        wait_until(lambda: "training" in out.read_text(), timeout=30, what="a frame of the live run")
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        _stop(proc)
    stdout, stderr = out.read_text(), err.read_text()
    assert proc.returncode == 130, (stdout, stderr)
    assert "stopped" in stderr and "Traceback" not in stderr and "Aborted" not in stderr, stderr


# ------------------------------------------------------------------ errors
@pytest.mark.slow
def test_errors_are_one_line(trained, tmp_path):
    one_line_error(
        trainctl("plot", trained, "-m", "nope", "-o", str(tmp_path / "x.png")),
        "no metric named 'nope' in this run; available: train_loss, val_loss, epoch",
    )
    assert not (tmp_path / "x.png").exists()
    one_line_error(trainctl("metrics", trained, "-m", "nope"), "available: train_loss, val_loss, epoch")

    nothing = f"file://{tmp_path}/nothing"
    for args in (("metrics", nothing), ("plot", nothing, "-o", str(tmp_path / "y.png")), ("monitor", nothing, "--once")):
        one_line_error(trainctl(*args), f"no run at {nothing}", "check the URL")
    one_line_error(trainctl("runs", "ls", nothing), f"no runs at {nothing}")

    js = trainctl("metrics", nothing, "--output", "json")
    assert js.returncode == 1 and json.loads(js.stdout)["type"] == "ConfigError"

    prefix = f"file://{tmp_path}/two"
    write_status(f"{prefix}/a", Phase.FINISHED)
    write_status(f"{prefix}/b", Phase.FINISHED)
    one_line_error(trainctl("metrics", prefix), "holds 2 runs (a, b), not one run")
    one_line_error(trainctl("monitor", prefix, "--once"), "holds 2 runs (a, b)")
    one_line_error(trainctl("monitor", trained, "--output", "json"), "--output json needs --once")

    no_metrics = f"file://{tmp_path}/fresh"
    write_status(no_metrics, Phase.STARTING, metrics={})
    empty = trainctl("metrics", no_metrics, "--output", "csv")
    assert empty.returncode == 0 and empty.stdout == "step,time\n"
    one_line_error(trainctl("plot", no_metrics, "-o", str(tmp_path / "z.png")), "no metric records to plot")
