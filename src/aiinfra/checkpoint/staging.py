"""Staging for asynchronous saves: a copy of the state in CPU buffers that are allocated once and then reused.

Allocating a fresh copy per save (DCP's default stager on a CPU-only build, where its cached variant needs pinned
memory and so an accelerator) costs more than the copy itself: page faults on gigabytes of new memory. The price of
reuse is one resident CPU copy of this rank's share of the checkpoint, as with torchtitan's async mode.

On CUDA the buffers are pinned (page-locked), as in DCP's own cached stager: the device-to-host copies then run at
the link's speed and are issued without waiting for each other; staging waits once for all of them at the end.
(Not exercised in this repository's CI, which has no GPU.)

Overlapped (`overlap=True`, DCP's "zero-overhead" staging): `stage` takes the structure and the small values at once
and returns a future, and the tensor copies run on a thread of their own while the training step computes its
forward and backward passes, which read the weights but change none of them; whoever changes the state next (the
optimizer step) first calls `wait_staged`. On two CPU cores the copy runs on the core the step leaves idle; on a
GPU it is the device-to-host copy that overlaps the compute.
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor


class ReusedBufferStager(AsyncStager):
    """Copies every tensor (the local shard of a DTensor) into a cached CPU buffer; deep-copies everything else.
    With `overlap`, the tensor copies run in the background (see the module's docstring)."""

    def __init__(self, overlap: bool = False) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._used: dict[str, torch.Tensor] = {}
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-staging") if overlap else None
        self._staging: Future | None = None

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any] | Future:
        """A training-safe copy of `state_dict`: later updates to the model do not reach it. Overlapped: a future
        of it, whose copies must finish (`wait_staged`) before the state changes."""
        self.wait_staged()
        self._used, self._copies = {}, []
        staged = self._stage(state_dict, "")
        self._buffers = self._used  # buffers of tensors that are gone (a changed model) are released
        copies, self._copies = self._copies, []
        if self._copier is None:
            _run_copies(copies)
            return staged
        self._staging = self._copier.submit(lambda: (_run_copies(copies), staged)[1])
        return self._staging

    def wait_staged(self) -> float:
        """Block until the copies of the last `stage` are done (re-raising their failure); seconds waited."""
        staging, self._staging = self._staging, None
        if staging is None or staging.done():
            if staging is not None:
                staging.result()
            return 0.0
        started = time.perf_counter()
        staging.result()
        return time.perf_counter() - started

    def _stage(self, value: Any, path: str) -> Any:
        if isinstance(value, DTensor):
            local = self._copy(value.to_local(), path)
            return DTensor.from_local(
                local, value.device_mesh, value.placements, run_check=False, shape=value.shape, stride=value.stride()
            )
        if isinstance(value, torch.Tensor):
            return self._copy(value, path)
        if isinstance(value, dict):
            return {key: self._stage(item, f"{path}/{key}") for key, item in value.items()}
        if isinstance(value, list):
            return [self._stage(item, f"{path}/{index}") for index, item in enumerate(value)]
        return copy.deepcopy(value)

    def _copy(self, tensor: torch.Tensor, path: str) -> torch.Tensor:
        pinned = tensor.is_cuda
        buffer = self._buffers.get(path)
        if (
            buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype
            or buffer.is_pinned() != pinned
        ):
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pinned)
        self._copies.append((buffer, tensor.detach()))
        self._used[path] = buffer
        return buffer

    def synchronize_staging(self) -> None:
        """Wait for the copies of an overlapped stage (DCP calls this for a stager that returns no future)."""
        self.wait_staged()

    def close(self) -> None:
        """Wait for copies in flight, then release the buffers."""
        try:
            self.wait_staged()
        finally:
            if self._copier is not None:
                self._copier.shutdown(wait=True)
            self._buffers, self._used = {}, {}


def _run_copies(copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy each source into its buffer; the device-to-host copies of CUDA tensors are issued without waiting for
    each other and waited for once at the end."""
    device_copies = False
    for buffer, source in copies:
        pinned = source.is_cuda
        buffer.copy_(source, non_blocking=pinned)
        device_copies |= pinned
    if device_copies:
        torch.cuda.synchronize()
