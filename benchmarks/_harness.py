"""What the benchmarks share: the local S3 server process, one fresh process per run, CPU and load readings.

Each benchmark runs every measured configuration in a fresh Python process (``--child SPEC``), so
that nothing one run leaves behind (threads, caches, allocator state) colours the next, and runs
moto's S3 server as a separate process, so that it does not share the training loop's GIL.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading
from typing import Any


class ServerError(RuntimeError):
    pass


def proc_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) used so far by process ``pid``; None where /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def start_server(env: dict[str, str], nice: int = 0, timeout: float = 60.0) -> tuple[subprocess.Popen[str], str]:
    """Start ``python -m trainctl_lightning.testing serve`` and return it with its endpoint."""
    prefix = ["nice", "-n", str(nice)] if nice and shutil.which("nice") else []
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "trainctl_lightning.testing", "serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    endpoint = line[0].strip() if line else ""
    if not endpoint.startswith("http"):
        stop_server(proc)
        raise ServerError(f"the local S3 server did not print its endpoint within {timeout:.0f}s (got {endpoint!r})")
    return proc, endpoint


def stop_server(proc: subprocess.Popen[str]) -> None:
    try:
        if proc.stdin is not None:
            proc.stdin.close()  # the server stops when its stdin closes
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


def run_child(
    script: str, label: str, spec: dict[str, Any], env: dict[str, str], log_path: str, timeout: float, verbose: bool
) -> dict[str, Any]:
    """Run ``script --child SPEC`` in a fresh process and return the JSON it wrote to ``spec["result"]``."""
    spec_path = spec["result"] + ".spec.json"
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    cmd = [sys.executable, os.path.abspath(script), "--child", spec_path]
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                cmd,
                env=env,
                stdout=None if verbose else log,
                stderr=None if verbose else subprocess.STDOUT,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"run {label!r} took longer than {timeout:.0f}s; killed") from None
    if proc.returncode != 0 or not os.path.exists(spec["result"]):
        tail = ""
        if not verbose:
            with open(log_path) as f:
                tail = "".join(f.readlines()[-40:])
        raise RuntimeError(f"run {label!r} failed (exit code {proc.returncode}):\n{tail}")
    with open(spec["result"]) as f:
        return json.load(f)


def load_child_spec(spec_path: str) -> dict[str, Any]:
    """In a child run: read its spec, and keep Lightning's hints and warnings out of its log."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")  # num_workers hints etc.
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    with open(spec_path) as f:
        return json.load(f)


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def round_or_none(x: float | None, nd: int = 4) -> float | None:
    """``x`` rounded, or None for a missing or non-finite figure (JSON has no NaN)."""
    if x is None or not math.isfinite(x):
        return None
    return round(x, nd)


# ---------------------------------------------------------------------------------------------
# A fast S3 endpoint for multi-GB objects: SeaweedFS (Go), installed by scripts/bench_s3.sh
# ---------------------------------------------------------------------------------------------

_WEED_PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "admin.port",
    "admin.port.grpc",
)


def _free_ports(n: int) -> list[int]:
    import socket

    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pdeathsig() -> Any:
    """A ``preexec_fn``: the server gets SIGKILL when the benchmark dies, so a killed run leaks no server."""
    import ctypes
    import ctypes.util
    import signal

    name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or name is None:
        return None
    prctl = ctypes.CDLL(name, use_errno=True).prctl

    def preexec() -> None:
        prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG

    return preexec


class WeedServer:
    """``weed mini`` on free loopback ports with its data in a temporary folder; ``stop()`` ends
    it and removes the folder (also on SIGKILL of the benchmark: PDEATHSIG, folder under /tmp)."""

    def __init__(self, weed: str, bucket: str, access_key: str, secret_key: str, timeout: float = 60.0) -> None:
        import tempfile
        import time

        import boto3

        self.dir = tempfile.mkdtemp(prefix="trainctl-weed-")
        ports: dict[str, int] = {}
        while not ports or any(p + 10000 > 65535 for p in ports.values()):  # some of its gRPC ports are port + 10000
            ports = dict(zip(_WEED_PORTS, _free_ports(len(_WEED_PORTS))))
        args = [
            weed,
            f"-logdir={self.dir}",
            "mini",
            f"-dir={self.dir}/data",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
        ]
        args += [f"-{k}={v}" for k, v in ports.items()]
        args += [
            "-webdav=false",
            f"-bucket={bucket}",
            "-master.volumeSizeLimitMB=1024",
            f"-filer.localSocket={self.dir}/f.sock",
            f"-s3.localSocket={self.dir}/s.sock",
        ]
        os.makedirs(f"{self.dir}/data")
        self._ports = set(ports.values()) | {p + 10000 for p in ports.values()}  # gRPC ports not set are port + 10000
        self.log = open(f"{self.dir}/weed.log", "w")  # closed by stop()
        # weed mini makes these its one user's credentials: the clients here use the same (moto's dummy ones)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
        self.proc = subprocess.Popen(
            args, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=_pdeathsig(), cwd=self.dir, env=env
        )
        self.pid = self.proc.pid
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        deadline = time.monotonic() + timeout
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
        )
        while True:
            try:
                client.head_bucket(Bucket=bucket)  # -bucket= creates it once the filer is up
                break
            except Exception as exc:  # not up yet (connection refused, 404 until the bucket exists)
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise ServerError(f"weed mini did not serve {self.endpoint}/{bucket} within {timeout:.0f}s: {exc}") from exc
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        # weed puts its gRPC sockets in the temp folder, named by port, and now and then leaves them
        import glob
        import re
        import tempfile

        for path in glob.glob(os.path.join(tempfile.gettempdir(), "seaweedfs-*-grpc-*.sock")):
            found = re.search(r"-grpc-(\d+)\.sock$", path)
            if found and int(found.group(1)) in self._ports:
                with contextlib.suppress(OSError):
                    os.unlink(path)


def find_weed() -> str | None:
    """The ``weed`` binary scripts/bench_s3.sh installed (or $TRAINCTL_BENCH_WEED), else None."""
    import glob

    given = os.environ.get("TRAINCTL_BENCH_WEED")
    if given:
        return given
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = sorted(glob.glob(os.path.join(here, ".bench", "seaweedfs-*", "bin", "weed")))
    return found[-1] if found else None


class ShapedLink:
    """The loopback traffic to and from one TCP port held to ``mb_s`` MB/s each way, with ``tc``
    (Linux, root or CAP_NET_ADMIN): a store whose network link, not this machine's CPU, is the
    limit, as for an instance uploading to a remote S3.

    An ``htb`` root on ``lo`` whose unclassified traffic goes straight through, as before; what goes
    to the port (``dport``) is sent through one class of that rate and what comes from it
    (``sport``) through another. ``close()`` removes the root again (also at exit of this process,
    and on SIGTERM where the caller turns that into ``sys.exit``).
    """

    def __init__(self, port: int, mb_s: float, dev: str = "lo") -> None:
        import atexit

        if not shutil.which("tc"):
            raise ServerError("--link-mb-s needs the `tc` command (iproute2); install it or leave the option out")
        self.dev = dev
        rate = f"{max(1, round(mb_s * 8))}mbit"
        shape = ["htb", "rate", rate, "burst", "1mb", "cburst", "1mb", "quantum", "200000"]
        steps = [["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb"]]  # default 0: unclassified goes direct
        for minor, match in ((10, "dport"), (20, "sport")):
            steps.append(["class", "add", "dev", dev, "parent", "1:", "classid", f"1:{minor}", *shape])
            steps.append(
                ["filter", "add", "dev", dev, "protocol", "ip", "parent", "1:0", "prio", "1", "u32"]
                + ["match", "ip", match, str(port), "0xffff", "flowid", f"1:{minor}"]
            )
        self._added = False
        for step in steps:
            out = subprocess.run(["tc", *step], capture_output=True, text=True)
            if out.returncode != 0:
                self.close()
                raise ServerError(
                    f"could not shape {dev} with tc ({' '.join(step[:2])}: {out.stderr.strip()}); "
                    "--link-mb-s needs root or CAP_NET_ADMIN, the htb qdisc and u32 filter, and no other root qdisc on the device"
                )
            self._added = True
        atexit.register(self.close)

    def close(self) -> None:
        if self._added:
            subprocess.run(["tc", "qdisc", "del", "dev", self.dev, "root"], capture_output=True)
            self._added = False
