"""What a checkpoint captures (`TrainingState`), the random states of a process, and the local-shard view of a
state dict that node-local checkpoints save and load."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor


class Stateful(Protocol):
    """Anything with state_dict/load_state_dict (a sampler, a trainer's counters)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainingState:
    """Everything a checkpoint captures. `model` may be a list of modules (pipeline stages on this rank)."""

    model: nn.Module | list[nn.Module]
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: Stateful | None = None
    data: Stateful | None = None
    """this rank's data position, saved once per data-parallel rank"""
    extra: dict[str, Stateful] = field(default_factory=dict)
    """other global state, the same on every rank (e.g. the trainer's token counter)"""


def rng_state() -> dict[str, Any]:
    """This process's torch, numpy, Python (and CUDA) random states."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    state["python"] = random.getstate()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def local_shards(value: Any) -> Any:
    """`value` (a nested state dict) with every DTensor replaced by its local shard, a view of the same memory:
    what one rank saves, and loads in place, when no other rank can read its files."""
    if isinstance(value, DTensor):
        return value.to_local()
    if isinstance(value, dict):
        return {key: local_shards(item) for key, item in value.items()}
    if isinstance(value, list):
        return [local_shards(item) for item in value]
    return value


def take_loaded_values(target: Any, loaded: Any) -> None:
    """Copy into `target` the non-tensor values that DCP set in `loaded` (its `local_shards` view); tensors were
    loaded in place, through the views."""
    keys = target.keys() if isinstance(target, dict) else range(len(target))
    for key in keys:
        if isinstance(target[key], (dict, list)):
            take_loaded_values(target[key], loaded[key])
        elif not isinstance(target[key], torch.Tensor):
            target[key] = loaded[key]
