"""The attempts of a managed run (``--recover``): how one begins and ends in ``job-state.json``.

Shared by the agent (which records its own attempt) and the local provider's supervisor (which
records an attempt whose agent died without a word, and decides on the next one). The agent
learns its attempt number from ``$TRAINCTL_ATTEMPT`` (set by whatever started it: the supervisor,
or the instance's boot script) and passes it on to the job with ``TRAINCTL_RECOVER=1``.

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import json
import logging
import os

from trainctl_lightning.jobs.spec import Attempt, AttemptEnd, JobPhase, JobState
from trainctl_lightning.store.layout import ATTEMPT_ENV
from trainctl_lightning.timeutil import utc_now

__all__ = [
    "PRICE_ENV",
    "attempt_marker",
    "begin_attempt",
    "current_attempt",
    "end_attempt",
    "end_of",
    "price_per_hour",
]

log = logging.getLogger(__name__)

PRICE_ENV = "TRAINCTL_PRICE_PER_HOUR"
"""The instance's hourly price, when whoever started the agent knows it (for ``max_cost``)."""


def current_attempt(previous: JobState | None = None) -> int:
    """This agent's attempt number: ``$TRAINCTL_ATTEMPT`` when whoever started it set it (the local
    supervisor); else one past the newest attempt the run's state records (a replacement instance
    that the cloud started from the same boot script knows nothing else); else 1."""
    raw = os.environ.get(ATTEMPT_ENV, "").strip()
    if raw.isdigit() and int(raw) >= 1:
        return int(raw)
    if previous is not None and previous.attempts:
        return max(a.number for a in previous.attempts) + 1
    return 1


def price_per_hour() -> float | None:
    raw = os.environ.get(PRICE_ENV)
    try:
        value = float(raw) if raw else None
    except ValueError:
        log.warning("ignoring %s=%r: not a number", PRICE_ENV, raw)
        return None
    return value if value is not None and value > 0 else None


def _checkpoint_and_status(run_url: str) -> tuple[str | None, int | None, int | None]:
    """(newest checkpoint id, its global step, the run's global step from status.json); Nones when unknown."""
    from trainctl_lightning.store.run import RunStore

    store = RunStore(run_url)
    ckpt_id: str | None = None
    ckpt_step: int | None = None
    step: int | None = None
    try:
        latest = store.latest_checkpoint()
        if latest is not None:
            ckpt_id, ckpt_step = latest.id, latest.global_step
    except Exception as exc:  # the attempt goes on; only the record lacks the checkpoint
        log.warning("could not find the run's newest checkpoint: %s", " ".join(str(exc).split()))
    try:
        raw = store.read_status()
        if raw is not None:
            value = json.loads(raw).get("global_step")
            step = value if isinstance(value, int) and not isinstance(value, bool) else None
    except Exception as exc:
        log.warning("could not read the run's status: %s", " ".join(str(exc).split()))
    return ckpt_id, ckpt_step, step


def begin_attempt(state: JobState, previous: JobState | None, number: int, instance_id: str | None, run_url: str) -> Attempt:
    """Carry the earlier attempts of ``previous`` into ``state`` and add attempt ``number``."""
    earlier = [a for a in (previous.attempts if previous is not None else []) if a.number < number]
    for a in earlier:  # an attempt that never said how it ended was lost with its instance
        if a.ended is None:
            a.ended, a.ended_at = AttemptEnd.LOST.value, a.ended_at or utc_now()
    ckpt_id, ckpt_step, _ = _checkpoint_and_status(run_url)
    attempt = Attempt(number=number, instance_id=instance_id, started_at=utc_now(), resumed_from=ckpt_id, resumed_step=ckpt_step)
    state.attempts = [*earlier, attempt]
    return attempt


def end_attempt(attempt: Attempt, ended: AttemptEnd, error: str | None, run_url: str) -> None:
    """Record how ``attempt`` ended, and the steps it trained (from the run's status) when known."""
    _, _, step = _checkpoint_and_status(run_url)
    attempt.ended = ended.value
    attempt.ended_at = utc_now()
    attempt.error = error
    if step is not None:
        attempt.last_step = step
        start = attempt.resumed_step if attempt.resumed_step is not None else 0
        attempt.steps = max(0, step - start) if attempt.resumed_from is None or attempt.resumed_step is not None else None


def end_of(phase: JobPhase) -> AttemptEnd:
    """How an attempt whose job ended in ``phase`` ended."""
    return {
        JobPhase.SUCCEEDED: AttemptEnd.FINISHED,
        JobPhase.PREEMPTED: AttemptEnd.PREEMPTED,
        JobPhase.CANCELLED: AttemptEnd.CANCELLED,
        JobPhase.TIMED_OUT: AttemptEnd.CANCELLED,
    }.get(phase, AttemptEnd.FAILED)


def attempt_marker(attempt: Attempt) -> str:
    """The line that opens an attempt's output in the run's log."""
    where = attempt.instance_id or "this instance"
    start = f"resuming from {attempt.resumed_from}" if attempt.resumed_from else "starting from scratch"
    return f"--- attempt {attempt.number} on {where}, {start} ---"
