"""A local S3 endpoint for tests, examples and benchmarks (needs the ``dev`` extra: moto).

:class:`LocalS3` runs moto's ``ThreadedMotoServer`` on 127.0.0.1 with an ephemeral port, the way
s3fs tests itself. Its state lives in this process, so :meth:`LocalS3.stop` followed by
:meth:`LocalS3.start` simulates an endpoint outage without losing a byte.

``python -m trainctl_lightning.testing serve`` runs the same server as a separate process and
prints its endpoint on the first line: benchmarks use it so that the server does not share a
Python interpreter (and its GIL) with the training loop it measures.

:class:`LocalIMDS` stands in for EC2's instance metadata service (IMDSv2) so that the agent's spot
interruption handling can be exercised on this machine.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["DUMMY_ENV", "LocalIMDS", "LocalS3"]

DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


_moto_writes_lock = threading.Lock()


def _serialize_moto_object_writes() -> None:
    """Make moto's conditional object writes atomic, as S3's are: a PUT or a multipart completion
    with ``If-None-Match``/``If-Match`` checks, then stores, in two steps, and moto's threaded
    server runs requests at once, so two create-only writes of one key could both succeed (seen
    once in CI). S3 guarantees one winner; our create-only writes rely on it. Only conditional
    writes take the lock: the others stay concurrent, as on S3. Idempotent; applies to every moto
    server in this process."""
    from moto.s3.responses import S3Response

    for name in ("put_object", "_key_response_post"):
        method = getattr(S3Response, name)
        if getattr(method, "_trainctl_serialized", False):
            continue

        def serialized(self: Any, *args: Any, _method: Any = method, **kwargs: Any) -> Any:
            headers = getattr(self, "headers", None) or {}
            if not (headers.get("If-None-Match") or headers.get("If-Match")):
                return _method(self, *args, **kwargs)
            with _moto_writes_lock:
                return _method(self, *args, **kwargs)

        serialized._trainctl_serialized = True  # type: ignore[attr-defined]
        setattr(S3Response, name, serialized)


class LocalS3:
    """moto's S3 (and EC2, IAM, SSM...) server on 127.0.0.1.

    Example::

        with LocalS3() as s3:
            s3.create_bucket("runs")
            store = RunStore("s3://runs/exp1", s3.storage_options())
    """

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._server: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalS3:
        from moto.server import ThreadedMotoServer

        _serialize_moto_object_writes()

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        deadline = time.monotonic() + 10
        while True:
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            try:
                server.start()
                break
            except OSError:  # the old socket of a restart on the same port is not free yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._server = server
        self.port = server.get_host_and_port()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def reset(self) -> None:
        """Forget every bucket and object (moto's reset API)."""
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).close()

    def env(self) -> dict[str, str]:
        """Environment for a process that should talk to this endpoint with dummy credentials."""
        return {**DUMMY_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def storage_options(self) -> dict[str, Any]:
        return {"client_kwargs": {"endpoint_url": self.endpoint}, "key": "testing", "secret": "testing"}

    def client(self, service: str = "s3") -> Any:
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def delete_bucket(self, name: str, attempts: int = 50) -> None:
        """Empty and delete a bucket, even while a writer keeps adding objects to it."""
        client = self.client()
        for attempt in range(attempts):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=name, Delete={"Objects": keys})
            try:
                client.delete_bucket(Bucket=name)
                return
            except client.exceptions.ClientError as exc:  # a writer added an object after the listing
                if "BucketNotEmpty" not in str(exc) or attempt == attempts - 1:
                    raise
                time.sleep(0.05)

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class LocalIMDS:
    """EC2's instance metadata service, IMDSv2 only, on 127.0.0.1 (what the agent's spot watcher reads).

    Like the real one: ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds``
    (1 to 21600) returns a token; every ``GET`` needs a live token in ``X-aws-ec2-metadata-token``
    (401 without). ``/latest/meta-data/spot/instance-action`` is 404 until :meth:`notice`, then
    ``{"action": ..., "time": ...}``; ``/latest/meta-data/events/recommendations/rebalance`` is 404
    until :meth:`rebalance`, then ``{"noticeTime": ...}``.

    Example::

        with LocalIMDS() as imds:
            env = {"TRAINCTL_IMDS_ENDPOINT": imds.endpoint, "TRAINCTL_SPOT": "1"}
            ...                                   # start the agent with env
            imds.notice(action="terminate", in_s=120)
    """

    TOKEN_PATH = "/latest/api/token"
    INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
    REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"

    def __init__(self, port: int = 0, instance_id: str = "i-0123456789abcdef0", local_ipv4: str = "10.0.0.1") -> None:
        self.port = port
        self.instance_id = instance_id
        self.local_ipv4 = local_ipv4
        self.tokens: dict[str, float] = {}
        """Token -> monotonic expiry of every token handed out."""
        self.requests: dict[str, int] = {}
        """Requests served per path (any status): how often it was polled."""
        self._instance_action: dict[str, str] | None = None
        self._rebalance: dict[str, str] | None = None
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalIMDS:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _imds_handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def notice(self, action: str = "terminate", in_s: float = 120.0) -> str:
        """Post a spot interruption notice: ``action`` happens ``in_s`` seconds from now; returns that time."""
        when = _aws_time(datetime.now(timezone.utc) + timedelta(seconds=in_s))
        with self._lock:
            self._instance_action = {"action": action, "time": when}
        return when

    def rebalance(self) -> str:
        """Post a rebalance recommendation; returns its notice time."""
        when = _aws_time(datetime.now(timezone.utc))
        with self._lock:
            self._rebalance = {"noticeTime": when}
        return when

    def clear(self) -> None:
        """Withdraw both notices."""
        with self._lock:
            self._instance_action = self._rebalance = None

    def _respond(self, method: str, path: str, headers: Any) -> tuple[int, str]:
        with self._lock:
            self.requests[path] = self.requests.get(path, 0) + 1
            if method == "PUT":
                if path != self.TOKEN_PATH:
                    return 405, ""
                try:
                    ttl = int(headers.get("X-aws-ec2-metadata-token-ttl-seconds", ""))
                except ValueError:
                    return 400, "missing or invalid X-aws-ec2-metadata-token-ttl-seconds"
                if not 1 <= ttl <= 21600:
                    return 400, "ttl must be 1 to 21600 seconds"
                token = secrets.token_urlsafe(24)
                self.tokens[token] = time.monotonic() + ttl
                return 200, token
            expiry = self.tokens.get(headers.get("X-aws-ec2-metadata-token", ""))
            if expiry is None or expiry < time.monotonic():
                return 401, ""
            if path == self.INSTANCE_ACTION_PATH:
                return (200, json.dumps(self._instance_action)) if self._instance_action else (404, "")
            if path == self.REBALANCE_PATH:
                return (200, json.dumps(self._rebalance)) if self._rebalance else (404, "")
            if path == "/latest/meta-data/instance-id":
                return 200, self.instance_id
            if path == "/latest/meta-data/local-ipv4":
                return 200, self.local_ipv4
            if path == "/latest/meta-data/instance-life-cycle":
                return 200, "spot"
            return 404, ""

    def __enter__(self) -> LocalIMDS:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _imds_handler(imds: LocalIMDS) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            status, body = imds._respond(self.command, self.path, self.headers)
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = _answer

        def log_message(self, format: str, *args: Any) -> None:  # quiet: tests poll every 100 ms
            pass

    return Handler


def _aws_time(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _serve() -> None:
    os.environ.update(DUMMY_ENV)
    server = LocalS3().start()
    print(server.endpoint, flush=True)
    try:
        sys.stdin.read()  # until the parent closes our stdin (or dies)
    finally:
        server.stop()


if __name__ == "__main__":
    if sys.argv[1:] != ["serve"]:
        sys.exit("usage: python -m trainctl_lightning.testing serve")
    _serve()
