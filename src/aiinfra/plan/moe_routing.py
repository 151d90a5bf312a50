"""Mixture-of-experts routing arithmetic for the training step: the rows each local expert's GEMMs run on (balanced,
capacity-padded, or with a tiled grouped GEMM's ragged-group waste) and the share of routed copies that cross the
network under node-limited dispatch, and the expert-parallel all-to-all that carries them."""

from __future__ import annotations

from aiinfra.plan.cluster import Cluster, collective_time_s
from aiinfra.plan.layout import Layout, TrainSettings
from aiinfra.spec import ModelSpec

# Transformer Engine's GroupedLinear (Megatron-Core's TEGroupedMLP under --moe-grouped-gemm) reads the per-expert token
# counts on the host, splits and quantizes the input per expert and launches one cuBLAS GEMM per local expert on a pool
# of CUDA streams (TE docs, features/moe "Grouped GEMM", per-expert path; NVTE_USE_CUTLASS_GROUPED_GEMM, off by
# default, switches only Hopper BF16/FP16 to a CUTLASS kernel; TE issue #1386: multi-stream cuBLASLt kept over grouped
# kernels). Each extra GEMM costs time a single GEMM of the same rows does not: TE PR #2045's benchmark of
# general_grouped_gemm (TE 2.7, CUDA 12.9, H100, BF16) ran the same 103.1 GFLOP (2 x 8 x 4096 x 768 x 2048) as 8
# groups of 4096 rows at 627.903 TFLOP/s (164.16 us) and as 16 groups of 2048 rows at 553.945 TFLOP/s (186.08 us);
# both shapes have the same narrowest side (768), so the shape efficiency is the same, and the 21.92 us are the
# 8 extra GEMMs: 2.74 us per extra expert GEMM. The figure is Hopper's; it is taken for every NVIDIA generation
# (a per-launch, per-stream cost, not a per-FLOP one) - an assumption, no Blackwell figure of the multi-stream path.
TE_MULTI_STREAM_GEMM_PER_GROUP_S = (2 * 8 * 4096 * 768 * 2048) * (1 / 553.945e12 - 1 / 627.903e12) / 8


# The same path's floor per expert GEMM where each GEMM is tiny: TE PR #3134's SM100 benchmark
# (benchmarks/linear/benchmark_grouped_linear.py --compare-nvfp4-grouped-gemm, TN fprop, 8 experts x 128 tokens,
# N = K = 2048) times the multi-stream cuBLASLt path at 0.267 ms kernel-vs-kernel ("pure": operands pre-swizzled, so
# only the GEMMs) against 0.069 ms for one CUTLASS grouped launch of the same work: 33.4 us per expert GEMM however
# little it computes. Measured on SM100 (Blackwell) only; no such floor is taken for other generations (TE PR #2045's
# H100 figure bounds Hopper's below 186.08 / 16 = 11.6 us, a bound, not a measurement).
TE_MULTI_STREAM_GEMM_FLOOR_S = {"blackwell": 0.267e-3 / 8}


# Host work per extra local expert, exposed by the dispatcher's host synchronisation. Megatron-Core's all-to-all token
# dispatcher (MoEAlltoAllTokenDispatcher, dropless) reads the token counts on the host before the expert-parallel
# all-to-all ("A synchronization is needed before expert parallel AlltoAll communication to get the input_splits and
# output_splits CPU values": cuda_sync_point "before_ep_alltoall", whenever EP > 1 or a rank holds more than one
# expert), so at every MoE layer the GPU's queue drains and the host's per-expert work that follows runs in front of
# an idle GPU instead of ahead of it. That work, per local expert past the first, in one layer's forward and backward
# on TE's multi-stream GroupedLinear path: each of the two grouped linears splits its input, quantizes the split into
# two newly allocated copies (TE issue #1499: "torch.split()" and "torch.empty() (2x num_gemms calls)" are the CPU
# overheads that make a grouped linear far longer than its GEMMs) and launches one GEMM, 4 host ops; its backward
# splits the gradient, quantizes it into two copies and launches the dgrad and wgrad GEMMs, 5 ops: 2 x (4 + 5) = 18.
# Each op costs about 10 us of host time from Python to the kernel launch (the middle of the 5-25 us that the Python
# binding, autograd, ATen dispatch, library and driver layers add per op on the way to cudaLaunchKernel). The whole
# exposure is an estimate set from those counts, not fitted: 180 us per extra expert per layer and micro-batch. As a
# cross-check, TE issue #2897 measured the fused grouped MLP op (fewer ops per expert) at about 1.2 ms forward and
# 2.1 ms backward of host time for 64 experts on GB200, ~52 us per expert.
HOST_OPS_PER_EXTRA_EXPERT = 2 * (4 + 5)
HOST_OP_S = 10e-6


def expert_host_exposed_s(local_experts: float, host_op_s: float) -> float:
    """Host seconds one layer's forward and backward expose per micro-batch after the dispatcher's host sync: the
    per-expert host ops (`HOST_OPS_PER_EXTRA_EXPERT`) of every local expert past the first; nothing for one expert,
    which runs like a dense MLP."""
    return split_gemm_overhead_s(local_experts, HOST_OPS_PER_EXTRA_EXPERT * host_op_s)


def grouped_call_s(gemms_s: float, local_experts: float, per_group_s: float, floor_s: float) -> float:
    """Seconds of one grouped expert GEMM call on TE's multi-stream path: its GEMMs' roofline time plus the extra
    GEMMs' cost (`split_gemm_overhead_s`), and never less than the path's floor per expert GEMM
    (`TE_MULTI_STREAM_GEMM_FLOOR_S`) once per local expert."""
    return max(gemms_s + split_gemm_overhead_s(local_experts, per_group_s), floor_s * local_experts)


def multi_stream_floor_s(cluster: Cluster, per_group_s: float) -> float:
    """The per-expert-GEMM floor of TE's multi-stream grouped path (`TE_MULTI_STREAM_GEMM_FLOOR_S`) on
    this generation, for a framework that runs that path (one with a per-group cost); 0 otherwise."""
    return TE_MULTI_STREAM_GEMM_FLOOR_S.get(cluster.efficiency.generation, 0.0) if per_group_s > 0 else 0.0


def expert_tokens(spec: ModelSpec, layout: Layout, m: float, capacity_factor: float = 0.0) -> float:
    """Rows each local expert's GEMMs run on for m tokens per device: the balanced share m k ep / E, or, when
    tokens are dropped at a capacity factor, the whole capacity buffer cf x m k ep / E, padding included (GShard,
    Lepikhin et al. 2020, 2.2; Switch Transformer, Fedus et al. 2021, 2.2: expert capacity = cf x tokens x k / E).
    With experts tensor-parallel like the dense layers every TP rank computes all m tokens on its 1/tp of each
    expert; folded to expert TP 1 (`Layout.expert_tp`) each TP rank dispatches only its own m / tp sequence shard
    to whole experts, so the rows shrink by tp / expert_tp while the expert width grows by the same factor."""
    share = m * spec.experts_per_token * layout.ep / spec.n_experts * layout.expert_tp / layout.tp
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


def split_gemm_overhead_s(local_experts: float, per_group_s: float) -> float:
    """Seconds one grouped expert GEMM call costs over a single GEMM of all its rows when it runs as one GEMM per
    local expert: (G - 1) x the cost of an extra GEMM (`TE_MULTI_STREAM_GEMM_PER_GROUP_S`); nothing for one expert."""
    if per_group_s <= 0 or local_experts <= 1:
        return 0.0
    return (local_experts - 1) * per_group_s


def ep_comm_s(spec: ModelSpec, settings: TrainSettings, layout: Layout, cluster: Cluster, m: float) -> float:
    """Expert-parallel all-to-all (dispatch and combine) of one layer's forward for m tokens on one device."""
    a = settings.activation_bytes
    tp = layout.tp
    h = spec.dim
    precision = settings.gemm_precision
    if spec.is_moe and layout.ep > 1:
        # Dispatch sends each token to its k experts, in fp8 when the expert GEMMs take fp8 inputs (DeepSeek-V3
        # 3.3.1; Megatron's fp8 dispatch); the combine returns bf16 outputs.
        # Under sequence parallelism each tensor-parallel rank dispatches only its own S/TP x B tokens
        # (Megatron-Core moe/token_dispatcher.py: num_local_tokens = S/TP*B, num_global_tokens =
        # num_local_tokens*TP*EP); any expert-TP gather then runs inside the node.
        # Folded over TP (expert TP 1, `Layout.expert_tp`), the expert group takes the TP ranks first (Megatron-Core
        # parallel_state orders expert ranks ETP-EP-EDP), so its members are `expert_tp` = 1 rank apart and each
        # sends its own m / tp shard.
        folded = layout.experts_folded
        sent = m / tp if layout.sequence_parallel or folded else m
        stride = layout.expert_tp if folded else tp * layout.cp
        dispatch_bytes = sent * spec.experts_per_token * h * (1 if precision in ("fp8", "fp4") else a)
        combine_bytes = sent * spec.experts_per_token * h * a
        share = moe_remote_share(spec.experts_per_token, settings.moe_node_limit)
        return (collective_time_s(cluster, "all_to_all", dispatch_bytes, layout.ep, stride, remote_share=share)
                + collective_time_s(cluster, "all_to_all", combine_bytes, layout.ep, stride, remote_share=share))
    return 0.0
