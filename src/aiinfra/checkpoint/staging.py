"""Staging for asynchronous saves: a copy of the state in CPU buffers that are allocated once and then reused.

Allocating a fresh copy per save (DCP's default stager on a CPU-only build, where its cached variant needs pinned
memory and so an accelerator) costs more than the copy itself: page faults on gigabytes of new memory. The price of
reuse is one resident CPU copy of this rank's share of the checkpoint, as with torchtitan's async mode.

On CUDA the buffers are pinned (page-locked), as in DCP's own cached stager: the device-to-host copies then run at
the link's speed and are issued without waiting for each other; staging waits once for all of them at the end.
(Not exercised in this repository's CI, which has no GPU.)
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor


class ReusedBufferStager(AsyncStager):
    """Copies every tensor (the local shard of a DTensor) into a cached CPU buffer; deep-copies everything else."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._used: dict[str, torch.Tensor] = {}
        self._device_copies = False

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A training-safe copy of `state_dict`: later updates to the model do not reach it."""
        self._used = {}
        self._device_copies = False
        staged = self._stage(state_dict, "")
        if self._device_copies:  # the non-blocking device-to-host copies must land before the writer reads them
            torch.cuda.synchronize()
        self._buffers = self._used  # buffers of tensors that are gone (a changed model) are released
        return staged

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
        buffer.copy_(tensor.detach(), non_blocking=pinned)
        self._device_copies |= pinned
        self._used[path] = buffer
        return buffer

    def synchronize_staging(self) -> None:
        """Nothing to wait for: stage() copies synchronously."""

    def close(self) -> None:
        """Release the buffers."""
        self._buffers, self._used = {}, {}
