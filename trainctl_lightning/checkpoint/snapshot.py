"""Point-in-time host-memory copies of a checkpoint, taken on the training thread.

Saving in the background is only correct if the background thread sees the weights as they
were when ``save_checkpoint`` was called, not as the next optimizer step leaves them. So the
training thread copies every tensor's storage to host memory (pinned, for CUDA, with the copy
queued on the current stream so that later kernels on that stream cannot overwrite the source
first), and returns. Storages shared by several tensors (tied weights, views) are copied once
and the views rebuilt on the copy, so the file written later is what ``torch.save`` of the
original would have written.

**Host memory is reused.** With a :class:`BufferPool`, the copies land in host buffers kept from
earlier snapshots (pinned ones when the state is on CUDA) instead of a fresh allocation of the whole
state per save: the writer gives a snapshot's buffers back to the pool (:meth:`Snapshot.release`)
once the file is written, and the next snapshot of the same tensors takes the same buffers again.
So the extra host memory is about one state size per snapshot in flight (``max_pending_snapshots``
of them at most) and does not grow with the number of saves; buffers that no longer fit the state
(a tensor that changed size) are dropped when the next snapshot is taken.

Non-tensor values (ints, strings, hyperparameters) are shared with the original; Lightning
builds a fresh checkpoint dict for every save, so only objects a user mutates in place after
saving could differ.

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection

__all__ = ["BufferPool", "Snapshot", "take_snapshot"]


class BufferPool:
    """Host byte buffers kept between snapshots, by (size, pinned).

    Args:
        keep_snapshots: how many snapshots' worth of free buffers may be kept beyond the one
            being taken (``max_pending_snapshots - 1``: the others are in use then).
    """

    def __init__(self, keep_snapshots: int = 0) -> None:
        self.keep_snapshots = keep_snapshots
        self._free: defaultdict[tuple[int, bool], list[torch.UntypedStorage]] = defaultdict(list)
        self._lock = threading.Lock()
        self.allocated = 0
        """Buffers this pool had to allocate (a reused one is not counted): tests and benchmarks read it."""

    def get(self, nbytes: int, pinned: bool) -> torch.UntypedStorage:
        with self._lock:
            free = self._free.get((nbytes, pinned))
            if free:
                return free.pop()
            self.allocated += 1
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned).untyped_storage()

    def put(self, buffers: list[torch.UntypedStorage], pinned: list[bool]) -> None:
        with self._lock:
            for buf, pin in zip(buffers, pinned):
                self._free[(buf.nbytes(), pin)].append(buf)

    def free_bytes(self) -> int:
        with self._lock:
            return sum(key[0] * len(bufs) for key, bufs in self._free.items())

    def trim(self, snapshot_bytes: int) -> None:
        """Drop free buffers beyond ``keep_snapshots`` snapshots of ``snapshot_bytes`` (largest first)."""
        limit = snapshot_bytes * self.keep_snapshots
        with self._lock:
            total = sum(key[0] * len(bufs) for key, bufs in self._free.items())
            for key in sorted(self._free, reverse=True):
                while total > limit and self._free[key]:
                    self._free[key].pop()
                    total -= key[0]
            for key in [k for k, bufs in self._free.items() if not bufs]:
                del self._free[key]


@dataclass
class Snapshot:
    """A checkpoint whose tensors live in host memory, plus what the writer must wait for."""

    checkpoint: dict[str, Any]
    nbytes: int
    cuda_events: list[Any] = field(default_factory=list)
    pool: BufferPool | None = None
    buffers: list[torch.UntypedStorage] = field(default_factory=list)
    pinned: list[bool] = field(default_factory=list)

    def release(self) -> None:
        """The file is written: give the buffers back to the pool (the checkpoint is dropped; writer thread only)."""
        self.checkpoint = {}
        buffers, self.buffers = self.buffers, []
        pinned, self.pinned = self.pinned, []
        try:
            self.wait_ready()  # a copy still landing in a buffer must not land in the next snapshot
        except BaseException:
            return  # the device failed: these buffers are dropped, never reused
        if self.pool is not None:
            self.pool.put(buffers, pinned)

    def wait_ready(self) -> None:
        """Block until every queued device-to-host copy has landed (writer thread only)."""
        for event in self.cuda_events:
            event.synchronize()
        self.cuda_events.clear()


def take_snapshot(checkpoint: dict[str, Any], pool: BufferPool | None = None) -> Snapshot:
    """Copy every tensor in ``checkpoint`` to host memory, preserving storage sharing.

    With ``pool``, the copies go to buffers taken from it (given back by :meth:`Snapshot.release`).
    """
    storages: dict[tuple[str, int], torch.UntypedStorage] = {}
    buffers: list[torch.UntypedStorage] = []
    pinned_flags: list[bool] = []
    devices_with_copies: set[torch.device] = set()
    nbytes = 0

    def host_storage(t: torch.Tensor) -> torch.UntypedStorage:
        nonlocal nbytes
        src = t.untyped_storage()
        key = (str(t.device), src.data_ptr())
        cached = storages.get(key)
        if cached is not None and cached.nbytes() == src.nbytes():
            return cached
        pinned = t.device.type == "cuda"
        if pool is not None:
            dst = pool.get(src.nbytes(), pinned)
            buffers.append(dst)
            pinned_flags.append(pinned)
            dst.copy_(src, non_blocking=pinned)
            if t.device.type != "cpu":
                devices_with_copies.add(t.device)
        elif t.device.type == "cpu":
            dst = src.clone()
        else:
            dst = torch.empty(src.nbytes(), dtype=torch.uint8, pin_memory=pinned).untyped_storage()
            dst.copy_(src, non_blocking=pinned)
            devices_with_copies.add(t.device)
        storages[key] = dst
        nbytes += src.nbytes()
        return dst

    def copy(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.is_sparse or t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
            # Rare layouts: a plain synchronous copy is correct, if slower.
            return t.to("cpu", copy=True)
        out = torch.empty(0, dtype=t.dtype)
        out.set_(host_storage(t), t.storage_offset(), t.size(), t.stride())
        return out

    copied = apply_to_collection(checkpoint, torch.Tensor, copy)
    events = []
    for device in devices_with_copies:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        events.append(event)
    if pool is not None:
        pool.trim(nbytes)
    return Snapshot(checkpoint=copied, nbytes=nbytes, cuda_events=events, pool=pool, buffers=buffers, pinned=pinned_flags)
