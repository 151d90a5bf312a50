"""Bytes this rank really holds for parameters, gradients and optimizer state (local shards under FSDP/TP)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (padding included: it is allocated memory too)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = _local(tensor).untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """{'parameters', 'gradients', 'optimizer'}: bytes held on this rank."""
    params = list(module.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    states = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return {
        "parameters": _storage_bytes(params),
        "gradients": _storage_bytes(grads),
        "optimizer": _storage_bytes(states),
    }
