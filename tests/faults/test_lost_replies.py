"""Create-only writes whose reply is lost: the write landed, the caller saw an error.

Whatever writes create-only (metrics segments, checkpoint manifests, log chunks, job records)
must carry on when it finds its own bytes there, and pick the next name (or refuse, for a
manifest) when another object holds the name. Each case runs on a local disk and on S3 (moto).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest

from tests.helpers.hostile import LostReplies
from tests.helpers.models import TinyRegressor, trainer_kwargs
from trainctl_lightning.agent.runner import LogPump
from trainctl_lightning.errors import ConflictError, StoreError
from trainctl_lightning.jobs.spec import JobSpec
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.metrics.read import read_metrics
from trainctl_lightning.metrics.reporter import MetricsReporter
from trainctl_lightning.retry import RetryPolicy
from trainctl_lightning.store import RunStore, layout
from trainctl_lightning.timeutil import utc_now

NO_RETRIES = RetryPolicy(deadline_s=0.0)
"""The call gives up at its first error: the lost reply reaches the caller, as after a long outage."""
QUICK_RETRIES = RetryPolicy(deadline_s=10.0, initial_backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture(params=["file", "s3"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return str(request.getfixturevalue("s3").url())
    return f"file://{tmp_path}/store/run"


def _spec(run_url: str) -> JobSpec:
    return JobSpec(run_id=run_url.rsplit("/", 1)[-1], run_url=run_url, created_at=utc_now(), script="train.py")


def test_a_retried_create_finds_its_own_object_and_succeeds(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lost = LostReplies(lambda path: path.endswith("a.json")).install(monkeypatch)
    store = RunStore(url, retry=QUICK_RETRIES)
    store.objects.write("a.json", b'{"mine": 1}', create_only=True)
    assert len(lost.lost) == 1, "the test double lost no reply: the case did not happen"
    assert store.objects.read("a.json") == b'{"mine": 1}'


def test_a_create_repeated_by_the_caller_after_a_lost_reply_succeeds_and_foreign_content_conflicts(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lost = LostReplies(lambda path: path.endswith("b.json")).install(monkeypatch)
    store = RunStore(url, retry=NO_RETRIES)
    with pytest.raises(StoreError, match="connection reset"):
        store.objects.write("b.json", b"ours", create_only=True)
    assert lost.lost
    store.objects.write("b.json", b"ours", create_only=True)  # the caller's retry: our bytes are there
    with pytest.raises(ConflictError, match="already exists; not overwritten"):
        store.objects.write("b.json", b"theirs", create_only=True)
    assert store.objects.read("b.json") == b"ours"


def test_metrics_segments_after_a_lost_reply_are_written_once_and_the_buffer_drains(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lost = LostReplies(lambda path: f"/{layout.METRICS}/" in path).install(monkeypatch)
    reporter = MetricsReporter(url, flush_interval=0.05)
    reporter.store.objects.retry = NO_RETRIES  # the failed write reaches the reporter itself
    step = 0
    for _ in range(4):  # four flushes (the writer thread's ticks), a few records before each
        for _ in range(3):
            reporter._writer.buffer.append(("m", 0.0, step, {"loss": float(step)}))
            step += 1
        reporter._writer.flush()

    assert len(lost.lost) == 1 and reporter.write_errors == 1, "no segment lost its reply: the case did not happen"
    lost_name = lost.lost[0].rsplit("/", 1)[-1]
    names = [name for name, _ in RunStore(url).read_metrics_segments()]
    assert names[0] == lost_name, "the segment whose reply was lost is not the first one in the store"
    assert len(names) == 4, f"after the lost reply the segments did not go on one per flush: {names}"
    assert [r.step for r in read_metrics(url)] == list(range(step)), "records lost or written twice"
    assert reporter._writer.buffer == [] and reporter._writer.unwritten is None


def test_a_fit_whose_first_metrics_reply_is_lost_reports_every_step_once(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lost = LostReplies(lambda path: f"/{layout.METRICS}/" in path).install(monkeypatch)
    reporter = MetricsReporter(url, flush_interval=0.05, flush_every=4)
    reporter.store.objects.retry = NO_RETRIES
    trainer = pl.Trainer(**trainer_kwargs(max_steps=12, limit_val_batches=0, log_every_n_steps=1, logger=reporter))
    trainer.fit(TinyRegressor())
    assert lost.lost, "no segment lost its reply: the case did not happen"
    steps = [r.step for r in read_metrics(url) if "train_loss" in r.metrics]
    assert steps == list(range(trainer.global_step)), "records lost or written twice"
    assert reporter._writer.buffer == [] and reporter._writer.unwritten is None


def test_a_metrics_segment_name_taken_by_another_object_moves_to_the_next_name(url: str) -> None:
    reporter = MetricsReporter(url, flush_interval=0.05)
    reporter.store.objects.write(f"{layout.METRICS}/{reporter._writer.segment_name()}", b"not ours\n", create_only=True)
    reporter._writer.buffer.append(("m", 0.0, 3, {"loss": 1.5}))
    reporter._writer.flush()
    assert reporter._writer.unwritten is None and reporter._writer.buffer == []
    segments = dict(RunStore(url).read_metrics_segments())
    assert len(segments) == 2 and b"not ours\n" in segments.values()
    assert [(r.step, r.metrics) for r in read_metrics(url)] == [(3, {"loss": 1.5})]


def test_a_manifest_whose_reply_is_lost_is_published_and_its_data_kept(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lost = LostReplies(lambda path: path.endswith(layout.CHECKPOINT_MANIFEST)).install(monkeypatch)
    local = tmp_path / "epoch=0-step=4.ckpt"
    local.write_bytes(b"weights" * 1000)
    store = RunStore(url, retry=NO_RETRIES)
    manifest = store.publish_checkpoint([local], global_step=4)
    assert lost.lost, "the manifest write lost no reply: the case did not happen"
    assert [m.id for m in RunStore(url).list_checkpoints()] == [manifest.id]
    RunStore(url).verify_checkpoint(manifest)  # its data was not discarded as "unpublished"


def test_a_manifest_id_held_by_another_manifest_is_a_conflict(url: str, tmp_path: Path) -> None:
    local = tmp_path / "a.ckpt"
    local.write_bytes(b"a")
    store = RunStore(url)
    first = store.publish_checkpoint([local], global_step=1)
    with pytest.raises(ConflictError, match=first.id):
        store.publish_checkpoint([local], global_step=1, checkpoint_id=first.id)
    assert store.get_checkpoint(first.id) == first


def test_log_chunks_after_a_lost_reply_lose_nothing_and_repeat_nothing(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lost = LostReplies(lambda path: path.endswith(".log")).install(monkeypatch)
    jobs = JobStore(url)
    jobs.objects.retry = NO_RETRIES
    pump = LogPump(jobs.log_writer(), tmp_path / "local.log")
    try:
        pump.feed(b"first line\n")
        assert pump.ship() is False, "the lost reply did not reach the pump: the case did not happen"
        pump.feed(b"second line\n")
        assert pump.ship() is True
    finally:
        pump.close()
    assert len(lost.lost) == 1
    assert jobs.read_logs() == b"first line\nsecond line\n"
    assert len(jobs.read_log_chunks()) == 2


def test_a_log_chunk_name_taken_by_another_object_moves_to_the_next_name(url: str, tmp_path: Path) -> None:
    jobs = JobStore(url)
    writer = jobs.log_writer()
    jobs.objects.write(writer.next_name(), b"planted\n", create_only=True)
    pump = LogPump(writer, tmp_path / "local.log")
    try:
        pump.feed(b"ours\n")
        assert pump.ship() is True
    finally:
        pump.close()
    assert jobs.read_logs() == b"planted\nours\n"


def test_a_job_record_whose_reply_is_lost_is_written_once(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lost = LostReplies(lambda path: path.endswith(layout.JOB)).install(monkeypatch)
    jobs = JobStore(url)
    jobs.objects.retry = NO_RETRIES
    spec = _spec(jobs.url)
    with pytest.raises(StoreError):
        jobs.write_spec(spec)
    jobs.write_spec(spec)  # the launcher's retry
    assert lost.lost and jobs.read_spec() == spec
    other = JobSpec(**{**json.loads(spec.to_json()), "env_mode": spec.env_mode, "script": "other.py"})
    with pytest.raises(ConflictError):
        jobs.write_spec(other)
