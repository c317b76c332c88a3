"""Retrying object-store calls: only for errors known to be transient, with capped backoff.

s3fs and botocore already retry a few times within a second or two; this layer rides out
longer trouble (an endpoint restarting, a throttling storm) for as long as the caller allows,
and gives up at once on errors that waiting cannot fix (missing bucket, access denied).
"""

from __future__ import annotations

import errno
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["RetryPolicy", "exception_chain", "is_transient"]

T = TypeVar("T")
log = logging.getLogger(__name__)

# Error codes S3 (and S3-compatible stores) return for conditions that clear by themselves.
_TRANSIENT_CODES = {
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
    "502",
    "504",
}
_TRANSIENT_ERRNOS = {
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EAGAIN,
}
# Exception class names from botocore/aiohttp/urllib3 that mean "the connection failed",
# matched by name so this module never imports a cloud SDK.
_TRANSIENT_NAMES = {
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ProxyConnectionError",
    "ResponseStreamingError",
    "IncompleteReadError",
    "ClientConnectorError",
    "ClientOSError",
    "ServerDisconnectedError",
    "ClientPayloadError",
    "ServerTimeoutError",
    "FSTimeoutError",
    "IncompleteRead",
    "ProtocolError",
}
# Never retried, whatever their type says.
_PERMANENT_NAMES = {"NoCredentialsError", "PartialCredentialsError", "NoRegionError", "ProfileNotFound"}


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception it was raised from or while handling, outermost first."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def is_transient(exc: BaseException) -> bool:
    """Whether waiting and trying again can fix ``exc``."""
    chain = exception_chain(exc)
    if any(type(e).__name__ in _PERMANENT_NAMES for e in chain):
        return False
    for e in chain:
        if isinstance(e, (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError)):
            return False
        if type(e).__name__ in _TRANSIENT_NAMES or isinstance(e, (ConnectionError, TimeoutError)):
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _TRANSIENT_CODES or (isinstance(status, int) and (status >= 500 or status == 429)):
                return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep retrying a transient failure.

    Args:
        deadline_s: give up once this many seconds have passed since the first attempt.
        initial_backoff_s: first wait; doubles each attempt (with jitter) up to ``max_backoff_s``.
        max_backoff_s: longest single wait.
    """

    deadline_s: float = 60.0
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 15.0

    def call(
        self,
        fn: Callable[[], T],
        *,
        what: str,
        stop: threading.Event | None = None,
        on_retry: Callable[[BaseException, float], None] | None = None,
    ) -> T:
        """Run ``fn`` until it succeeds, fails permanently, or the deadline passes.

        Args:
            fn: the call to make.
            what: short description for log lines, e.g. ``"upload s3://b/run/x.ckpt"``.
            stop: when set, stop retrying and raise the last error.
            on_retry: called with the error and the wait before each retry.

        Raises:
            The last error from ``fn`` when it is permanent or time is up.
        """
        start = time.monotonic()
        backoff = self.initial_backoff_s
        attempt = 1
        while True:
            try:
                return fn()
            except Exception as exc:
                elapsed = time.monotonic() - start
                if not is_transient(exc) or elapsed >= self.deadline_s or (stop is not None and stop.is_set()):
                    raise
                wait = min(backoff * (0.5 + random.random()), self.max_backoff_s, self.deadline_s - elapsed)
                log.warning(
                    "%s failed (attempt %d, %s: %s); retrying in %.1fs",
                    what,
                    attempt,
                    type(exc).__name__,
                    exc,
                    wait,
                )
                if on_retry is not None:
                    on_retry(exc, wait)
                if stop is not None:
                    if stop.wait(max(wait, 0.0)):
                        raise
                else:
                    time.sleep(max(wait, 0.0))
                backoff = min(backoff * 2, self.max_backoff_s)
                attempt += 1
