#!/usr/bin/env python
"""How long does a checkpoint stall the training loop?

The same model and the same checkpoint schedule, run three ways (plus a run without
checkpoints as the reference):

``native_s3``
    Lightning's ``ModelCheckpoint(dirpath="s3://...")``: ``torch.save`` into memory, then an
    upload through fsspec/s3fs, all on the training thread.
``native_local``
    ``ModelCheckpoint(dirpath=<local dir>)``: ``torch.save`` to local disk on the training thread.
``sync_s3``
    ``ModelCheckpoint(dirpath=<local dir>)`` + ``CheckpointSync("s3://...")``: a host-memory
    snapshot on the training thread; writing and uploading happen in the background.

The S3 endpoint is moto's server, started as a separate process
(``python -m trainctl_lightning.testing serve``) so that it does not share an interpreter (and
its GIL) with the training loop. Each mode trains in its own fresh Python process.

Figures per mode (benchmarks/README.md has the details):

* **stall per checkpoint**: the gap between the end of training step *i* and the start of step
  *i+1* (where ``ModelCheckpoint(every_n_train_steps=K)`` saves) at a checkpointing step, minus
  the median gap at the other steps of the same run;
* **slowdown of the following steps**: the K steps after each checkpoint against the run's
  median step, summed: what work left running by the checkpoint (background threads, the local
  S3 server) costs the training loop;
* **excess per checkpoint**: (training-loop wall time - the no-checkpoint runs') / number of
  checkpoints, the same cost measured against separate runs (so it also carries their drift);
* **CPU per checkpoint** of the training process and of the S3 server.

The end-of-fit time (end of the last step to ``trainer.fit`` returning, where ``CheckpointSync``
waits for uploads still in flight) is reported on its own and counted in neither.

Output: human-readable lines, then one JSON line (the last line) with the medians and ratios.
Exit code 0 whether or not the targets are met; non-zero only when the benchmark itself fails
(including when a mode did not produce every checkpoint it should have).

Usage::

    .venv/bin/python benchmarks/checkpoint_stall.py            # 200 MB checkpoint, 6 per mode
    .venv/bin/python benchmarks/checkpoint_stall.py --quick    # tiny smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

BUCKET = "trainctl-bench"
MODES = ("native_s3", "native_local", "sync_s3")
ALL_RUNS = ("baseline",) + MODES
LABELS = {
    "baseline": "no checkpoints",
    "native_s3": "ModelCheckpoint -> s3:// (native)",
    "native_local": "ModelCheckpoint -> local disk (native)",
    "sync_s3": "ModelCheckpoint -> local disk + CheckpointSync -> s3://",
}
# Steps timed (after warm-up) to pick the checkpoint interval in steps. Their lower quartile is
# used: other processes on the machine only ever make steps slower.
CALIBRATION_STEPS = 20
CALIBRATION_WARMUP = 3
TARGET_S3_RATIO = 8.0


# =============================================================================================
# Child process: one training run
# =============================================================================================


from _harness import load_child_spec, run_child, start_server
from _harness import loadavg as _loadavg
from _harness import proc_cpu_s as _proc_cpu_s
from _harness import round_or_none as _round
from _harness import stop_server as _stop_server


def _run_child(spec: dict[str, Any], env: dict[str, str], log_path: str, timeout: float, verbose: bool) -> dict[str, Any]:
    return run_child(__file__, spec["mode"], spec, env, log_path, timeout, verbose)


def _child(spec_path: str) -> None:
    spec = load_child_spec(spec_path)

    import torch
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    class BigModel(LightningModule):
        """``layers`` square bias-free linear layers; plain SGD, so the checkpoint is ~ the weights."""

        def __init__(self, width: int, layers: int, batch_size: int, samples: int) -> None:
            super().__init__()
            self.width, self.batch_size, self.samples = width, batch_size, samples
            mods: list[torch.nn.Module] = []
            for i in range(layers):
                mods.append(torch.nn.Linear(width, width, bias=False))
                if i < layers - 1:
                    mods.append(torch.nn.Tanh())
            self.net = torch.nn.Sequential(*mods)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            (x,) = batch
            loss = self.net(x).pow(2).mean()
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

        def train_dataloader(self) -> DataLoader:
            g = torch.Generator().manual_seed(0)
            data = torch.randn(self.samples, self.width, generator=g)
            return DataLoader(TensorDataset(data), batch_size=self.batch_size, shuffle=False)

    class LoopTimer(Callback):
        """Wall-clock time of every training step and of every gap between two steps."""

        def __init__(self) -> None:
            self.starts: list[float] = []
            self.ends: list[float] = []
            self.end_steps: list[int] = []  # trainer.global_step at each batch end
            self.save_calls: list[float] = []  # seconds inside trainer.save_checkpoint

        def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
            inner = trainer.save_checkpoint

            def timed_save(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return inner(*args, **kwargs)
                finally:
                    self.save_calls.append(time.perf_counter() - t0)

            trainer.save_checkpoint = timed_save  # type: ignore[method-assign]

        def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
            self.cpu_at_start = (time.process_time(), _proc_cpu_s(spec["server_pid"]))

        def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
            # Lightning runs ModelCheckpoint's on_train_batch_end after ours (checkpoint
            # callbacks are moved last), so its save falls in the gap that follows.
            self.ends.append(time.perf_counter())
            self.end_steps.append(trainer.global_step)

    width, layers = spec["width"], spec["layers"]
    batch_size = spec["batch_size"]
    mode = spec["mode"]
    workdir = spec["workdir"]
    os.makedirs(workdir, exist_ok=True)

    def make_trainer(steps: int, callbacks: list[Callback], checkpointing: bool) -> Trainer:
        return Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=1,
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

    def fit(steps: int, callbacks: list[Callback], checkpointing: bool) -> tuple[LoopTimer, float]:
        torch.manual_seed(0)
        model = BigModel(width, layers, batch_size, samples=steps * batch_size)
        timer = LoopTimer()
        trainer = make_trainer(steps, [timer, *callbacks], checkpointing)
        trainer.fit(model)
        returned = time.perf_counter()
        own, server = time.process_time(), _proc_cpu_s(spec["server_pid"])
        timer.cpu_s = own - timer.cpu_at_start[0]
        timer.server_cpu_s = None if server is None or timer.cpu_at_start[1] is None else server - timer.cpu_at_start[1]
        if len(timer.ends) != steps:
            raise RuntimeError(f"{mode}: expected {steps} training steps, timed {len(timer.ends)}")
        return timer, returned

    result: dict[str, Any] = {"mode": mode, "torch_threads": torch.get_num_threads()}
    params = width * width * layers
    result["params"] = params

    every_n = spec.get("every_n_steps")
    if mode == "baseline" and every_n is None:
        timer, _ = fit(CALIBRATION_STEPS, [], checkpointing=False)
        iters = [b - a for a, b in zip(timer.starts[CALIBRATION_WARMUP:], timer.starts[CALIBRATION_WARMUP + 1 :])]
        iter_s = statistics.quantiles(iters, n=4)[0]
        every_n = max(2, round(spec["interval_s"] / iter_s))
        result["calibration_iter_s"] = iter_s
    result["every_n_steps"] = every_n
    n_ckpt = spec["checkpoints"]
    # K steps, checkpoint, ... N times, then K-1 more steps: the last checkpoint's background
    # work overlaps training like the others did, and no checkpoint lands on the final step.
    steps = n_ckpt * every_n + every_n - 1
    result["steps"] = steps
    ckpt_steps = {every_n * i for i in range(1, n_ckpt + 1)}

    callbacks: list[Callback] = []
    sync = None
    dirpath = None
    if mode != "baseline":
        if mode == "native_s3":
            dirpath = f"s3://{BUCKET}/{spec['prefix']}/native"
        else:
            dirpath = os.path.join(workdir, "ckpts")
        callbacks.append(ModelCheckpoint(dirpath=dirpath, every_n_train_steps=every_n, save_top_k=-1, save_last=False))
        if mode == "sync_s3":
            from trainctl_lightning import CheckpointSync

            sync = CheckpointSync(
                f"s3://{BUCKET}/{spec['prefix']}/run",
                storage_options={"client_kwargs": {"endpoint_url": spec["endpoint"]}},
            )
            callbacks.append(sync)

    started = time.perf_counter()
    timer, returned = fit(steps, callbacks, checkpointing=mode != "baseline")
    result["fit_total_s"] = returned - started

    gaps = [(timer.end_steps[i], timer.starts[i + 1] - timer.ends[i]) for i in range(steps - 1)]
    ckpt_gaps = [g for s, g in gaps if s in ckpt_steps]
    plain_gaps = [g for s, g in gaps if s not in ckpt_steps]
    base_gap = statistics.median(plain_gaps)
    result["median_plain_gap_s"] = base_gap
    result["median_step_s"] = statistics.median(b - a for a, b in zip(timer.starts, timer.ends))
    result["loop_s"] = timer.ends[-1] - timer.starts[0]
    result["end_of_fit_s"] = returned - timer.ends[-1]
    result["save_call_s"] = timer.save_calls
    result["cpu_s"] = timer.cpu_s  # this process, all threads, start of training to fit returning
    result["server_cpu_s"] = timer.server_cpu_s  # the local S3 server over the same span
    result["step_s"] = [b - a for a, b in zip(timer.starts, timer.ends)]  # raw timings, for --raw-out
    result["gap_s"] = [g for _, g in gaps]
    if mode != "baseline":
        if len(ckpt_gaps) != n_ckpt or len(timer.save_calls) != n_ckpt:
            raise RuntimeError(
                f"{mode}: expected {n_ckpt} checkpoints, saw {len(ckpt_gaps)} checkpoint steps and "
                f"{len(timer.save_calls)} save calls"
            )
        result["stalls_s"] = [g - base_gap for g in ckpt_gaps]
        # Work a checkpoint leaves running (background threads, the S3 server) slows the steps
        # that follow it: the K steps after checkpoint j, each compared with the run's median step.
        step_s = [b - a for a, b in zip(timer.starts, timer.ends)]
        median_step = statistics.median(step_s)
        slowdowns = []
        for j in sorted(ckpt_steps):  # the step ending at global_step j has index j - 1
            window = step_s[j : j + every_n]
            slowdowns.append(sum(x - median_step for x in window))
        result["slowdowns_s"] = slowdowns

    # ------------------------------------------------ did the checkpoints really get written?
    if mode == "native_local":
        files = sorted(f for f in os.listdir(dirpath) if f.endswith(".ckpt"))
        sizes = [os.path.getsize(os.path.join(dirpath, f)) for f in files]
        if len(files) != n_ckpt:
            raise RuntimeError(f"native_local: expected {n_ckpt} checkpoint files in {dirpath}, found {files}")
        result["checkpoint_bytes"] = sizes
        result["where"] = dirpath
    elif mode == "native_s3":
        import fsspec

        fs, root = fsspec.core.url_to_fs(dirpath)  # endpoint from $AWS_ENDPOINT_URL
        fs.invalidate_cache()
        objects = [o for o in fs.ls(root, detail=True) if o["name"].endswith(".ckpt")]
        if len(objects) != n_ckpt:
            raise RuntimeError(f"native_s3: expected {n_ckpt} objects in {dirpath}, found {len(objects)}")
        result["checkpoint_bytes"] = sorted(int(o["size"]) for o in objects)
        result["where"] = dirpath
    elif mode == "sync_s3":
        from trainctl_lightning.store import RunStore

        assert sync is not None and dirpath is not None
        flush = sync.last_flush
        if flush is None or not flush.ok or len(flush.published) != n_ckpt:
            raise RuntimeError(f"sync_s3: end-of-fit flush did not publish {n_ckpt} checkpoints: {flush!r}")
        io = getattr(sync, "_io", None)  # the plugin CheckpointSync installed; for its back-pressure counter
        result["snapshot_wait_s"] = getattr(io, "snapshot_wait_s", None)
        store = RunStore(sync.url, sync.storage_options)
        manifests = store.list_checkpoints()
        if len(manifests) != n_ckpt:
            raise RuntimeError(f"sync_s3: expected {n_ckpt} checkpoints in {sync.url}, the store lists {len(manifests)}")
        local = sorted(f for f in os.listdir(dirpath) if f.endswith(".ckpt"))
        if len(local) != n_ckpt:
            raise RuntimeError(f"sync_s3: expected {n_ckpt} local checkpoint files in {dirpath}, found {local}")
        t0 = time.perf_counter()
        store.verify_checkpoint(manifests[-1])  # reads it back and checks size + sha256
        result["verify_s"] = time.perf_counter() - t0
        newest = manifests[-1]
        local_newest = os.path.join(dirpath, newest.name)
        if newest.files[0].size != os.path.getsize(local_newest):
            raise RuntimeError(
                f"sync_s3: {newest.id} has {newest.files[0].size} bytes in the store, {local_newest} has "
                f"{os.path.getsize(local_newest)}"
            )
        result["checkpoint_bytes"] = sorted(m.files[0].size for m in manifests)
        result["store_checkpoints"] = [m.id for m in manifests]
        result["verified"] = newest.id
        result["where"] = sync.url

    if mode != "baseline":
        too_small = [b for b in result["checkpoint_bytes"] if b < params * 4]
        if too_small:
            raise RuntimeError(f"{mode}: checkpoint(s) of {too_small} bytes cannot hold {params * 4} bytes of weights")

    with open(spec["result"], "w") as f:
        json.dump(result, f)


# =============================================================================================
# Parent process: server, runs, report
# =============================================================================================


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _fmt(values: list[float]) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def _ratio(a: float, b: float) -> float | None:
    return a / b if a > 0 and b > 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=None, help="checkpoint size to aim for, in MB (10^6 bytes); default 200")
    parser.add_argument("--checkpoints", type=int, default=None, help="checkpoints per mode (default 6)")
    parser.add_argument(
        "--interval-s",
        type=float,
        default=None,
        help="aim for a checkpoint every this many seconds of training; the step count K is calibrated "
        "once on the no-checkpoint run and then used by every mode (default 5)",
    )
    parser.add_argument("--every-n-steps", type=int, default=None, help="fix K instead of calibrating it")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4, help="square linear layers in the model (default 4)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 8 MB, 2 checkpoints, 0.3s interval unless given; figures mean nothing"
    )
    parser.add_argument("--workdir", default=None, help="parent folder for the temporary local checkpoint folder")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per run (default 900)")
    parser.add_argument(
        "--server-nice",
        type=int,
        default=0,
        help="run the local S3 server at this nice level (e.g. 19) so that its CPU work competes less with "
        "training, as a remote endpoint's would not (uploads then lag behind training); default 0",
    )
    parser.add_argument("--verbose", action="store_true", help="show the training runs' own output")
    parser.add_argument(
        "--raw-out", default=None, help="also write every run's raw timings (each step and gap) to this JSON file"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        _child(args.child)
        return 0

    args.load_start = _loadavg()
    defaults = {"size_mb": 8.0, "checkpoints": 2, "interval_s": 0.3} if args.quick else {}
    for key, value in {"size_mb": 200.0, "checkpoints": 6, "interval_s": 5.0, **defaults}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown or not modes:
        parser.error(f"--modes: unknown {sorted(unknown)}; choose from {', '.join(MODES)}")
    if args.checkpoints < 1 or args.size_mb <= 0 or args.layers < 1 or args.batch_size < 1:
        parser.error("--checkpoints, --size-mb, --layers and --batch-size must be positive")
    if args.every_n_steps is not None and args.every_n_steps < 2:
        parser.error("--every-n-steps must be >= 2")
    width = max(8, round(math.sqrt(args.size_mb * 1e6 / 4 / args.layers)))

    from trainctl_lightning.testing import DUMMY_ENV

    env = dict(os.environ)
    env.pop("TRAINCTL_RUN_URL", None)
    env.update(DUMMY_ENV)
    env.update(
        {
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,  # never read a real AWS config
            "AWS_CONFIG_FILE": os.devnull,
            "PYTHONUNBUFFERED": "1",
        }
    )

    results: dict[str, dict[str, Any]] = {}
    server = None
    with tempfile.TemporaryDirectory(prefix="checkpoint-stall-", dir=args.workdir) as tmp:
        try:
            server, endpoint = start_server(env, args.server_nice)
            env["AWS_ENDPOINT_URL"] = endpoint  # botocore (and so s3fs) honours it: native s3:// goes there
            import boto3

            boto3.client(
                "s3",
                endpoint_url=endpoint,
                region_name="us-east-1",
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
            ).create_bucket(Bucket=BUCKET)
            header = (
                f"checkpoint_stall: {args.layers} x Linear({width}, {width}) = {args.layers * width * width / 1e6:.1f}M "
                f"float32 params, plain SGD, batch {args.batch_size}; {args.checkpoints} checkpoints per mode; "
                f"local S3 (moto, separate process, nice {args.server_nice}) at {endpoint}"
            )
            every_n = args.every_n_steps
            # The no-checkpoint run goes first (it calibrates K) and again last: their difference
            # shows how much the machine's speed drifted meanwhile.
            for run in ("baseline", *modes, "baseline_end"):
                mode = "baseline" if run == "baseline_end" else run
                print(f"checkpoint_stall: running {run} ...", file=sys.stderr, flush=True)
                spec = {
                    "mode": mode,
                    "width": width,
                    "layers": args.layers,
                    "batch_size": args.batch_size,
                    "checkpoints": args.checkpoints,
                    "every_n_steps": every_n,
                    "interval_s": args.interval_s,
                    "endpoint": endpoint,
                    "server_pid": server.pid,
                    "prefix": f"bench/{run}",
                    "workdir": os.path.join(tmp, run),
                    "result": os.path.join(tmp, f"{run}.result.json"),
                }
                os.sync()  # earlier runs' dirty pages are not this run's disk traffic
                results[run] = _run_child(spec, env, os.path.join(tmp, f"{run}.log"), args.timeout, args.verbose)
                shutil.rmtree(spec["workdir"], ignore_errors=True)
                every_n = results["baseline"]["every_n_steps"]
        finally:
            if server is not None:
                _stop_server(server)

    base = _combined_baseline(results["baseline"], results["baseline_end"])
    print(header)
    first = results["baseline"]
    print(
        f"schedule: ModelCheckpoint(every_n_train_steps={every_n}, save_top_k=-1), {first['steps']} steps per run, "
        f"a checkpoint every ~{every_n * (first['median_step_s'] + first['median_plain_gap_s']):.1f}s of training"
        + (f" (aimed at {args.interval_s:g}s)" if args.every_n_steps is None else "")
        + "; "
        f"torch threads {first['torch_threads']}, CPUs {os.cpu_count()}, load average at start "
        + (f"{args.load_start:.2f}" if args.load_start is not None else "n/a")
    )
    for run in ("baseline", "baseline_end", *modes):
        _print_run(run, results[run], base, args.checkpoints)
    summary = _summary(results, base, modes, args)
    if args.raw_out:
        with open(args.raw_out, "w") as f:
            json.dump({"summary": summary, "runs": results}, f)
    _print_summary(summary)
    print(json.dumps(summary, sort_keys=False))
    return 0


def _plus(r: dict[str, Any]) -> list[float]:
    return [a + b for a, b in zip(r["stalls_s"], r["slowdowns_s"])]


def _combined_baseline(first: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    """The two no-checkpoint runs, averaged."""
    return {
        key: (first[key] + last[key]) / 2 for key in ("loop_s", "cpu_s", "median_step_s", "median_plain_gap_s", "end_of_fit_s")
    } | {"drift_s": last["loop_s"] - first["loop_s"]}


def _cpu_per_ckpt(r: dict[str, Any], base: dict[str, Any], n: int) -> tuple[float, float | None]:
    server = r.get("server_cpu_s")
    return (r["cpu_s"] - base["cpu_s"]) / n, (None if server is None else server / n)


def _excess_per_ckpt(r: dict[str, Any], base: dict[str, Any], n: int) -> float:
    return (r["loop_s"] - base["loop_s"]) / n


def _print_run(mode: str, r: dict[str, Any], base: dict[str, Any], n: int) -> None:
    name = f"[{mode}]"
    if mode.startswith("baseline"):
        label = LABELS["baseline"] + (" (again, last)" if mode == "baseline_end" else " (first)")
        print(
            f"{name:15} {label}: step {r['median_step_s']:.3f}s (median), gap between steps "
            f"{r['median_plain_gap_s'] * 1000:.1f}ms, training loop {r['loop_s']:.2f}s, CPU {r['cpu_s']:.1f}s"
            + (
                f"; drift between the two: {base['drift_s']:+.2f}s = {base['drift_s'] / n:+.3f}s per checkpoint"
                if mode == "baseline_end"
                else ""
            ),
            flush=True,
        )
        return
    pad = " " * 16
    lines = [
        f"{name:15} {LABELS[mode]}",
        f"stall per checkpoint (s): {_fmt(r['stalls_s'])}  -> median {_median(r['stalls_s']):.3f}s",
        f"inside trainer.save_checkpoint (s): {_fmt(r['save_call_s'])}  -> median {_median(r['save_call_s']):.3f}s",
        f"slowdown of the {r['every_n_steps']} steps after each checkpoint (s): {_fmt(r['slowdowns_s'])}  -> median "
        f"{_median(r['slowdowns_s']):.3f}s; stall + slowdown: median {_median(_plus(r)):.3f}s",
        f"training loop {r['loop_s']:.2f}s (no-checkpoint runs {base['loop_s']:.2f}s) -> excess "
        f"{_excess_per_ckpt(r, base, n):.3f}s per checkpoint; median step {r['median_step_s']:.3f}s "
        f"(no-checkpoint runs {base['median_step_s']:.3f}s)",
    ]
    proc_cpu, server_cpu = _cpu_per_ckpt(r, base, n)
    lines.append(
        f"CPU per checkpoint (start of training to fit returning, minus the no-checkpoint runs): training "
        f"process {proc_cpu:.2f}s, local S3 server " + (f"{server_cpu:.2f}s" if server_cpu is not None else "n/a")
    )
    end = f"end of fit {r['end_of_fit_s']:.2f}s"
    if mode == "sync_s3":
        end += (
            f" (waiting for uploads still in flight); saves waited {r['snapshot_wait_s'] or 0:.2f}s in all "
            "for a free snapshot slot"
        )
    lines.append(end)
    sizes = r["checkpoint_bytes"]
    where = f"{len(sizes)} checkpoints of {statistics.median(sizes) / 1e6:.1f} MB in {r['where']}"
    if mode == "sync_s3":
        where += f"; newest ({r['verified']}) read back and verified in {r['verify_s']:.1f}s"
    lines.append(where)
    print(lines[0] + "\n" + "\n".join(pad + line for line in lines[1:]), flush=True)


def _summary(
    results: dict[str, dict[str, Any]], base: dict[str, Any], modes: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    first = results["baseline"]
    n = args.checkpoints
    med = {m: _median(results[m]["stalls_s"]) for m in modes}
    excess = {m: _excess_per_ckpt(results[m], base, n) for m in modes}
    sizes = [s for m in modes for s in results[m]["checkpoint_bytes"]]
    out: dict[str, Any] = {
        "benchmark": "checkpoint_stall",
        "checkpoint_mb": _round(statistics.median(sizes) / 1e6, 2) if sizes else None,
        "checkpoints_per_mode": n,
        "every_n_train_steps": first["every_n_steps"],
        "steps_per_run": first["steps"],
        "params": first["params"],
        "cpus": os.cpu_count(),
        "torch_threads": first["torch_threads"],
        "baseline": {
            "median_step_s": _round(base["median_step_s"]),
            "median_gap_s": _round(base["median_plain_gap_s"]),
            "loop_s": [_round(results[r]["loop_s"], 3) for r in ("baseline", "baseline_end")],
            "drift_per_ckpt_s": _round(base["drift_s"] / n),
            "end_of_fit_s": _round(base["end_of_fit_s"], 3),
        },
        "stalls_s": {m: [_round(s) for s in results[m]["stalls_s"]] for m in modes},
        "median_stall_s": {m: _round(med[m]) for m in modes},
        "median_save_call_s": {m: _round(_median(results[m]["save_call_s"])) for m in modes},
        "median_slowdown_after_ckpt_s": {m: _round(_median(results[m]["slowdowns_s"])) for m in modes},
        "median_stall_plus_slowdown_s": {m: _round(_median(_plus(results[m]))) for m in modes},
        "excess_per_ckpt_s": {m: _round(excess[m]) for m in modes},
        "median_step_s": {m: _round(results[m]["median_step_s"]) for m in modes},
        "end_of_fit_s": {m: _round(results[m]["end_of_fit_s"], 3) for m in modes},
        "cpu_per_ckpt_s": {
            m: dict(zip(("training_process", "s3_server"), map(_round, _cpu_per_ckpt(results[m], base, n)))) for m in modes
        },
        "server_nice": args.server_nice,
        "load_avg_1m": {"start": _round(args.load_start, 2), "end": _round(_loadavg(), 2)},
    }
    if "sync_s3" in modes:
        sync = results["sync_s3"]
        out["sync_s3_snapshot_wait_s"] = _round(sync.get("snapshot_wait_s") or 0.0, 3)
        out["sync_s3_store_checkpoints"] = len(sync["store_checkpoints"])
        out["sync_s3_newest_verified"] = True
        s = med["sync_s3"]
        targets: dict[str, bool] = {}
        if "native_s3" in modes:
            out["ratio_native_s3_over_sync"] = _round(_ratio(med["native_s3"], s), 2)
            out["excess_ratio_native_s3_over_sync"] = _round(_ratio(excess["native_s3"], excess["sync_s3"]), 2)
            targets["sync_8x_lower_than_native_s3"] = bool(s * TARGET_S3_RATIO <= med["native_s3"])
        if "native_local" in modes:
            out["ratio_native_local_over_sync"] = _round(_ratio(med["native_local"], s), 2)
            out["excess_ratio_native_local_over_sync"] = _round(_ratio(excess["native_local"], excess["sync_s3"]), 2)
            targets["sync_below_native_local"] = bool(s < med["native_local"])
        out["targets"] = targets
    return out


def _print_summary(summary: dict[str, Any]) -> None:
    def x(ratio: float | None) -> str:
        return f"{ratio:.2f}x" if ratio is not None else "n/a (a figure is <= 0)"

    print(f"checkpoint size: {summary['checkpoint_mb']} MB (measured from the saved files)")
    med = summary["median_stall_s"]
    exc = summary["excess_per_ckpt_s"]
    print("median stall per checkpoint: " + ", ".join(f"{m} {v:.3f}s" for m, v in med.items() if v is not None))
    plus = summary["median_stall_plus_slowdown_s"]
    print(
        "median stall + slowdown of the following steps per checkpoint: "
        + ", ".join(f"{m} {v:.3f}s" for m, v in plus.items() if v is not None)
    )
    print(
        "excess wall time per checkpoint: "
        + ", ".join(f"{m} {v:.3f}s" for m, v in exc.items() if v is not None)
        + f" (drift between the no-checkpoint runs: {summary['baseline']['drift_per_ckpt_s']:+.3f}s)"
    )
    server = (summary["cpu_per_ckpt_s"].get("sync_s3") or {}).get("s3_server")
    if server and summary["server_nice"] == 0:
        print(
            f"note: the local S3 server used {server:.2f}s of CPU per sync_s3 checkpoint on the cores training "
            "uses (a remote S3 endpoint would not); --server-nice 19 lowers its priority (uploads then lag "
            "behind training and finish at the end of fit)"
        )
    targets = summary.get("targets", {})
    if "ratio_native_s3_over_sync" in summary:
        ok = targets.get("sync_8x_lower_than_native_s3")
        print(
            f"native_s3 / sync_s3 stall: {x(summary['ratio_native_s3_over_sync'])} (target >= {TARGET_S3_RATIO:g}x: "
            f"{'met' if ok else 'MISSED'}); by excess wall time: {x(summary['excess_ratio_native_s3_over_sync'])}"
        )
    if "ratio_native_local_over_sync" in summary:
        ok = targets.get("sync_below_native_local")
        print(
            f"native_local / sync_s3 stall: {x(summary['ratio_native_local_over_sync'])} (target > 1x: "
            f"{'met' if ok else 'MISSED'}); by excess wall time: {x(summary['excess_ratio_native_local_over_sync'])}"
        )


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # a failed benchmark says why in one place, and exits non-zero
        print(f"checkpoint_stall: error: {exc}", file=sys.stderr)
        sys.exit(1)
