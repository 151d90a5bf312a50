"""Each formula against a hand computation."""

import math
from dataclasses import replace

import pytest

from aiinfra.plan.cluster import collective_time_s, group_bandwidth_bytes_per_s, make_cluster
from aiinfra.plan.dp_comm import OVERLAP_SM_TAX, overlapped_s
from aiinfra.plan.efficiency import efficiency_table
from aiinfra.plan.inference import ServeSettings, decode_step_time_s, kv_bytes_per_token, weights_bytes
from aiinfra.plan.layout import Layout, TrainSettings
from aiinfra.plan.memory import layer_activation_bytes, memory_breakdown
from aiinfra.plan.reliability import (
    ReliabilitySettings,
    llama3_failures_per_device_hour,
    plan_reliability,
    young_daly_interval_s,
)
from aiinfra.plan.step import hardware_flops_per_token, step_breakdown
from aiinfra.spec import ModelSpec, preset

# Korthikanti et al. 2022's 22B model: h 6144, a 64, L 48, s 2048, t 8, GPT-style.
GPT22B = ModelSpec(vocab_size=51200, dim=6144, n_layers=48, n_heads=64, n_kv_heads=64, ffn_dim=4 * 6144,
                   max_seq_len=2048, mlp="gelu", norm="layernorm", position="learned", bias=True, tie_embeddings=True)
GPT_SETTINGS = TrainSettings(seq_len=2048, global_batch_seqs=4, attention_kernel="materialized", dropout=True)


def test_ring_all_reduce_time_inside_an_nvlink_node() -> None:
    cluster = make_cluster("h100-sxm-80gb", 8)
    # all-gather: (n-1)/n x S / (450 GB/s x 0.80) + (n-1) x 5 us; an all-reduce over NVSwitch is two such passes
    # of bandwidth but pays one latency step per pass (in-switch reduction / one-shot kernels).
    gather = 7 / 8 * 1e9 / (450e9 * 0.80) + 7 * 5e-6
    assert collective_time_s(cluster, "all_gather", 1e9, 8, 1) == pytest.approx(gather)
    assert collective_time_s(cluster, "all_reduce", 1e9, 8, 1) == pytest.approx(2 * (7 / 8 * 1e9 / 360e9 + 5e-6))


def test_group_bandwidth_across_nodes_uses_one_nic_per_member() -> None:
    cluster = make_cluster("h100-sxm-80gb", 256)
    # Stride 8: one member per node, 400 Gb/s = 50 GB/s per NIC, at 80% bus efficiency.
    assert group_bandwidth_bytes_per_s(cluster, 32, 8)[0] == pytest.approx(50e9 * 0.8)
    # Stride 1 over 4 nodes: 8 members per node push through 8 NICs, capped by NVLink's 450 GB/s.
    assert group_bandwidth_bytes_per_s(cluster, 32, 1)[0] == pytest.approx(min(450e9, 8 * 50e9) * 0.8)


def test_gemm_efficiency_is_half_the_ceiling_at_the_half_dimension() -> None:
    hopper = efficiency_table()["hopper"]
    half = hopper.gemm_half_dim
    assert hopper.gemm_efficiency(half, 8192, 8192) == pytest.approx(hopper.gemm_efficiency_max / 2)
    assert hopper.gemm_efficiency(8192, 8192, 8192) > hopper.gemm_efficiency(8192, 8192, 1024)


@pytest.mark.parametrize(
    ("recompute", "sp", "per_token_factor"),
    [
        # Korthikanti Table 2, bytes per (s b h): TP only, TP+SP, TP+SP+selective; full recompute stores 2 s b h.
        ("none", False, 10 + 24 / 8 + 5 * 64 * 2048 / (6144 * 8)),
        ("none", True, 34 / 8 + 5 * 64 * 2048 / (6144 * 8)),
        ("selective", True, 34 / 8),
        ("full", False, 2.0),
    ],
)
def test_layer_activations_match_korthikanti_table_2(recompute: str, sp: bool, per_token_factor: float) -> None:
    layout = Layout(tp=8, recompute=recompute, sequence_parallel=sp, micro_batch=1)  # type: ignore[arg-type]
    sbh = 2048 * 1 * 6144
    assert layer_activation_bytes(GPT22B, GPT_SETTINGS, layout) == pytest.approx(sbh * per_token_factor)


def test_full_recompute_flops_are_megatron_equation_3() -> None:
    s, h, layers, v = 2048, 6144, 48, 51200
    megatron = 96 * s * layers * h * h * (1 + s / (6 * h) + v / (16 * layers * h)) / s  # per token
    assert hardware_flops_per_token(GPT22B, s, "full", "materialized") == pytest.approx(megatron)


def test_model_flops_reproduce_korthikanti_22b_mfu() -> None:
    # 4 x 2048 tokens in 1.10 s on 8 A100s reported as MFU 0.415 (Table 5 note).
    flops = 4 * 2048 * GPT22B.train_flops_per_token(2048)
    assert flops / (1.10 * 8 * 312e12) == pytest.approx(0.415, abs=0.003)


def test_zero_stages_shard_states_over_data_parallel() -> None:
    settings = TrainSettings(seq_len=2048, global_batch_seqs=64)
    spec = preset("llama3-8b")
    base = memory_breakdown(spec, settings, Layout(dp_replicate=4, zero_stage=0))
    params = base.weights_bytes / 2
    zero1 = memory_breakdown(spec, settings, Layout(dp_shard=4, zero_stage=1))
    zero2 = memory_breakdown(spec, settings, Layout(dp_shard=4, zero_stage=2))
    assert base.optimizer_bytes == pytest.approx(12 * params)
    assert zero1.optimizer_bytes == pytest.approx(12 * params / 4)
    assert zero2.gradients_bytes == pytest.approx(4 * params / 4)
    assert zero2.weights_bytes == pytest.approx(2 * params)


def test_bubble_is_p_minus_1_over_v_micro_batch_slots() -> None:
    spec = preset("llama3-8b", vocab_size=256)  # a negligible output head keeps every stage equal
    cluster = make_cluster("h100-sxm-80gb", 8)
    settings = TrainSettings(seq_len=4096, global_batch_seqs=32)
    one = step_breakdown(spec, settings, Layout(pp=8, micro_batch=1), cluster)
    # 1F1B: (p - 1) slots of one micro-batch's stage time; the step holds m = 32 such slots plus the bubble.
    per_slot = (one.step_time_s - one.bubble_s - one.optimizer_s - one.dp_comm_s) / 32
    assert one.bubble_s == pytest.approx(7 * per_slot, rel=0.02)
    interleaved = step_breakdown(spec, settings, Layout(pp=8, micro_batch=1, pp_schedule="interleaved_1f1b",
                                                        virtual_stages=2), cluster)
    assert interleaved.bubble_s < 0.6 * one.bubble_s


def test_overlapped_collective_costs_its_excess_plus_the_sm_tax() -> None:
    assert overlapped_s(1.0, 3.0) == pytest.approx(OVERLAP_SM_TAX * 1.0)
    assert overlapped_s(3.0, 1.0) == pytest.approx(2.0 + OVERLAP_SM_TAX * 1.0)


def test_failure_rate_from_llama3_snapshot() -> None:
    rate = llama3_failures_per_device_hour()
    assert rate == pytest.approx(419 / (16384 * 54 * 24))
    assert 1 / rate == pytest.approx(50_700, rel=0.01)  # "about 50,700 GPU-hours per interruption"
    assert 1 / (rate * 16384) == pytest.approx(3.1, abs=0.05)  # job MTBF about 3.1 h at 16K GPUs


def test_young_daly_interval_matches_the_reference_example() -> None:
    mtbf_s = 185.6 * 60
    assert young_daly_interval_s(60, mtbf_s) == pytest.approx(math.sqrt(2 * 60 * mtbf_s) - 60)
    # Young's first-order value is the reliability note's "about 19.3 min"; Daly's subtracts delta.
    assert (young_daly_interval_s(60, mtbf_s) + 60) / 60 == pytest.approx(19.3, abs=0.05)


def test_goodput_by_hand() -> None:
    # One device failing every 10,000 s; checkpoints of 1e12 bytes at 1e10 B/s = 100 s; no restart cost.
    settings = ReliabilitySettings(failures_per_device_hour=0.36, storage_write_bytes_per_s=1e10,
                                   checkpoint_bytes_per_param=1.0, restart_s=0.0)
    plan = plan_reliability(1, 1e12, 1e6, settings)
    tau = math.sqrt(2 * 100 * 10_000) - 100
    assert plan.checkpoint_interval_s == pytest.approx(tau)
    assert plan.goodput == pytest.approx(1 - (100 / (tau + 100) + tau / 2 / 10_000))


def test_kv_cache_and_weight_bytes_for_llama3_8b_fp8() -> None:
    spec = preset("llama3-8b")
    assert kv_bytes_per_token(spec, "fp8") == 2 * 32 * 8 * 128
    linear = 32 * (4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert weights_bytes(spec, "fp8") == pytest.approx(linear + (spec.num_params() - linear) * 2)


def test_low_batch_decode_is_bound_by_reading_the_weights() -> None:
    spec = preset("llama3-8b")
    cluster = make_cluster("h100-sxm-80gb", 1)
    settings = ServeSettings(input_tokens=128, output_tokens=1, weight_dtype="bf16", kv_dtype="bf16")
    step = decode_step_time_s(spec, cluster, settings, 1, prefill=False)
    # Every weight but the embedding table (one row per token is read) streams from HBM once per step.
    floor = (weights_bytes(spec, "bf16") - 128256 * 4096 * 2) / (3350e9 * 0.80)
    assert floor * 0.95 < step < floor * 1.3


def test_mfu_is_model_flops_over_time_devices_and_peak() -> None:
    cluster = make_cluster("a100-sxm-80gb", 8)
    step = step_breakdown(GPT22B, GPT_SETTINGS, Layout(tp=8, micro_batch=4, sequence_parallel=True,
                                                       recompute="selective"), cluster)
    assert step.mfu(cluster, "bf16") == pytest.approx(step.model_flops / (step.step_time_s * 8 * 312e12))
    assert step.hfu(cluster, "bf16") > step.mfu(cluster, "bf16")
    slower = replace(cluster, n_devices=8)
    assert step_breakdown(GPT22B, GPT_SETTINGS, Layout(tp=8, micro_batch=4), slower).step_time_s > 0


def test_mla_attention_products_use_the_192_and_128_wide_heads() -> None:
    from aiinfra.plan.runs import setup_from_row
    from aiinfra.plan.step import attention_product_flops
    from aiinfra.plan.validation import load_training_runs

    row = next(r for r in load_training_runs() if r["model"] == "deepseek-v3" and r["seq_len"])
    setup = setup_from_row(row)
    assert (setup.settings.qk_head_dim, setup.settings.v_head_dim) == (192, 128)
    seq = setup.settings.seq_len
    # 2 x m x seq x heads x (192 + 128) for m = 1 token and all 128 heads; MHA of width 7168 / 128 = 56 would be
    # 2 x seq x 128 x (56 + 56).
    assert attention_product_flops(setup.spec, setup.settings, 1, 128) == pytest.approx(2 * seq * 128 * 320)
    plain = replace(setup.settings, qk_head_dim=0, v_head_dim=0)
    assert attention_product_flops(setup.spec, plain, 1, 128) == pytest.approx(2 * seq * 128 * 112)


def test_token_dropping_experts_compute_their_whole_capacity_buffer() -> None:
    from aiinfra.plan.moe_routing import expert_tokens

    mixtral = ModelSpec(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                        max_seq_len=4096, n_experts=8, experts_per_token=2)
    layout = Layout(tp=1, pp=1, dp_replicate=1, dp_shard=8, ep=1, micro_batch=1)
    # 4096 tokens x top-2 / 8 experts = 1024 rows each; capacity factor 1.25 pads every expert to 1280.
    assert expert_tokens(mixtral, layout, 4096) == pytest.approx(1024)
    assert expert_tokens(mixtral, layout, 4096, 1.25) == pytest.approx(1280)
    assert expert_tokens(mixtral, replace(layout, ep=8), 4096) == pytest.approx(8192)


def test_serving_expert_rows_and_permutation_traffic_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiinfra.plan import inference

    moe = ModelSpec(vocab_size=151936, dim=2048, n_layers=48, n_heads=16, n_kv_heads=4, ffn_dim=768,
                    max_seq_len=4096, n_experts=128, experts_per_token=8)
    assert inference.expert_rows(moe, 1) == pytest.approx(1.0)  # one token: 8 experts, one row each
    # 4096 tokens touch all 128 experts: 4096 x 8 / 128 = 256 rows each.
    assert inference.expert_rows(moe, 4096) == pytest.approx(256, rel=1e-6)
    cluster = make_cluster("b200", 1)
    settings = ServeSettings(1000, 1000, weight_dtype="fp4", kv_dtype="fp8")
    with_permute = decode_step_time_s(moe, cluster, settings, 64)
    monkeypatch.setattr(inference, "MOE_MODULE_BYTES_PER_COPY_ELEMENT", 0.0)
    without = decode_step_time_s(moe, cluster, settings, 64)
    # 64 decode + 64 prefill tokens x 48 layers x 8 copies x 2048 x 13.8 bytes over the datasheet HBM bandwidth.
    per_element = 12.37e-9 * 8e12 / 7168
    assert with_permute - without == pytest.approx(128 * 48 * 8 * 2048 * per_element / cluster.memory_bw_bytes_per_s)


def test_qwen3_moe_attention_heads_are_128_wide() -> None:
    from aiinfra.plan.runs import setup_from_row
    from aiinfra.plan.step import attention_product_flops
    from aiinfra.plan.validation import load_training_runs

    row = next(r for r in load_training_runs() if r["model"] == "qwen3-moe")
    setup = setup_from_row(row)
    assert setup.spec.head_dim == 128  # config.json head_dim, while hidden / heads is 64
    # 2 x seq x 64 heads x (128 + 128) per token.
    assert attention_product_flops(setup.spec, setup.settings, 1, 64) == pytest.approx(
        2 * setup.settings.seq_len * 64 * 256)


def test_sequence_parallel_ranks_dispatch_only_their_own_tokens() -> None:
    from aiinfra.plan.step import layer_forward_times

    moe = ModelSpec(vocab_size=32000, dim=4096, n_layers=8, n_heads=32, n_kv_heads=8, ffn_dim=2048,
                    max_seq_len=4096, n_experts=64, experts_per_token=4)
    cluster = make_cluster("h100-sxm-80gb", 64)
    settings = TrainSettings(seq_len=4096, global_batch_seqs=64)
    layout = Layout(tp=2, pp=1, dp_replicate=1, dp_shard=32, ep=8, micro_batch=1, sequence_parallel=True)
    # Each TP rank sends its 4096 / 2 tokens x 4 copies x 4096 x 2 bytes, dispatch and combine (Megatron-Core
    # token_dispatcher.py: num_local_tokens = S/TP*B).
    one_way = collective_time_s(cluster, "all_to_all", 2048 * 4 * 4096 * 2, 8, 2)
    assert layer_forward_times(moe, settings, layout, cluster).ep_comm_s == pytest.approx(2 * one_way)
    whole = collective_time_s(cluster, "all_to_all", 4096 * 4 * 4096 * 2, 8, 2)
    no_sp = replace(layout, sequence_parallel=False)
    assert layer_forward_times(moe, settings, no_sp, cluster).ep_comm_s == pytest.approx(2 * whole)


def test_sliding_window_layers_compute_only_the_tiles_their_window_reaches() -> None:
    from aiinfra.plan.step import flash_tile_fraction

    full = TrainSettings(seq_len=4096, global_batch_seqs=8)
    assert flash_tile_fraction(full) == pytest.approx(0.5 * (1 + 128 / 4096))
    # GPT-OSS: half the layers see a 128-token window, (128 + 128) / 4096 of the square; the other half are causal.
    gpt_oss = replace(full, attention_window=128, window_layer_share=0.5)
    assert flash_tile_fraction(gpt_oss) == pytest.approx(0.5 * 0.5 * (1 + 128 / 4096) + 0.5 * 256 / 4096)


def test_tensorwise_fp8_reads_each_cast_input_once_more_for_its_amax() -> None:
    from aiinfra.plan.step import layer_forward_times

    spec = preset("llama3-8b")
    cluster = make_cluster("h100-sxm-80gb", 8)
    delayed = TrainSettings(seq_len=8192, global_batch_seqs=8, precision="fp8")
    layout = Layout(tp=1, pp=1, dp_replicate=1, dp_shard=8, micro_batch=1)
    base = layer_forward_times(spec, delayed, layout, cluster).elementwise_s
    dynamic = layer_forward_times(spec, replace(delayed, fp8_amax_pass=True), layout, cluster).elementwise_s
    # The four linear inputs of a layer (h, q width, h, ffn) of 8192 tokens, 2 more bytes each.
    extra = 8192 * 2 * (2 * spec.dim + spec.n_heads * spec.head_dim + spec.ffn_dim)
    assert dynamic - base == pytest.approx(extra / (cluster.memory_bw_bytes_per_s * 0.80))


def test_transformer_engine_keeps_fp8_linear_inputs_in_one_byte() -> None:
    from aiinfra.plan.memory import activation_terms

    spec = preset("llama3-8b")
    bf16_inputs = TrainSettings(seq_len=8192, global_batch_seqs=8, precision="fp8")
    te = replace(bf16_inputs, fp8_saved_inputs=True)
    plain, quantized = activation_terms(spec, bf16_inputs, 1), activation_terms(spec, te, 1)
    # The two norm outputs (h each), the attention output (q width) and the down-projection input (ffn) keep
    # 1 byte instead of 2.
    assert plain.replicated_bytes - quantized.replicated_bytes == pytest.approx(2 * spec.dim)
    saved = plain.split_bytes - quantized.split_bytes
    assert saved == pytest.approx(spec.n_heads * spec.head_dim + spec.ffn_dim)


def test_gemma3_rows_carry_its_local_global_pattern_and_256_wide_heads() -> None:
    from aiinfra.plan.runs import setup_from_row
    from aiinfra.plan.step import flash_tile_fraction
    from aiinfra.plan.validation import load_training_runs

    setup = setup_from_row(next(r for r in load_training_runs() if r["model"] == "gemma"))
    settings = setup.settings
    # Gemma 3 12B by its published shape (hidden 3840, 48 layers): config.json head_dim 256, hidden / heads 240.
    assert setup.spec.head_dim == 256 and settings.post_norms == 2 and settings.qk_norm
    # Five 1024-token local layers for each global one (Gemma 3 report): at 32768 tokens the local layers compute
    # (1024 + 128) / 32768 of the square, the global ones the causal half.
    causal = 0.5 * (1 + 128 / 32768)
    assert flash_tile_fraction(settings) == pytest.approx(causal / 6 + 5 / 6 * 1152 / 32768)


def test_head_width_column_and_published_head_widths_size_the_projections() -> None:
    from aiinfra.plan.runs import RowNotRepresentable, spec_from_row
    from aiinfra.plan.validation import load_training_runs

    rows = {r["id"]: r for r in load_training_runs()}
    # MaxText 52B test model (base.yml head_dim 256): L 32, h 12288, 32 heads x 256 = 8192-wide q/k/v/o, 2-matrix
    # MLP 49152, tied vocab 32768: 32 x (4 x 12288 x 8192 + 2 x 12288 x 49152) + 32768 x 12288 = 51.9B (the row's
    # params_b), against 58.3B with hidden x hidden projections. Biases and norms add 32 x (3 x 8192 + 2 x 12288 +
    # 49152 + 4 x 12288) + 2 x 12288 + 2048 x 12288 (learned positions).
    spec = spec_from_row(rows["maxtext-v4-52b-x1"])
    assert spec.head_dim == 256
    weights = 32 * (4 * 12288 * 8192 + 2 * 12288 * 49152) + 32768 * 12288
    extras = 32 * (3 * 8192 + 12288 + 49152 + 12288 + 4 * 12288) + 2 * 12288 + 2048 * 12288
    assert spec.num_params() == weights + extras
    assert spec.num_params() / 1e9 == pytest.approx(51.9, abs=0.1)
    # Qwen3-235B-A22B (config.json head_dim 128, 64 query and 4 KV heads, hidden 4096): with 8192-wide query
    # projections the parameter totals give the published 128 experts, top-8, width 1536 (no spurious shared experts).
    qwen = spec_from_row(rows["bridge2606-qwen3-235b-gb200x256-mxfp8"])
    assert (qwen.head_dim, qwen.n_experts, qwen.experts_per_token) == (128, 128, 8)
    assert qwen.ffn_dim == pytest.approx(1536, abs=1)
    with pytest.raises(RowNotRepresentable):
        spec_from_row({**rows["maxtext-v4-52b-x1"], "head_dim": "0"})


def test_megablox_grouped_gemm_visits_a_straddling_row_tile_once_per_expert() -> None:
    from aiinfra.plan.moe_routing import grouped_gemm_rows
    from aiinfra.plan.step import layer_forward_times

    # 256 experts of 768 rows in 512-row tiles: 256 x 768 / 512 = 384 tiles plus 255 straddling visits, i.e.
    # 768 + 512 x 255 / 256 = 1278 rows an expert.
    assert grouped_gemm_rows(768, 256, 512) == pytest.approx((384 + 255) * 512 / 256)
    assert grouped_gemm_rows(768, 1, 512) == 768 and grouped_gemm_rows(768, 256, 0) == 768
    moe = ModelSpec(vocab_size=32000, dim=4096, n_layers=8, n_heads=32, n_kv_heads=8, ffn_dim=2048,
                    max_seq_len=4096, n_experts=64, experts_per_token=4)
    cluster = make_cluster("tpu-v5p", 64)
    plain = TrainSettings(seq_len=4096, global_batch_seqs=64)
    layout = Layout(dp_shard=64, micro_batch=1)
    tiled = replace(plain, grouped_gemm_row_tile=512)
    # Dropless: the tiled kernel is never faster; a capacity buffer (token dropping) is not ragged.
    assert layer_forward_times(moe, tiled, layout, cluster).mlp_gemm_s > \
        layer_forward_times(moe, plain, layout, cluster).mlp_gemm_s
    dropped = replace(plain, moe_capacity_factor=1.25)
    assert layer_forward_times(moe, replace(dropped, grouped_gemm_row_tile=512), layout, cluster).mlp_gemm_s == \
        pytest.approx(layer_forward_times(moe, dropped, layout, cluster).mlp_gemm_s)


def test_a_tpu_collective_never_sends_more_than_its_links_carry() -> None:
    # Cloud TPU docs: v5p 1200 GB/s bidirectional ICI per chip (6 links x 100 GB/s each way), so at most 600 GB/s
    # leave a chip; v4 45 GB/s x 6 links = 270 GB/s one way. At 80% collective efficiency, inside a slice:
    for name, one_way in (("tpu-v5p", 600e9), ("tpu-v4", 270e9), ("tpu-v5e", 200e9), ("tpu-v6e", 400e9)):
        cluster = make_cluster(name, 64)
        bandwidth, _ = group_bandwidth_bytes_per_s(cluster, 16, 1)
        assert bandwidth == pytest.approx(one_way * cluster.efficiency.collective_bw_efficiency)


def test_torchtitan_selective_checkpointing_reruns_every_second_matmul() -> None:
    from aiinfra.plan.step import (
        SELECTIVE_ELEMENTWISE_SHARE,
        _gemm_time_s,
        alternate_mm_shapes,
        hardware_flops_per_token,
        layer_forward_times,
        layer_micro_batch_times,
    )

    spec = preset("llama3-8b")
    layout = Layout(dp_shard=8, micro_batch=1, recompute="selective")
    # Execution order q, k, v, o, w1, w3, w2: the 2nd, 4th and 6th are k (4096 x 1024), o (4096 x 4096), w3
    # (4096 x 14336).
    assert alternate_mm_shapes(spec, layout) == [(4096, 1024), (4096, 4096), (4096, 14336)]
    cluster = make_cluster("a100-sxm-80gb", 8)
    plain = TrainSettings(seq_len=8192, global_batch_seqs=8)
    titan = replace(plain, selective_recomputes_alternate_mms=True)
    extra = sum(_gemm_time_s(cluster, "bf16", 8192, k, n) for k, n in [(4096, 1024), (4096, 4096), (4096, 14336)])
    # Its _save_list keeps no elementwise output, so all of the layer's elementwise forward reruns, not half.
    extra += (1 - SELECTIVE_ELEMENTWISE_SHARE) * layer_forward_times(spec, plain, layout, cluster).elementwise_s
    assert layer_micro_batch_times(spec, titan, layout, cluster).compute_s == pytest.approx(
        layer_micro_batch_times(spec, plain, layout, cluster).compute_s + extra)
    # HFU counts them: 2 x (4096 x 1024 + 4096 x 4096 + 4096 x 14336) FLOPs a token per layer, 32 layers.
    assert hardware_flops_per_token(spec, 8192, "selective", "flash", alternate_mms=True) - \
        hardware_flops_per_token(spec, 8192, "selective", "flash") == pytest.approx(
            32 * 2 * 4096 * (1024 + 4096 + 14336))


def test_xla_full_recompute_leaves_out_the_mlp_down_projection() -> None:
    from aiinfra.plan.runs import setup_from_row
    from aiinfra.plan.step import _gemm_time_s, hardware_flops_per_token, layer_forward_times, layer_micro_batch_times
    from aiinfra.plan.validation import load_training_runs

    rows = load_training_runs()
    assert setup_from_row(next(r for r in rows if r["framework"] == "jax")).settings.recompute_drops_output_gemm
    assert not setup_from_row(next(r for r in rows if r["framework"] == "megatron")).settings \
        .recompute_drops_output_gemm
    spec = preset("llama3-8b")  # swiglu: w2 is 14336 -> 4096
    cluster = make_cluster("tpu-v5p", 8)
    layout = Layout(dp_shard=8, micro_batch=1, recompute="full")
    plain = TrainSettings(seq_len=8192, global_batch_seqs=8)
    xla = replace(plain, recompute_drops_output_gemm=True)
    # One micro-batch of 8192 tokens: the recomputed forward is shorter by the w2 GEMM, 8192 x 14336 -> 4096.
    w2 = _gemm_time_s(cluster, "bf16", 8192, 14336, 4096)
    assert layer_micro_batch_times(spec, xla, layout, cluster).compute_s == pytest.approx(
        layer_micro_batch_times(spec, plain, layout, cluster).compute_s - w2)
    # HFU: 2 x 4096 x 14336 FLOPs a token per layer fewer, 32 layers; none without full recompute.
    assert hardware_flops_per_token(spec, 8192, "full", "flash") - \
        hardware_flops_per_token(spec, 8192, "full", "flash", drops_output_gemm=True) == pytest.approx(
            32 * 2 * 4096 * 14336)
    assert hardware_flops_per_token(spec, 8192, "selective", "flash", drops_output_gemm=True) == \
        hardware_flops_per_token(spec, 8192, "selective", "flash")
    # Tensor parallel with sequence parallelism: of the recomputed all-gather/reduce-scatter pairs (2 all-reduces'
    # worth), the reduce-scatter after w2 is not rerun: 0.75 of a forward's TP traffic instead of 1.
    tp = Layout(tp=4, dp_shard=2, micro_batch=1, recompute="full", sequence_parallel=True)
    full = layer_micro_batch_times(spec, plain, tp, cluster)
    dropped = layer_micro_batch_times(spec, xla, tp, cluster)
    forward_tp = layer_forward_times(spec, plain, tp, cluster).tp_comm_s  # not overlapped (tp_overlap off)
    assert forward_tp > 0
    assert full.tp_comm_exposed_s - dropped.tp_comm_exposed_s == pytest.approx(0.25 * forward_tp)


def test_post_norms_and_qk_norm_read_and_write_their_tensors_once_more() -> None:
    from aiinfra.plan.runs import setup_from_row
    from aiinfra.plan.step import layer_forward_times
    from aiinfra.plan.validation import load_training_runs

    rows = load_training_runs()
    gemma = setup_from_row(next(r for r in rows if r["model"] == "gemma"))
    qwen = setup_from_row(next(r for r in rows if r["model"] == "qwen3-moe"))
    assert (gemma.settings.post_norms, gemma.settings.qk_norm) == (2, True)
    assert (qwen.settings.post_norms, qwen.settings.qk_norm) == (0, True)
    spec = ModelSpec(vocab_size=32000, dim=4096, n_layers=4, n_heads=32, n_kv_heads=8, ffn_dim=11008,
                     max_seq_len=4096)
    cluster = make_cluster("h100-sxm-80gb", 8)
    layout = Layout(dp_shard=8, micro_batch=1)
    plain = TrainSettings(seq_len=4096, global_batch_seqs=8)
    normed = replace(plain, post_norms=2, qk_norm=True)
    # Two post-norms: 4096 tokens x 4096 x 2 bytes read + written each; QK-norm: q (4096) and k (8 x 128) read and
    # written: 4096 x (4096 + 1024) x 2 x 2 bytes; all at 80% of 3.35 TB/s.
    extra = (2 * 4096 * 4096 * 2 * 2 + 4096 * (4096 + 1024) * 2 * 2) / (3350e9 * 0.80)
    assert layer_forward_times(spec, normed, layout, cluster).elementwise_s == pytest.approx(
        layer_forward_times(spec, plain, layout, cluster).elementwise_s + extra)


def test_an_fp8_cast_writes_the_quantized_input_and_its_transpose() -> None:
    from aiinfra.plan.step import layer_forward_times

    spec = ModelSpec(vocab_size=32000, dim=4096, n_layers=4, n_heads=32, n_kv_heads=8, ffn_dim=11008,
                     max_seq_len=4096)
    cluster = make_cluster("h100-sxm-80gb", 8)
    layout = Layout(dp_shard=8, micro_batch=1)
    bf16 = TrainSettings(seq_len=4096, global_batch_seqs=8)
    fp8 = replace(bf16, precision="fp8")
    # Four linear inputs a layer (h, q, h, ffn wide), each read in bf16 (2 bytes) and written as fp8 and its fp8
    # transpose (1 + 1), at 80% of 3.35 TB/s.
    casts = 4096 * 4 * (2 * 4096 + 4096 + 11008) / (3350e9 * 0.80)
    assert layer_forward_times(spec, fp8, layout, cluster).elementwise_s == pytest.approx(
        layer_forward_times(spec, bf16, layout, cluster).elementwise_s + casts)


def test_sequence_parallel_fp8_inputs_are_quantized_before_the_gather_and_moe_casts_each_routed_copy() -> None:
    from aiinfra.plan.step import layer_forward_times

    cluster = make_cluster("h100-sxm-80gb", 8)
    bw = 3350e9 * 0.80
    bf16 = TrainSettings(seq_len=4096, global_batch_seqs=8)
    fp8 = replace(bf16, precision="fp8")
    dense = ModelSpec(vocab_size=32000, dim=4096, n_layers=4, n_heads=32, n_kv_heads=8, ffn_dim=11008,
                      max_seq_len=4096)
    sp = Layout(tp=2, dp_shard=4, micro_batch=1, sequence_parallel=True)
    # The two norm outputs: read 2 and write 1 on the rank's 4096 / 2 rows, then the fp8 transpose of the gathered
    # 4096 rows (read 1, write 1): 4096 x 4096 x (3 / 2 + 2) each; q (2048 wide here) and ffn (5504) cast whole.
    casts = (2 * 4096 * 4096 * (3 / 2 + 2) + 4096 * 4 * (2048 + 5504)) / bw
    assert layer_forward_times(dense, fp8, sp, cluster).elementwise_s == pytest.approx(
        layer_forward_times(dense, bf16, sp, cluster).elementwise_s + casts)
    # Under MoE the attention input is cast once and the MLP input once per routed copy (k = 4).
    moe = ModelSpec(vocab_size=32000, dim=4096, n_layers=4, n_heads=32, n_kv_heads=8, ffn_dim=2048,
                    max_seq_len=4096, n_experts=64, experts_per_token=4)
    flat = Layout(dp_shard=8, micro_batch=1)
    casts = 4096 * 4 * (4096 + 4 * 4096 + 4096 + 4 * 2048) / bw
    assert layer_forward_times(moe, fp8, flat, cluster).elementwise_s == pytest.approx(
        layer_forward_times(moe, bf16, flat, cluster).elementwise_s + casts)


def test_whole_layer_cpu_offload_moves_every_saved_tensor_under_the_passes() -> None:
    from aiinfra.plan.memory import layer_activation_bytes, stored_layer_bytes
    from aiinfra.plan.offload import layer_offload_exposed_s
    from aiinfra.plan.step import layer_micro_batch_times

    spec = preset("llama3-70b")
    cluster = make_cluster("gb200", 64)
    settings = TrainSettings(seq_len=8192, global_batch_seqs=128, precision="fp8")
    kept = Layout(dp_shard=64, zero_stage=3, micro_batch=2)
    half = replace(kept, offload_layer_fraction=0.5)
    full_bytes = stored_layer_bytes(spec, settings, kept)
    # Half the layers keep nothing on the device: the average layer holds half its activations.
    assert layer_activation_bytes(spec, settings, half) == pytest.approx(0.5 * full_bytes)
    # Transfers at 225 GB/s per direction (GB200's NVLink-C2C share), exposed beyond the pass they run under.
    fwd, bwd = 0.01, 0.02
    transfer = full_bytes / 225e9
    assert layer_offload_exposed_s(spec, settings, half, cluster, fwd, bwd) == pytest.approx(
        0.5 * (max(0.0, transfer - fwd) + max(0.0, transfer - bwd)))
    # A faster host link never slows the step; with no recomputation the compute is the kept layout's.
    fast = replace(cluster, accelerator=replace(cluster.accelerator, host_bw_gbs=900))
    slow_t = layer_micro_batch_times(spec, settings, half, cluster)
    fast_t = layer_micro_batch_times(spec, settings, half, fast)
    assert fast_t.other_comm_exposed_s <= slow_t.other_comm_exposed_s
    assert slow_t.compute_s == pytest.approx(layer_micro_batch_times(spec, settings, kept, cluster).compute_s)
