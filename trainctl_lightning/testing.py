"""A local S3 endpoint for tests, examples and benchmarks (needs the ``dev`` extra: moto).

:class:`LocalS3` runs moto's ``ThreadedMotoServer`` on 127.0.0.1 with an ephemeral port, the way
s3fs tests itself. Its state lives in this process, so :meth:`LocalS3.stop` followed by
:meth:`LocalS3.start` simulates an endpoint outage without losing a byte.

``python -m trainctl_lightning.testing serve`` runs the same server as a separate process and
prints its endpoint on the first line: benchmarks use it so that the server does not share a
Python interpreter (and its GIL) with the training loop it measures.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import urllib.request
from typing import Any

DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


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
