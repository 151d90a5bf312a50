"""Transformer Engine's one-GEMM-per-expert grouped call against a hand computation: the cost of each extra GEMM
(TE PR #2045, H100) and, on Blackwell, the floor per expert GEMM (TE PR #3134, SM100)."""

from dataclasses import replace

import pytest

from aiinfra.plan.cluster import make_cluster
from aiinfra.plan.frameworks import framework_facts
from aiinfra.plan.layout import Layout, TrainSettings
from aiinfra.plan.moe_routing import (
    TE_MULTI_STREAM_GEMM_FLOOR_S,
    TE_MULTI_STREAM_GEMM_PER_GROUP_S,
    grouped_call_s,
    split_gemm_overhead_s,
)
from aiinfra.plan.step import _gemm_time_s, layer_forward_times, layer_micro_batch_times, mlp_down_projection_s
from aiinfra.spec import ModelSpec

MOE = ModelSpec(vocab_size=32000, dim=2048, n_layers=8, n_heads=32, n_kv_heads=4, ffn_dim=768,
                max_seq_len=4096, n_experts=128, experts_per_token=8)
DENSE = ModelSpec(vocab_size=32000, dim=2048, n_layers=8, n_heads=32, n_kv_heads=4, ffn_dim=6144, max_seq_len=4096)


def test_per_group_cost_is_the_te_2_7_benchmark_difference() -> None:
    # TE PR #2045, TE 2.7 general_grouped_gemm on H100 BF16: 2 x 8 x 4096 x 768 x 2048 FLOPs as 8 groups at
    # 627.903 TFLOP/s and as 16 groups at 553.945 TFLOP/s; 8 more GEMMs cost the difference.
    flops = 2 * 8 * 4096 * 768 * 2048
    assert flops == pytest.approx(103.079e9, rel=1e-4)
    t8, t16 = flops / 627.903e12, flops / 553.945e12
    assert t8 == pytest.approx(164.16e-6, rel=1e-3) and t16 == pytest.approx(186.08e-6, rel=1e-3)
    assert TE_MULTI_STREAM_GEMM_PER_GROUP_S == pytest.approx((t16 - t8) / 8)
    assert TE_MULTI_STREAM_GEMM_PER_GROUP_S == pytest.approx(2.74e-6, rel=1e-3)
    assert framework_facts("megatron").grouped_gemm_per_group_s == TE_MULTI_STREAM_GEMM_PER_GROUP_S
    assert framework_facts("jax").grouped_gemm_per_group_s == 0.0  # megablox: one kernel, its tiles modelled apart


def test_split_gemm_overhead_counts_every_expert_past_the_first() -> None:
    c = 3e-6
    assert split_gemm_overhead_s(16, c) == pytest.approx(15 * c)
    assert split_gemm_overhead_s(4, c) == pytest.approx(3 * c)
    assert split_gemm_overhead_s(1, c) == 0.0 and split_gemm_overhead_s(0.5, c) == 0.0
    assert split_gemm_overhead_s(16, 0.0) == 0.0


def test_each_grouped_call_pays_it_forward_and_twice_backward() -> None:
    cluster = make_cluster("h100-sxm-80gb", 128)  # Hopper: the per-GEMM increment, no floor measured
    plain = TrainSettings(seq_len=4096, global_batch_seqs=256, precision="fp8")
    split = replace(plain, grouped_gemm_per_group_s=TE_MULTI_STREAM_GEMM_PER_GROUP_S)
    c = TE_MULTI_STREAM_GEMM_PER_GROUP_S
    for ep in (8, 32, 128):  # 16, 4 and 1 local experts
        layout = Layout(dp_shard=128, ep=ep, micro_batch=1)
        local = MOE.n_experts / ep
        base = layer_forward_times(MOE, plain, layout, cluster)
        more = layer_forward_times(MOE, split, layout, cluster)
        # Two grouped calls in the forward (fc1, fc2): 2 x (16 - 1) x 2.74 us = 82.2 us at EP8.
        assert more.mlp_gemm_s - base.mlp_gemm_s == pytest.approx(2 * (local - 1) * c)
        assert more.gemm_s - base.gemm_s == pytest.approx(2 * (local - 1) * c)
        # The backward runs dgrad and wgrad of both (2 x the forward's GEMM time): 6 calls in all, no recompute.
        mb0 = layer_micro_batch_times(MOE, plain, layout, cluster)
        mb1 = layer_micro_batch_times(MOE, split, layout, cluster)
        assert mb1.compute_s - mb0.compute_s == pytest.approx(6 * (local - 1) * c)
        assert mlp_down_projection_s(MOE, split, layout, cluster) - mlp_down_projection_s(MOE, plain, layout, cluster) \
            == pytest.approx((local - 1) * c)
    assert 2 * 15 * c == pytest.approx(82.19e-6, rel=1e-3)


def test_one_local_expert_and_dense_models_are_unchanged() -> None:
    cluster = make_cluster("b200", 128)
    plain = TrainSettings(seq_len=4096, global_batch_seqs=256, precision="fp8")
    split = replace(plain, grouped_gemm_per_group_s=TE_MULTI_STREAM_GEMM_PER_GROUP_S)
    one_each = Layout(dp_shard=128, ep=128, micro_batch=1)
    assert layer_forward_times(MOE, split, one_each, cluster) == layer_forward_times(MOE, plain, one_each, cluster)
    dense = Layout(dp_shard=128, micro_batch=1)
    assert layer_forward_times(DENSE, split, dense, cluster) == layer_forward_times(DENSE, plain, dense, cluster)


def test_the_blackwell_floor_is_te_3134s_multi_stream_time_per_expert_gemm() -> None:
    # TE PR #3134, SM100, TN fprop, 8 experts x 128 tokens, N = K = 2048: the multi-stream cuBLASLt path takes
    # 0.267 ms kernel-vs-kernel for the 8 GEMMs (one CUTLASS grouped launch: 0.069 ms).
    assert TE_MULTI_STREAM_GEMM_FLOOR_S == {"blackwell": pytest.approx(33.375e-6)}
    # A call is its GEMMs plus the extra GEMMs' cost, or the floor once per expert, whichever is longer.
    c, f = 2.74e-6, 33.375e-6
    assert grouped_call_s(100e-6, 16, c, f) == pytest.approx(16 * f)  # 100 + 41.1 us < 534 us: the floor
    assert grouped_call_s(900e-6, 16, c, f) == pytest.approx(900e-6 + 15 * c)  # the GEMMs are longer
    assert grouped_call_s(100e-6, 16, c, 0.0) == pytest.approx(100e-6 + 15 * c)


def test_tiny_expert_gemms_on_blackwell_take_the_floor_and_large_ones_their_roofline() -> None:
    cluster = make_cluster("b200", 128)
    plain = TrainSettings(seq_len=4096, global_batch_seqs=256, precision="fp8")
    split = replace(plain, grouped_gemm_per_group_s=TE_MULTI_STREAM_GEMM_PER_GROUP_S)
    floor, c = TE_MULTI_STREAM_GEMM_FLOOR_S["blackwell"], TE_MULTI_STREAM_GEMM_PER_GROUP_S
    layout = Layout(dp_shard=128, ep=8, micro_batch=1)  # 16 local experts of 256 rows each
    rows = 4096 * 8 * 8 / 128
    up = _gemm_time_s(cluster, "fp8", rows, 2048, 2 * 768, 16)
    down = _gemm_time_s(cluster, "fp8", rows, 768, 2048, 16)
    assert up + 15 * c < 16 * floor and down + 15 * c < 16 * floor  # each call is floor-bound
    base = layer_forward_times(MOE, plain, layout, cluster)
    more = layer_forward_times(MOE, split, layout, cluster)
    assert more.mlp_gemm_s - base.mlp_gemm_s == pytest.approx(2 * 16 * floor - up - down)
    # Forward, dgrad and wgrad of both calls: six floors a layer and micro-batch.
    mb0 = layer_micro_batch_times(MOE, plain, layout, cluster)
    mb1 = layer_micro_batch_times(MOE, split, layout, cluster)
    assert mb1.compute_s - mb0.compute_s == pytest.approx(3 * (2 * 16 * floor - up - down))
    # 64 sequences a micro-batch: 16,384 rows an expert, GEMMs far longer than the floor, only the increment.
    large = Layout(dp_shard=128, ep=8, micro_batch=64)
    gap = layer_forward_times(MOE, split, large, cluster).mlp_gemm_s - layer_forward_times(
        MOE, plain, large, cluster).mlp_gemm_s
    assert gap == pytest.approx(2 * 15 * c)


@pytest.mark.parametrize("micro_batch", [1, 2, 4, 16])
@pytest.mark.parametrize("ep", [8, 32, 128])
def test_the_floor_never_makes_a_step_faster(micro_batch: int, ep: int) -> None:
    cluster = make_cluster("b200", 128)
    plain = TrainSettings(seq_len=4096, global_batch_seqs=256, precision="fp8",
                          grouped_gemm_per_group_s=TE_MULTI_STREAM_GEMM_PER_GROUP_S)
    layout = Layout(dp_shard=128, ep=ep, micro_batch=micro_batch)
    hopper_like = replace(cluster, efficiency=replace(cluster.efficiency, generation="hopper"))
    assert layer_micro_batch_times(MOE, plain, layout, cluster).compute_s >= \
        layer_micro_batch_times(MOE, plain, layout, hopper_like).compute_s
