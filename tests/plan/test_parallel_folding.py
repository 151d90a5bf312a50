"""MoE Parallel Folding: expert parallelism over the TP ranks too, with expert TP 1 (`Layout.expert_tp`)."""

import pytest

from aiinfra.plan.cluster import collective_time_s, make_cluster
from aiinfra.plan.errors import PlanError
from aiinfra.plan.layout import Layout, TrainSettings, check_layout
from aiinfra.plan.memory import device_param_counts, memory_breakdown
from aiinfra.plan.moe_routing import expert_tokens
from aiinfra.plan.step import MOE_PERMUTE_PASSES, _elementwise_bytes, layer_forward_times
from aiinfra.spec import ModelSpec

# Qwen3-235B-A22B's MoE shape (config.json: hidden 4096, 94 layers, 64 heads, 4 KV heads, 128 experts top-8,
# moe_intermediate_size 1536), on 256 H100 as Megatron-Bridge runs it: TP2 PP8 EP32, so dp = 16 < ep.
QWEN = ModelSpec(vocab_size=151936, dim=4096, n_layers=96, n_heads=64, n_kv_heads=4, ffn_dim=1536,
                 max_seq_len=4096, n_experts=128, experts_per_token=8)
SETTINGS = TrainSettings(seq_len=4096, global_batch_seqs=2048, precision="fp8")
FOLDED = Layout(tp=2, pp=8, dp_shard=16, ep=32, zero_stage=1, micro_batch=1, sequence_parallel=True,
                pp_schedule="interleaved_1f1b", virtual_stages=4)


def test_ep_beyond_dp_folds_over_tp_with_expert_tp_one() -> None:
    check_layout(QWEN, SETTINGS, FOLDED, 256)  # ep 32 divides tp x dp x cp = 32
    assert FOLDED.expert_tp == 1 and FOLDED.expert_dp == 1
    plain = Layout(tp=2, pp=8, dp_shard=16, ep=8)
    assert plain.expert_tp == 2 and plain.expert_dp == 2  # ep inside dp keeps the dense layers' TP
    with pytest.raises(PlanError, match=r"ep=64 must divide dp x cp = 16 \(or, folded .* tp x dp x cp = 32\)"):
        check_layout(QWEN, SETTINGS, Layout(tp=2, pp=8, dp_shard=16, ep=64), 256)


def test_folded_rows_and_widths_by_hand() -> None:
    m = 4096.0  # tokens a device computes per micro-batch
    # Folded: each TP rank dispatches its own 2048 tokens; an expert gets 2048 x 8 x 32 / 128 = 4096 rows of
    # the whole 1536-wide expert.
    assert expert_tokens(QWEN, FOLDED, m) == pytest.approx(2048 * 8 * 32 / 128)
    # Not folded (EP8 inside dp16): every TP rank computes all 4096 tokens on half of each expert.
    assert expert_tokens(QWEN, Layout(tp=2, pp=8, dp_shard=16, ep=8), m) == pytest.approx(4096 * 8 * 8 / 128)
    # Expert parameters per device: 12 layers x 128 experts x 3 x 4096 x 1536 / (expert TP 1 x EP 32).
    per_layer = 128 * 3 * 4096 * 1536
    assert device_param_counts(QWEN, FOLDED).expert_params == pytest.approx(12 * per_layer / 32)
    assert device_param_counts(QWEN, Layout(tp=2, pp=8, dp_shard=16, ep=8)).expert_params \
        == pytest.approx(12 * per_layer / (2 * 8))


def test_folding_keeps_the_expert_flops_and_drops_the_moe_block_tp_collective() -> None:
    cluster = make_cluster("h100-sxm-80gb", 256)
    folded = layer_forward_times(QWEN, SETTINGS, FOLDED, cluster)
    # Expert GEMM FLOPs per device: rows x width x local experts is the same as TP-split experts at ep 16.
    ep16 = Layout(tp=2, pp=8, dp_shard=16, ep=16, zero_stage=1, sequence_parallel=True)
    rows_folded = expert_tokens(QWEN, FOLDED, 4096) * QWEN.ffn_dim * QWEN.n_experts / 32
    rows_split = expert_tokens(QWEN, ep16, 4096) * QWEN.ffn_dim / 2 * QWEN.n_experts / 16
    assert rows_folded == pytest.approx(rows_split)
    # Only attention's pair of TP collectives is left (the experts are not tensor-parallel).
    m, h, a = 4096, QWEN.dim, SETTINGS.activation_bytes
    assert folded.tp_comm_s == pytest.approx(collective_time_s(cluster, "all_reduce", m * h * a, 2, 1))
    assert layer_forward_times(QWEN, SETTINGS, ep16, cluster).tp_comm_s == pytest.approx(2 * folded.tp_comm_s)
    # The dispatch: each rank sends its 2048 tokens x 8 copies x 4096 in fp8 to 32 ranks laid out TP-first.
    dispatch = collective_time_s(cluster, "all_to_all", 2048 * 8 * h * 1, 32, 1)
    combine = collective_time_s(cluster, "all_to_all", 2048 * 8 * h * a, 32, 1)
    assert folded.ep_comm_s == pytest.approx(dispatch + combine)


def test_folded_permutation_covers_only_the_rank_s_own_tokens() -> None:
    # Same tp 2 and dense layers; the experts TP-split at ep 16 against folded at ep 32: the permutation before and
    # after the experts reads and writes 4096 x 8 routed copies of 4096 values on the first, 2048 x 8 on the second.
    split = _elementwise_bytes(QWEN, SETTINGS, Layout(tp=2, pp=8, dp_shard=16, ep=16), 4096)
    folded = _elementwise_bytes(QWEN, SETTINGS, Layout(tp=2, pp=8, dp_shard=16, ep=32), 4096)
    a = SETTINGS.activation_bytes
    assert split - folded == pytest.approx((4096 - 2048) * 8 * QWEN.dim * a * MOE_PERMUTE_PASSES)


def test_expert_states_shard_over_the_expert_data_parallel_ranks() -> None:
    # ZeRO-1 over dp 16 x (tp 2 / expert TP 1) / ep 32 = 1 expert-DP rank: the expert optimizer state is unsharded.
    zero1 = memory_breakdown(QWEN, SETTINGS, FOLDED)
    counts = device_param_counts(QWEN, FOLDED)
    assert zero1.optimizer_bytes == pytest.approx(
        SETTINGS.optimizer_bytes_per_param * (counts.dense_params / 16 + counts.expert_params / 1))
