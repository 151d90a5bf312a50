"""Meta-device models made real: each rank allocates only its shards and fills them with the full model's values.

The model is built on the meta device (shapes, no memory) and parallelized there (TP, checkpointing, compile,
FSDP); then `materialize` allocates each parameter's local shard and copies into it the matching slice of that
parameter's initial values. Every parameter is drawn from a generator of its own (`models.initial_values`), so the
full model is bitwise the same for one seed on one process, under FSDP, TP or a pipeline. One full parameter at a
time is drawn, never the whole model: the largest single parameter (the embedding) is the only transient.

Fine-tuning (`train.init_from`, a Hugging Face Llama folder): the values come from its safetensors instead, and each
rank reads only the slice of each tensor its shard holds (safetensors' lazy slices over the memory-mapped file),
so no rank ever holds a full copy of a sharded parameter.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from aiinfra.config import ConfigError
from aiinfra.hf_format import hf_name_to_ours, hf_weight_files
from aiinfra.models import Transformer, initial_values


class SafetensorsWeights:
    """The tensors of a Hugging Face Llama folder under our names, read a slice at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.where: dict[str, tuple[Path, str]] = {}
        for path in hf_weight_files(self.folder):
            with safe_open(str(path), framework="pt") as weights:
                for key in weights.keys():  # noqa: SIM118 - safe_open is not a dict
                    ours = hf_name_to_ours(key)
                    if ours is not None:
                        self.where[ours] = (path, key)

    def read(self, name: str, shape: torch.Size, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """Tensor `name` (of full `shape`), or the part of it `index` selects, read from the file."""
        if name not in self.where:
            raise ConfigError(f"train.init_from={str(self.folder)!r}: the weights hold no tensor for our {name!r}")
        path, key = self.where[name]
        with safe_open(str(path), framework="pt") as weights:
            lazy = weights.get_slice(key)
            if tuple(lazy.get_shape()) != tuple(shape):
                raise ConfigError(f"{path}: {key} has shape {tuple(lazy.get_shape())}, the model needs "
                                  f"{tuple(shape)}")
            return lazy[index] if index is not None else lazy[:]


def is_meta(model: nn.Module) -> bool:
    """True when the module's parameters live on the meta device (built but never allocated)."""
    return any(param.is_meta for param in model.parameters())


@torch.no_grad()
def materialize(model: Transformer, device: torch.device, seed: int, weights: SafetensorsWeights | None = None
                ) -> None:
    """Allocate this rank's shards of a meta-device `model` on `device` and initialise them for `seed`, or fill them
    from `weights` (each rank reading its own slices)."""
    rules = model.init_rules()
    aliases = _aliases(model)
    model.to_empty(device=device)
    # to_empty gives every module a Parameter of its own: tie the aliases (tied embeddings) to one again.
    for canonical, alias in aliases:
        owner, _, attr = alias.rpartition(".")
        model.get_submodule(owner)._parameters[attr] = model.get_parameter(canonical)
    model.init_buffers()
    for name, param in model.named_parameters():
        if weights is not None:
            _load_local(param, name, weights)
            continue
        full = initial_values(rules[name], param.shape, seed, name, device)
        if isinstance(param, DTensor):
            # src_data_rank=None: every rank holds the same full values, so each slices its own; no communication.
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(full)
        del full


def _load_local(param: torch.Tensor, name: str, weights: SafetensorsWeights) -> None:
    """This rank's part of parameter `name`, read from `weights` (only that slice, for a DTensor)."""
    if not isinstance(param, DTensor):
        param.copy_(weights.read(name, param.shape))
        return
    local = param.to_local()
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if tuple(shape) == tuple(local.shape):
        local.copy_(weights.read(name, param.shape, tuple(slice(o, o + n) for o, n in zip(offset, shape))))
    else:  # a layout whose local shard is not one rectangle of the full tensor: read it whole and slice it here
        full = weights.read(name, param.shape).to(local.dtype)
        local.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local())


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
