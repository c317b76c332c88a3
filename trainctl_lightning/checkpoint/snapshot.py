"""Point-in-time host-memory copies of a checkpoint, taken on the training thread.

Saving in the background is only correct if the background thread sees the weights as they
were when ``save_checkpoint`` was called, not as the next optimizer step leaves them. So the
training thread copies every tensor's storage to host memory (pinned, for CUDA, with the copy
queued on the current stream so that later kernels on that stream cannot overwrite the source
first), and returns. Storages shared by several tensors (tied weights, views) are copied once
and the views rebuilt on the copy, so the file written later is what ``torch.save`` of the
original would have written.

Non-tensor values (ints, strings, hyperparameters) are shared with the original; Lightning
builds a fresh checkpoint dict for every save, so only objects a user mutates in place after
saving could differ.

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection

__all__ = ["Snapshot", "take_snapshot"]


@dataclass
class Snapshot:
    """A checkpoint whose tensors live in host memory, plus what the writer must wait for."""

    checkpoint: dict[str, Any]
    nbytes: int
    cuda_events: list[Any] = field(default_factory=list)

    def wait_ready(self) -> None:
        """Block until every queued device-to-host copy has landed (writer thread only)."""
        for event in self.cuda_events:
            event.synchronize()
        self.cuda_events.clear()


def take_snapshot(checkpoint: dict[str, Any]) -> Snapshot:
    """Copy every tensor in ``checkpoint`` to host memory, preserving storage sharing."""
    storages: dict[tuple[str, int], torch.UntypedStorage] = {}
    devices_with_copies: set[torch.device] = set()
    nbytes = 0

    def host_storage(t: torch.Tensor) -> torch.UntypedStorage:
        nonlocal nbytes
        src = t.untyped_storage()
        key = (str(t.device), src.data_ptr())
        cached = storages.get(key)
        if cached is not None and cached.nbytes() == src.nbytes():
            return cached
        if t.device.type == "cpu":
            dst = src.clone()
        else:
            pinned = t.device.type == "cuda"
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
    return Snapshot(checkpoint=copied, nbytes=nbytes, cuda_events=events)
