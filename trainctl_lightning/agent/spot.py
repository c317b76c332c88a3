"""Spot interruption notices, read from the EC2 instance metadata service (IMDSv2) by the agent.

EC2 gives a spot instance about two minutes' notice before it reclaims it: from then on
``/latest/meta-data/spot/instance-action`` answers ``{"action": "terminate", "time": ...}``
instead of 404. Earlier, and not always, ``/latest/meta-data/events/recommendations/rebalance``
says the instance is at elevated risk. :class:`SpotWatcher` polls both every few seconds (IMDSv2:
a session token from ``PUT /latest/api/token`` on every request) and reports each new notice
once; the agent then asks the job to checkpoint at once (SIGUSR1, see ``CheckpointSync``).

Standard library only: the agent imports this at start-up, and a watcher that cannot reach the
service (not on EC2, a firewall) logs that once and keeps trying, without ever raising.

Settings, from the agent's environment:

``TRAINCTL_SPOT``
    ``1`` watches, ``0`` does not; unset: watch when the job spec says the instance is spot
    (``JobSpec.spot``, set by ``trainctl launch``).
``TRAINCTL_IMDS_ENDPOINT``
    the metadata service (default ``http://169.254.169.254``; tests use ``LocalIMDS``).
``TRAINCTL_SPOT_POLL_S``
    seconds between polls (default 5).

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from trainctl_lightning.timeutil import utc_now

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_POLL_S",
    "IMDS_ENDPOINT_ENV",
    "INSTANCE_ACTION_PATH",
    "INTERRUPTION",
    "REBALANCE",
    "REBALANCE_PATH",
    "SPOT_ENV",
    "SPOT_POLL_ENV",
    "TOKEN_TTL_S",
    "MetadataClient",
    "SpotNotice",
    "SpotWatcher",
    "handles_signal",
    "spot_watch_enabled",
]

log = logging.getLogger("trainctl_lightning.agent.spot")

SPOT_ENV = "TRAINCTL_SPOT"
IMDS_ENDPOINT_ENV = "TRAINCTL_IMDS_ENDPOINT"
SPOT_POLL_ENV = "TRAINCTL_SPOT_POLL_S"
DEFAULT_ENDPOINT = "http://169.254.169.254"
DEFAULT_POLL_S = 5.0
#: Seconds a session token lives; one is fetched again a minute before it expires.
TOKEN_TTL_S = 6 * 3600
INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
INTERRUPTION = "interruption"
REBALANCE = "rebalance"


@dataclass(frozen=True)
class SpotNotice:
    """One notice from the metadata service."""

    kind: str
    """``interruption`` (the instance will be reclaimed) or ``rebalance`` (it is at elevated risk)."""
    time: str | None
    """Interruption: when EC2 acts (UTC, ISO 8601); rebalance: when the recommendation was made."""
    action: str | None = None
    """Interruption: ``terminate``, ``stop`` or ``hibernate``."""
    seen_at: str = ""
    """UTC time the agent first saw the notice."""

    def seconds_left(self, now: datetime | None = None) -> float | None:
        """Seconds until an interruption's ``time`` (negative once passed); None when unknown."""
        if self.kind != INTERRUPTION or not self.time:
            return None
        try:
            when = datetime.fromisoformat(self.time.replace("Z", "+00:00"))
        except ValueError:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return (when - (now or datetime.now(timezone.utc))).total_seconds()

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def spot_watch_enabled(spec_spot: bool, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the agent should watch for notices: ``$TRAINCTL_SPOT`` if set, else the job spec."""
    value = environ.get(SPOT_ENV, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return spec_spot


class MetadataClient:
    """IMDSv2 GETs: fetches a session token, sends it with every request, renews it when needed.

    Args:
        endpoint: base URL of the service.
        timeout_s: per request; the service is on the instance itself, so it answers fast or not at all.
    """

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout_s: float = 1.0) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.timeout_s = timeout_s
        # never through an HTTP proxy from the environment: the service is link-local
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._token: str | None = None
        self._token_expires = 0.0

    def get(self, path: str) -> tuple[int, bytes]:
        """``(status, body)`` of a GET; 404 is an answer, not an error.

        Raises:
            OSError: the service cannot be reached, or refuses a fresh token.
            http.client.HTTPException: it answered with something that is not HTTP.
        """
        status, body = self._get(path, self._valid_token())
        if status == 401:  # the token expired or the service restarted: one retry with a new one
            self._token = None
            status, body = self._get(path, self._valid_token())
        return status, body

    def _valid_token(self) -> str:
        if self._token is None or time.monotonic() > self._token_expires - 60:
            request = urllib.request.Request(
                f"{self.endpoint}/latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)},
            )
            with self._opener.open(request, timeout=self.timeout_s) as response:
                self._token = response.read().decode().strip()
            self._token_expires = time.monotonic() + TOKEN_TTL_S
        return self._token

    def _get(self, path: str, token: str) -> tuple[int, bytes]:
        request = urllib.request.Request(f"{self.endpoint}{path}", headers={"X-aws-ec2-metadata-token": token})
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, b""


class SpotWatcher:
    """Polls the metadata service for spot notices and calls ``on_notice`` once per new notice.

    Args:
        on_notice: called on the watcher's thread with each :class:`SpotNotice` not seen before.
        endpoint: the metadata service (default: ``$TRAINCTL_IMDS_ENDPOINT``, else EC2's).
        interval_s: seconds between polls (default: ``$TRAINCTL_SPOT_POLL_S``, else 5).
        timeout_s: per request.

    Example::

        watcher = SpotWatcher(lambda notice: print(notice)).start()
        ...
        watcher.stop()
    """

    def __init__(
        self,
        on_notice: Callable[[SpotNotice], None],
        *,
        endpoint: str | None = None,
        interval_s: float | None = None,
        timeout_s: float = 1.0,
    ) -> None:
        self.on_notice = on_notice
        self.client = MetadataClient(endpoint or os.environ.get(IMDS_ENDPOINT_ENV) or DEFAULT_ENDPOINT, timeout_s)
        self.interval_s = interval_s if interval_s is not None else _env_float(SPOT_POLL_ENV, DEFAULT_POLL_S)
        self._seen: set[tuple[str, str | None, str | None]] = set()
        self._unreachable = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"SpotWatcher({self.client.endpoint!r}, every {self.interval_s:g}s)"

    def check(self) -> list[SpotNotice]:
        """One poll: the notices not reported before (each also passed to ``on_notice``). Never raises."""
        try:
            found = [n for n in (self._interruption(), self._rebalance()) if n is not None]
        except (OSError, http.client.HTTPException) as exc:  # URLError and timeouts are OSErrors
            if not self._unreachable:
                log.warning(
                    "cannot reach the instance metadata service at %s (%s): spot notices are not seen "
                    "until it answers; retrying every %gs",
                    self.client.endpoint,
                    " ".join(str(exc).split()),
                    self.interval_s,
                )
                self._unreachable = True
            return []
        if self._unreachable:
            log.info("the instance metadata service at %s answers again", self.client.endpoint)
            self._unreachable = False
        new = []
        for notice in found:
            key = (notice.kind, notice.action, notice.time)
            if key in self._seen:
                continue
            self._seen.add(key)
            new.append(notice)
            log.warning("spot %s notice: %s", notice.kind, notice.to_dict())
            try:
                self.on_notice(notice)
            except Exception:  # a bug in the callback must not end the watch
                log.exception("handling the spot notice failed")
        return new

    def start(self) -> SpotWatcher:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="agent-spot-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.client.timeout_s * 4 + 1)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._stop.wait(self.interval_s)

    def _interruption(self) -> SpotNotice | None:
        status, body = self.client.get(INSTANCE_ACTION_PATH)
        if status != 200:
            return None  # 404: no notice (the normal answer)
        try:
            data = json.loads(body)
        except ValueError:  # a 200 here is a notice even when its body is not what we expect
            data = {}
        return SpotNotice(INTERRUPTION, time=data.get("time"), action=data.get("action"), seen_at=utc_now())

    def _rebalance(self) -> SpotNotice | None:
        status, body = self.client.get(REBALANCE_PATH)
        if status != 200:
            return None
        try:
            when = json.loads(body).get("noticeTime")
        except ValueError:
            when = None
        return SpotNotice(REBALANCE, time=when, seen_at=utc_now())


def handles_signal(pid: int, signum: int) -> bool | None:
    """Whether process ``pid`` has a handler for ``signum`` (Linux: ``SigCgt`` in ``/proc``).

    None when that cannot be told (no ``/proc``, the process is gone). The agent sends SIGUSR1
    only to a job that handles it: its default action would kill the job.
    """
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        log.warning("$%s=%r is not a number of seconds; using %g", name, raw, default)
        return default
    return value if value > 0 else default
