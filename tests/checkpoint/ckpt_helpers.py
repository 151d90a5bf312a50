"""A tiny training setup shared by the in-process tests, the crash writer and the torchrun worker.

dim 64, 2 layers, 256-token vocabulary, AdamW, a warmup LambdaLR and a WindowSampler over a fixed random token
stream: a step takes milliseconds, and every piece of state a checkpoint must capture is present.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)

from aiinfra.checkpoint.manager import TrainingState
from aiinfra.data.sampler import WindowSampler
from aiinfra.models import Transformer
from aiinfra.spec import ModelSpec

SEQ_LEN = 16
GLOBAL_BATCH = 4
TOKENS = np.random.default_rng(0).integers(0, 256, 20_000).astype(np.int64)


def tiny_spec(tie_embeddings: bool = False, dim: int = 64) -> ModelSpec:
    """The test model's spec."""
    return ModelSpec(
        vocab_size=256,
        dim=dim,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=128,
        max_seq_len=32,
        tie_embeddings=tie_embeddings,
    )


def warmup(step: int) -> float:
    """LR multiplier: a linear warmup over 4 steps (module level, so LambdaLR's state stays plain data)."""
    return min(1.0, (step + 1) / 4)


def build_model(seed: int, tie_embeddings: bool = False, dim: int = 64) -> nn.Module:
    """The tiny model with weights drawn from `seed`."""
    torch.manual_seed(seed)
    return Transformer(tiny_spec(tie_embeddings, dim))


def make_state(model: nn.Module, dp_rank: int = 0, dp_size: int = 1) -> TrainingState:
    """Optimizer, scheduler and this data-parallel rank's sampler around `model` (already parallelized, if at all)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
    sampler = WindowSampler(TOKENS, SEQ_LEN, GLOBAL_BATCH, seed=7, dp_rank=dp_rank, dp_size=dp_size)
    return TrainingState(model, optimizer, scheduler, data=sampler)


def train_step(state: TrainingState, group: dist.ProcessGroup | None = None, dropout: bool = True) -> float:
    """One optimizer step; returns the global-batch loss (averaged over data-parallel ranks when `group` is given).

    A random token dropout makes the step depend on the torch RNG, so a resume that loses RNG state shows up; it is
    turned off to compare layouts, whose ranks draw different random numbers.
    """
    inputs, targets = state.data.next_batch()
    if dropout:
        inputs = torch.where(torch.rand(inputs.shape) < 0.1, torch.zeros_like(inputs), inputs)
    logits = state.model(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    state.optimizer.step()
    state.optimizer.zero_grad()
    state.lr_scheduler.step()
    loss = loss.detach()
    if group is not None:
        dist.all_reduce(loss, group=group)
        loss /= dist.get_world_size(group)
    return loss.item()


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(state: TrainingState) -> dict:
    """A copy of the unsharded model and optimizer tensors keyed by name (on rank 0; empty on other ranks)."""
    model = get_model_state_dict(state.model, options=FULL)
    optimizer = get_optimizer_state_dict(state.model, state.optimizer, options=FULL)
    # Clones: on one process these are the live parameters, which the next step changes in place.
    tensors = {f"model.{name}": tensor.clone() for name, tensor in model.items()}
    for name, slots in optimizer.get("state", {}).items():
        for slot, value in slots.items():
            tensors[f"optim.{name}.{slot}"] = torch.as_tensor(value).clone()
    return tensors


def max_abs_difference(left: dict, right: dict) -> float:
    """Largest elementwise difference over equal key sets (inf when the keys or shapes differ)."""
    if left.keys() != right.keys():
        return float("inf")
    worst = 0.0
    for name in left:
        if left[name].shape != right[name].shape:
            return float("inf")
        worst = max(worst, (left[name].double() - right[name].double()).abs().max().item())
    return worst
