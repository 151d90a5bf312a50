"""The host work that Megatron-Core's all-to-all dispatcher exposes by reading the token counts on the host before
the expert all-to-all (`moe_routing.expert_host_exposed_s`), against a hand computation."""

from dataclasses import replace

import pytest

from aiinfra.plan.cluster import make_cluster
from aiinfra.plan.frameworks import framework_facts
from aiinfra.plan.layout import Layout, TrainSettings
from aiinfra.plan.moe_routing import HOST_OP_S, HOST_OPS_PER_EXTRA_EXPERT, expert_host_exposed_s
from aiinfra.plan.step import layer_micro_batch_times, step_breakdown
from aiinfra.spec import ModelSpec

MOE = ModelSpec(vocab_size=32000, dim=2048, n_layers=8, n_heads=32, n_kv_heads=4, ffn_dim=768,
                max_seq_len=4096, n_experts=128, experts_per_token=8)


def test_the_op_count_and_cost_are_the_stated_ones() -> None:
    # Per extra local expert: two grouped linears, each 4 host ops forward (split, two quantized copies, GEMM) and
    # 5 backward (split, two copies, dgrad, wgrad); about 10 us of host time each.
    assert HOST_OPS_PER_EXTRA_EXPERT == 18
    assert HOST_OP_S == pytest.approx(10e-6)
    assert expert_host_exposed_s(16, HOST_OP_S) == pytest.approx(15 * 18 * 10e-6)  # 2.7 ms per layer, micro-batch
    assert expert_host_exposed_s(4, HOST_OP_S) == pytest.approx(0.54e-3)
    assert expert_host_exposed_s(1, HOST_OP_S) == 0.0 and expert_host_exposed_s(0.5, HOST_OP_S) == 0.0
    assert expert_host_exposed_s(16, 0.0) == 0.0


def test_only_megatron_exposes_it() -> None:
    assert framework_facts("megatron").expert_host_op_s == HOST_OP_S
    for name in ("jax", "torchtitan", "deepspeed", "megatron-2021"):
        assert framework_facts(name).expert_host_op_s == 0.0


def test_each_layer_and_micro_batch_pays_it_once() -> None:
    cluster = make_cluster("b200", 128)
    plain = TrainSettings(seq_len=4096, global_batch_seqs=256, precision="fp8")
    synced = replace(plain, expert_host_op_s=HOST_OP_S)
    for ep in (8, 32, 128):  # 16, 4 and 1 local experts
        layout = Layout(dp_shard=128, ep=ep, micro_batch=1)
        local = MOE.n_experts / ep
        base = layer_micro_batch_times(MOE, plain, layout, cluster)
        more = layer_micro_batch_times(MOE, synced, layout, cluster)
        assert more.compute_s == base.compute_s
        assert more.other_comm_exposed_s - base.other_comm_exposed_s == pytest.approx((local - 1) * 18 * 10e-6)
        step0 = step_breakdown(MOE, plain, layout, cluster)
        step1 = step_breakdown(MOE, synced, layout, cluster)
        # 2 micro-batches per device (256 sequences over 128 ranks) through 8 layers.
        assert step1.step_time_s - step0.step_time_s == pytest.approx(2 * 8 * (local - 1) * 18 * 10e-6, rel=1e-9)


def test_a_dense_model_is_unchanged() -> None:
    cluster = make_cluster("b200", 128)
    dense = ModelSpec(vocab_size=32000, dim=2048, n_layers=8, n_heads=32, n_kv_heads=4, ffn_dim=6144,
                      max_seq_len=4096)
    plain = TrainSettings(seq_len=4096, global_batch_seqs=256, precision="fp8")
    layout = Layout(dp_shard=128, micro_batch=1)
    assert layer_micro_batch_times(dense, replace(plain, expert_host_op_s=HOST_OP_S), layout, cluster) \
        == layer_micro_batch_times(dense, plain, layout, cluster)


def test_a_capacity_padded_run_needs_no_host_sync() -> None:
    cluster = make_cluster("b200", 128)
    padded = TrainSettings(seq_len=4096, global_batch_seqs=256, precision="fp8", moe_capacity_factor=1.25)
    layout = Layout(dp_shard=128, ep=8, micro_batch=1)
    assert layer_micro_batch_times(MOE, replace(padded, expert_host_op_s=HOST_OP_S), layout, cluster) \
        == layer_micro_batch_times(MOE, padded, layout, cluster)
