"""Mixture-of-experts routing arithmetic for the training step: the rows each local expert's GEMMs run on (balanced,
capacity-padded, or with a tiled grouped GEMM's ragged-group waste) and the share of routed copies that cross the
network under node-limited dispatch."""

from __future__ import annotations

from aiinfra.plan.layout import Layout
from aiinfra.spec import ModelSpec


def expert_tokens(spec: ModelSpec, layout: Layout, m: float, capacity_factor: float = 0.0) -> float:
    """Rows each local expert's GEMMs run on for m tokens per device: the balanced share m k ep / E, or, when
    tokens are dropped at a capacity factor, the whole capacity buffer cf x m k ep / E, padding included (GShard,
    Lepikhin et al. 2020, 2.2; Switch Transformer, Fedus et al. 2021, 2.2: expert capacity = cf x tokens x k / E)."""
    share = m * spec.experts_per_token * layout.ep / spec.n_experts
    return share * capacity_factor if capacity_factor > 0 else share

def grouped_gemm_rows(rows_per_expert: float, local_experts: float, row_tile: int) -> float:
    """Rows each expert's share of a tiled grouped GEMM computes. A kernel that walks row tiles of `row_tile` rows
    over the experts' concatenated groups visits a tile that straddles two groups once for each (JAX Pallas megablox
    gmm/tgmm, make_group_metadata: at most tiles_m + num_groups - 1 tile visits, each a whole masked tile), so
    G groups cost about G - 1 tiles more than their rows: row_tile x (G - 1) / G more rows per expert."""
    if row_tile <= 0 or local_experts <= 1:
        return rows_per_expert
    return rows_per_expert + row_tile * (local_experts - 1) / local_experts

def expert_gemm_rows(spec: ModelSpec, layout: Layout, m: float, capacity_factor: float, row_tile: int) -> float:
    """Rows each local expert's GEMMs compute for m tokens: its capacity buffer when tokens are dropped (a dense
    batched GEMM), else its routed share plus what a tiled grouped GEMM wastes on ragged groups."""
    rows = expert_tokens(spec, layout, m, capacity_factor)
    if capacity_factor > 0:
        return rows
    return grouped_gemm_rows(rows, spec.n_experts / layout.ep, row_tile)

def moe_remote_share(experts_per_token: int, node_limit: int) -> float:
    """Share of a token's k routed copies that cross the network when its experts lie in at most `node_limit`
    domains: one copy per target domain goes over the network and is forwarded to its experts inside the domain
    (DeepSeek-V3, arXiv 2412.19437, 3.2.2: at most 4 nodes per token, IB then NVLink; DeepEP), so M of k copies."""
    if node_limit <= 0 or experts_per_token <= node_limit:
        return 1.0
    return node_limit / experts_per_token
