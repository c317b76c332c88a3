"""A skewed clock: `trainctl gc` calls a run lost by the store's own clock, never by comparing the
launcher's clock with the times the instance wrote. The launcher's clock is set hours ahead or
behind (``timeutil.now``, the one place trainctl reads it); a live run must stay live, a dead one
must be lost, whatever the instance wrote in ``updated_at``."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from trainctl_lightning import timeutil
from trainctl_lightning.errors import StoreError
from trainctl_lightning.gc import classify, store_clock
from trainctl_lightning.jobs.spec import LOST_AFTER_S, JobPhase, JobState
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.providers.api import MANAGED_BY, Instance, InstanceState
from trainctl_lightning.store import ObjectStore, layout
from trainctl_lightning.store.layout import TAG_MANAGED_BY, TAG_RUN_ID, TAG_STORE, run_url_in

SKEWS = [timedelta(hours=6), timedelta(hours=-6)]


def stamp(when: datetime) -> str:
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


def real_now() -> datetime:
    return datetime.now(timezone.utc)


@pytest.fixture(params=SKEWS, ids=["launcher-ahead", "launcher-behind"])
def skew(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> timedelta:
    """The launcher's clock, off by hours (the store's and the instance's are not)."""
    offset: timedelta = request.param
    monkeypatch.setattr(timeutil, "now", lambda: real_now() + offset)
    return offset


def instance_for(store_url: str, run_id: str, age: timedelta) -> Instance:
    """What a provider lists for an instance launched ``age`` ago (by the provider's clock) for a run."""
    return Instance(
        id=f"i-{run_id}",
        provider="aws",
        state=InstanceState.RUNNING,
        instance_type="g5.xlarge",
        created_at=stamp(real_now() - age),
        tags={TAG_MANAGED_BY: MANAGED_BY, TAG_RUN_ID: run_id, TAG_STORE: store_url},
    )


def write_state(store_url: str, run_id: str, phase: JobPhase, updated_at: datetime) -> JobStore:
    """The agent's heartbeat, with ``updated_at`` from the instance's clock."""
    jobs = JobStore(run_url_in(store_url, run_id))
    jobs.write_state(JobState(run_id=run_id, phase=phase, updated_at=stamp(updated_at), heartbeat_interval_s=5.0))
    return jobs


def backdate(file_store: str, run_id: str, seconds: float) -> None:
    """The store last saw the heartbeat ``seconds`` ago (its own modified time)."""
    path = os.path.join(file_store.removeprefix("file://"), run_id, layout.JOB_STATE)
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_live_run_is_not_lost_and_a_dead_one_is_whatever_the_launchers_clock_says(file_store: str, skew: timedelta) -> None:
    old = timedelta(hours=2)  # past the boot grace on every clock
    write_state(file_store, "live-1", JobPhase.RUNNING, updated_at=real_now())
    live = classify(instance_for(file_store, "live-1", old))
    assert not live.garbage and live.job_state == "running", live.reason
    # what the launcher's clock alone makes of the same record: hours off either way
    state = JobStore(run_url_in(file_store, "live-1")).read_state()
    assert state is not None and abs(state.age_s - skew.total_seconds()) < 60

    # the dead agent's clock was ahead: its last updated_at still looks fresh, but the store
    # has not seen the state change for ten minutes
    write_state(file_store, "dead-1", JobPhase.RUNNING, updated_at=real_now() + timedelta(hours=3))
    backdate(file_store, "dead-1", 10 * 60)
    dead = classify(instance_for(file_store, "dead-1", old))
    assert dead.garbage and dead.job_state == "lost", dead.reason
    assert "by the store's clock (lost)" in dead.reason
    silent = float(dead.reason.split("agent silent for ")[1].split("s ")[0])
    assert 10 * 60 - 5 <= silent <= 10 * 60 + LOST_AFTER_S  # the store's ten minutes, not hours


def test_boot_grace_is_measured_on_the_stores_clock(file_store: str, skew: timedelta) -> None:
    """A queued run on a young instance is still booting, even with the launcher hours ahead."""
    write_state(file_store, "queued-1", JobPhase.QUEUED, updated_at=real_now())
    booting = classify(instance_for(file_store, "queued-1", timedelta(minutes=1)))
    assert not booting.garbage and "still booting" in booting.reason
    abandoned = classify(instance_for(file_store, "queued-1", timedelta(hours=2)))
    assert abandoned.garbage and "never picked up" in abandoned.reason


def test_on_s3_the_store_clock_is_the_objects_last_modified(s3, skew: timedelta) -> None:
    store_url = s3.url()
    before = real_now()
    clock = store_clock(store_url)
    assert abs((clock - before).total_seconds()) < 30  # the store's time, not the skewed launcher's
    assert abs((clock - timeutil.now()).total_seconds()) > abs(skew.total_seconds()) - 60
    assert not [name for name in JobStore(store_url).objects.glob("*") if "clock" in name]  # the probe is gone

    write_state(store_url, "live-s3", JobPhase.RUNNING, updated_at=real_now() - skew)  # the instance's clock is off too
    live = classify(instance_for(store_url, "live-s3", timedelta(hours=2)))
    assert not live.garbage and live.job_state == "running", live.reason


def test_a_store_whose_clock_cannot_be_read_keeps_the_instance(file_store: str, skew: timedelta, monkeypatch) -> None:
    """Read-only credentials: no probe object, so no store clock, so no "lost" verdict (kept)."""
    write_state(file_store, "ro-1", JobPhase.RUNNING, updated_at=real_now())
    backdate(file_store, "ro-1", 10 * 60)
    real_write = ObjectStore.write

    def read_only(self: ObjectStore, rel: str, data: bytes, **kwargs: Any) -> None:
        if rel.startswith(".trainctl-clock-"):
            raise StoreError(f"access denied writing {self.url_of(rel)} (injected)")
        real_write(self, rel, data, **kwargs)

    monkeypatch.setattr(ObjectStore, "write", read_only)
    kept = classify(instance_for(file_store, "ro-1", timedelta(hours=2)))
    assert not kept.garbage and "cannot read the store's clock (access denied" in kept.reason
    # an ended run needs no clock: still garbage
    write_state(file_store, "ended-1", JobPhase.SUCCEEDED, updated_at=real_now())
    assert classify(instance_for(file_store, "ended-1", timedelta(hours=2))).garbage
