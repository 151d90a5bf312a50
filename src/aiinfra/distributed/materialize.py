"""Meta-device models made real: each rank allocates only its shards and fills them with the full model's values.

The model is built on the meta device (shapes, no memory) and parallelized there (TP, checkpointing, compile,
FSDP); then `materialize` allocates each parameter's local shard and copies into it the matching slice of that
parameter's initial values. Every parameter is drawn from a generator of its own (`models.initial_values`), so the
full model is bitwise the same for one seed on one process, under FSDP, TP or a pipeline. One full parameter at a
time is drawn, never the whole model: the largest single parameter (the embedding) is the only transient.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from aiinfra.models import Transformer, initial_values


def is_meta(model: nn.Module) -> bool:
    """True when the module's parameters live on the meta device (built but never allocated)."""
    return any(param.is_meta for param in model.parameters())


@torch.no_grad()
def materialize(model: Transformer, device: torch.device, seed: int) -> None:
    """Allocate this rank's shards of a meta-device `model` on `device` and initialise them for `seed`."""
    rules = model.init_rules()
    aliases = _aliases(model)
    model.to_empty(device=device)
    # to_empty gives every module a Parameter of its own: tie the aliases (tied embeddings) to one again.
    for canonical, alias in aliases:
        owner, _, attr = alias.rpartition(".")
        model.get_submodule(owner)._parameters[attr] = model.get_parameter(canonical)
    model.init_buffers()
    for name, param in model.named_parameters():
        full = initial_values(rules[name], param.shape, seed, name, device)
        if isinstance(param, DTensor):
            # src_data_rank=None: every rank holds the same full values, so each slices its own; no communication.
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(full)
        del full


def _aliases(model: nn.Module) -> list[tuple[str, str]]:
    """(first name, other name) of every parameter registered under two names (tied weights)."""
    first_name: dict[int, str] = {}
    aliases = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            aliases.append((first_name[id(param)], name))
        else:
            first_name[id(param)] = name
    return aliases
