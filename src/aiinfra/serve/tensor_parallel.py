"""Tensor-parallel serving: N processes on torch.distributed (gloo for a model on CPU, NCCL on CUDA), each with 1/N of
every layer and of the KV cache; the scheduler runs once, on rank 0, and sends each step's plan to the others.

The split is Megatron's: the query, key and value projections and the MLP's gate and up projections are split by
output (whole attention heads, MLP columns), the attention output and MLP down projections by input, and one
all-reduce after each of those two sums the partial results; the embedding and the output head are split by
vocabulary rows when the vocabulary divides evenly (a masked lookup summed by all-reduce, and logits gathered), and
held whole otherwise. Every rank runs the same runner code on the same plan, so every rank's sampled tokens agree;
rank 0's go back to the scheduler.

Rank r of node k: r = k * (N / nnodes) + local rank. On node 0 the engine process is rank 0 and the server starts
the node's other ranks beside it; every other node runs only its ranks (`aiinfra serve MODEL --tp N --nnodes M
--node-rank K`, see `engine_core.run_node_workers`).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from aiinfra.distributed.runtime import shutdown_process_groups
from aiinfra.models.llama import FeedForward, Transformer


@dataclass(frozen=True)
class TensorParallelConfig:
    """The layout of a tensor-parallel server."""

    size: int = 1
    """ranks in all (--tp)"""
    nnodes: int = 1
    node_rank: int = 0
    endpoint: str = "127.0.0.1:29511"
    """HOST:PORT of rank 0's rendezvous, the same on every node (--rdzv-endpoint)"""
    timeout_s: float = 30 * 86400.0
    """how long a collective waits: an idle server's ranks wait in one for the next plan, so this is long"""

    def __post_init__(self) -> None:
        if self.size < 1 or self.nnodes < 1:
            raise ValueError(f"--tp {self.size} --nnodes {self.nnodes}: both must be >= 1")
        if self.size % self.nnodes:
            raise ValueError(f"--tp {self.size} over --nnodes {self.nnodes}: every node must run the same number "
                             "of ranks")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank}: expected 0..{self.nnodes - 1}")
        host, _, port = self.endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--rdzv-endpoint {self.endpoint!r}: expected HOST:PORT")

    @property
    def local_size(self) -> int:
        """Ranks per node."""
        return self.size // self.nnodes

    def ranks_of_this_node(self) -> range:
        """The global ranks this node runs."""
        return range(self.node_rank * self.local_size, (self.node_rank + 1) * self.local_size)

    def check(self, model: Transformer) -> None:
        """A ValueError unless the model's heads, KV heads and MLP split evenly over the ranks."""
        spec = model.spec
        for name, count in (("n_heads", spec.n_heads), ("n_kv_heads", spec.n_kv_heads), ("ffn_dim", spec.ffn_dim)):
            if count % self.size:
                raise ValueError(f"--tp {self.size}: the model's {name}={count} does not split evenly")
        if any(not isinstance(block.feed_forward, FeedForward) for block in model.layers.values()):
            raise ValueError(f"--tp {self.size}: mixture-of-experts layers are not tensor-parallel here")


class TensorParallelGroup:
    """This process's place in the group and the collectives the runner calls."""

    def __init__(self, config: TensorParallelConfig, rank: int):
        self.config, self.rank, self.size = config, rank, config.size
        self.vocab_range: tuple[int, int] | None = None  # this rank's embedding rows when the vocabulary is split

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place."""
        dist.all_reduce(tensor)
        return tensor

    def gather_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's tensor along the last dimension, in rank order."""
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=-1)

    def broadcast(self, plan: Any) -> Any:
        """Rank 0's object on every rank (the step's plan, or None to stop)."""
        box = [plan]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Leave the group and free it, threads included (a gloo thread left to interpreter shutdown can abort a
        finished process: `distributed.runtime.shutdown_process_groups`)."""
        shutdown_process_groups()


def join_group(config: TensorParallelConfig, rank: int, device_type: str = "cpu") -> TensorParallelGroup:
    """Join the group as `rank` (blocks until every rank has joined, or the timeout); NCCL for a model on CUDA,
    gloo otherwise (the collectives run where the model's tensors are)."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{config.endpoint}", world_size=config.size, rank=rank,
                            timeout=datetime.timedelta(seconds=config.timeout_s))
    return TensorParallelGroup(config, rank)


def _slice_linear(linear: nn.Linear, dim: int, rank: int, size: int) -> None:
    """Keep this rank's 1/size of a Linear's weight along `dim` (0: outputs, 1: inputs)."""
    weight = linear.weight.detach()
    part = weight.shape[dim] // size
    linear.weight = nn.Parameter(weight.narrow(dim, rank * part, part).clone(), requires_grad=False)
    if dim == 0:
        linear.out_features = part
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach()[rank * part : (rank + 1) * part].clone(),
                                       requires_grad=False)
    else:
        linear.in_features = part


def shard_model(model: Transformer, group: TensorParallelGroup) -> None:
    """Cut the model in place down to this rank's shard (see the module docstring for the split)."""
    group.config.check(model)
    rank, size = group.rank, group.size
    for block in model.layers.values():
        attention, ffn = block.attention, block.feed_forward
        for linear in (attention.wq, attention.wk, attention.wv, ffn.w1, ffn.w3):
            if linear is not None:
                _slice_linear(linear, 0, rank, size)
        _slice_linear(attention.wo, 1, rank, size)
        _slice_linear(ffn.w2, 1, rank, size)
    vocab = model.spec.vocab_size
    if vocab % size == 0:
        part = vocab // size
        group.vocab_range = (rank * part, (rank + 1) * part)
        tied = model.output.weight is model.tok_embeddings.weight
        embedding = model.tok_embeddings.weight.detach()[rank * part : (rank + 1) * part].clone()
        model.tok_embeddings.weight = nn.Parameter(embedding, requires_grad=False)
        if tied:
            model.output.weight = model.tok_embeddings.weight
        else:
            _slice_linear(model.output, 0, rank, size)
        model.output.out_features = part


def embed(model: Transformer, tokens: torch.Tensor, group: TensorParallelGroup | None) -> torch.Tensor:
    """Token embeddings; with a vocabulary split, each rank looks up its rows and the ranks sum."""
    if group is None or group.vocab_range is None:
        return model.tok_embeddings(tokens)
    low, high = group.vocab_range
    mine = (tokens >= low) & (tokens < high)
    rows = model.tok_embeddings(torch.where(mine, tokens - low, torch.zeros_like(tokens)))
    return group.all_reduce(rows * mine.unsqueeze(-1).to(rows.dtype))
