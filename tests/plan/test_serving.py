"""The serving engines' documented limits, against hand computations."""

import csv
import math
from dataclasses import replace

import pytest

from aiinfra.plan.cluster import make_cluster
from aiinfra.plan.efficiency import efficiency_table
from aiinfra.plan.inference import ServeSettings, decode_step_parts, plan_serving
from aiinfra.plan.serve_rows import serve_models, trtllm_bench_limits
from aiinfra.spec import preset


def test_trtllm_bench_sets_batch_and_token_limits_from_the_memory() -> None:
    spec = serve_models()["llama-3.1-8b"].spec  # 32 layers, 8 KV heads of 128
    memory = 80 * 2**30  # an 80 GB H100 holds 80 GiB
    per_token = 32 * 2 * 8 * 128 * 1  # fp8 KV cache: 65,536 bytes
    cache = (memory - spec.num_params() * 1.0) * 0.95  # fp8 weights, 1 byte each
    # 128 in / 128 out: 4,409 requests fit, capped at 4096; tokens 4096 x 2 = 8192 (a multiple of 1024).
    assert cache / (per_token * 256) > 4096
    assert trtllm_bench_limits(spec, memory, 1, "fp8", "fp8", 128, 128) == (4096, 8192)
    # 1000 / 1000: 564 requests -> 128 x ceil(564 / 128) = 640; tokens 1129 -> at least 2048.
    requests = cache / (per_token * 2000)
    assert 512 < requests < 640
    assert trtllm_bench_limits(spec, memory, 1, "fp8", "fp8", 1000, 1000) == (640, 2048)
    # NVFP4 weights take half a byte, a 16-bit KV cache two: 20000 / 2000 on one 180 GiB B200 -> at least 64.
    big = serve_models()["llama-3.3-70b"].spec
    raw = (180 * 2**30 - big.num_params() * 0.5) * 0.95 / (80 * 2 * 8 * 128 * 2 * 22000)
    assert trtllm_bench_limits(big, 180 * 2**30, 1, "fp4", "bf16", 20000, 2000) == (
        max(64, 32 * math.ceil(raw / 32)), 2048)


def test_reserving_whole_sequences_admits_fewer_of_them() -> None:
    spec = serve_models()["llama-3.1-8b"].spec
    cluster = make_cluster("h100-sxm-80gb", 1)
    average = ServeSettings(1000, 1000, weight_dtype="fp8", kv_dtype="fp8", max_batch=4096, max_tokens_per_step=32768)
    reserved = replace(average, reserve_whole_sequence=True)
    held, whole = plan_serving(spec, cluster, average), plan_serving(spec, cluster, reserved)
    assert held.limited_by == whole.limited_by == "kv-cache"
    # The same KV cache over 1000 + 500 held tokens a sequence, or over the whole 2000 reserved.
    assert whole.batch == math.floor(held.kv_cache_bytes_per_device / (2000 * held.kv_bytes_per_token))
    assert held.batch == math.floor(held.kv_cache_bytes_per_device / (1500 * held.kv_bytes_per_token))


def test_a_speculative_decoding_row_is_not_run_with_its_reason() -> None:
    import pytest

    from aiinfra.plan.runs import RowNotRepresentable
    from aiinfra.plan.serve_rows import _predict_inference_row

    row = {"id": "x", "system": "TensorRT-LLM trtllm-bench", "model": "llama-3.1-8b", "hardware": "b200",
           "n_devices": "1", "tp": "1", "precision": "fp8", "input_tokens": "1024", "output_tokens": "2048",
           "metric": "ms_per_token_low_batch", "value": "3", "speculative": "mtp-3"}
    with pytest.raises(RowNotRepresentable, match=r"speculative decoding \(mtp-3\)"):
        _predict_inference_row(row, serve_models())
    assert _predict_inference_row({**row, "speculative": ""}, serve_models()).predicted > 0


def test_a_step_takes_the_longer_of_the_kernels_and_the_host_work() -> None:
    from aiinfra.plan.inference import decode_step_parts, decode_step_time_s, host_step_s
    from aiinfra.plan.serve_rows import ENGINE_HOST_S_PER_REQUEST

    # PR #10273's host-bound iteration: 45.11 ms for 1536 requests on one rank, 29.37 us a request.
    assert math.isclose(ENGINE_HOST_S_PER_REQUEST["TensorRT-LLM"], 29.368e-6, rel_tol=1e-4)
    spec = serve_models()["llama-3.1-8b"].spec
    cluster = make_cluster("h100-sxm-80gb", 8)
    base = ServeSettings(1000, 1000, tp=8, host_s_per_request=30e-6)
    # Every rank schedules the whole batch: 1000 x 30 us = 30 ms; under attention DP its own 1000 / 8 -> 125: 3.75 ms.
    assert math.isclose(host_step_s(base, 1000), 30e-3)
    assert math.isclose(host_step_s(replace(base, attention_dp=True), 1000), 3.75e-3)
    assert math.isclose(host_step_s(replace(base, attention_dp=True), 1001), 126 * 30e-6)  # ceil(1001 / 8)
    kernels = sum(decode_step_parts(spec, cluster, base, 1000).values())
    assert kernels < 30e-3  # the 8B's kernels over 8 H100s are shorter than the host's 30 ms
    assert math.isclose(decode_step_time_s(spec, cluster, base, 1000), 30e-3)
    # With no host cost, or host work shorter than the kernels, the step is the kernels' sum.
    assert decode_step_time_s(spec, cluster, replace(base, host_s_per_request=0.0), 1000) == kernels
    dp = replace(base, attention_dp=True)
    assert decode_step_time_s(spec, cluster, dp, 1000) == sum(decode_step_parts(spec, cluster, dp, 1000).values())


def test_tensor_parallel_ranks_keep_copies_of_shared_kv_heads() -> None:
    from aiinfra.plan.inference import kv_replication

    models = serve_models()
    qwen, llama, r1 = models["qwen3-235b-a22b"].spec, models["llama-3.1-8b"].spec, models["deepseek-r1"]
    # 4 KV heads over 8 ranks: each kept on 2; 8 over 8: once; MLA's one latent: on all 8; attention DP: once.
    assert kv_replication(qwen, ServeSettings(1000, 1000, tp=8)) == 2
    assert kv_replication(llama, ServeSettings(1000, 1000, tp=8)) == 1
    mla = ServeSettings(1000, 1000, tp=8, kv_dim_per_layer=r1.kv_dim_per_layer)
    assert kv_replication(r1.spec, mla) == 8
    assert kv_replication(r1.spec, replace(mla, attention_dp=True)) == 1
    # The KV-cache bound on the batch falls by the copies: 8x fewer DeepSeek-R1 sequences under TP8 than the same
    # cache would hold once (the duplication TensorRT-LLM's DeepSeek-R1 throughput blog gives as the reason for ADP).
    cluster = make_cluster("h200", 8)
    tp_plan = plan_serving(r1.spec, cluster, replace(mla, max_batch=20000, max_tokens_per_step=10**5))
    per_seq = 1500 * tp_plan.kv_bytes_per_token
    assert tp_plan.limited_by == "kv-cache"
    assert tp_plan.batch == math.floor(tp_plan.kv_cache_bytes_per_device * 8 / (per_seq * 8))


def test_attention_dp_keeps_whole_attention_weights_and_halves_the_reductions() -> None:
    from aiinfra.plan.inference import WEIGHT_BYTES, decode_step_parts, weights_bytes

    spec = serve_models()["qwen3-235b-a22b"].spec
    cluster = make_cluster("h200", 8)
    tp = ServeSettings(1000, 1000, tp=8, max_batch=256)
    dp = replace(tp, attention_dp=True)
    # One all-gather + reduce-scatter pair per layer instead of two all-reduces: the same bytes, half as often.
    assert math.isclose(decode_step_parts(spec, cluster, dp, 256)["tp_comm"],
                        decode_step_parts(spec, cluster, tp, 256)["tp_comm"] / 2)
    attention = spec.n_layers * spec.attention_params() * WEIGHT_BYTES["fp8"]
    expected = weights_bytes(spec, "fp8") / 8 + attention * 7 / 8
    assert math.isclose(plan_serving(spec, cluster, dp).weights_bytes_per_device, expected)


def test_the_busiest_attention_dp_rank_prefills_whole_prompts() -> None:
    from aiinfra.plan.inference import busiest_rank_tokens, expected_ceil_share

    # N ~ Poisson(0.5) dealt over 8 ranks: the busiest gets 1 whenever 1 <= N <= 8, so E = P(N >= 1) (+ 2 P(N > 8)).
    assert math.isclose(expected_ceil_share(0.5, 8), 1 - math.exp(-0.5), rel_tol=1e-6)
    assert math.isclose(expected_ceil_share(3.0, 1), 3.0, rel_tol=1e-9)  # one rank takes them all: E[N]
    assert expected_ceil_share(0.0, 8) == 0.0
    settings = ServeSettings(1024, 2048, tp=8, attention_dp=True)
    # 1024 sequences finish at 0.5 a step; each rank decodes 128 and the busiest adds one whole 1024-token prompt
    # with probability 1 - e^-0.5, against 64 prompt tokens a rank when every rank shares every token.
    tokens, prompts = busiest_rank_tokens(settings, 1024)
    assert math.isclose(tokens, 128 + 1024 * (1 - math.exp(-0.5)), rel_tol=1e-6)
    shared = busiest_rank_tokens(replace(settings, attention_dp=False), 1024)
    assert shared == ((1024 + 512) / 8, 0.5 / 8)
    assert busiest_rank_tokens(settings, 1024, prefill=False) == (128, 0.0)


def test_an_unstated_attention_dp_takes_the_faster_configuration_for_moe() -> None:
    from aiinfra.plan.runs import RowNotRepresentable
    from aiinfra.plan.serve_rows import _predict_inference_row

    models = serve_models()
    row = {"id": "x", "system": "TensorRT-LLM trtllm-bench", "model": "llama-4-maverick-17b-128e",
           "hardware": "b200", "n_devices": "8", "tp": "8", "precision": "fp4", "input_tokens": "1000",
           "output_tokens": "1000", "metric": "output_tokens_per_s", "value": "1"}
    both = [_predict_inference_row({**row, "attention_dp": flag}, models).predicted for flag in ("yes", "no")]
    assert _predict_inference_row(row, models).predicted == max(both)
    # A dense model keeps tensor parallelism; an engine without attention DP too.
    dense = {**row, "model": "llama-3.1-70b"}
    assert _predict_inference_row(dense, models).predicted == _predict_inference_row(
        {**dense, "attention_dp": "no"}, models).predicted
    vllm = {**row, "system": "vLLM"}
    assert _predict_inference_row(vllm, models).predicted == _predict_inference_row(
        {**vllm, "attention_dp": "no"}, models).predicted
    # A row's kv_dtype overrides the precision's default cache; anything else is named.
    kv16 = _predict_inference_row({**dense, "kv_dtype": "bf16"}, models)
    assert kv16.batch < _predict_inference_row(dense, models).batch
    import pytest

    with pytest.raises(RowNotRepresentable, match="kv_dtype='int3'"):
        _predict_inference_row({**dense, "kv_dtype": "int3"}, models)


def test_a_serial_host_adds_its_fixed_step_time_to_the_kernels() -> None:
    from aiinfra.plan.inference import decode_step_parts, decode_step_time_s, host_step_s
    from aiinfra.plan.serve_rows import ENGINE_HOST_S_PER_STEP, ENGINES_WITH_SERIAL_HOST, _predict_inference_row

    # vLLM RFC #6854's profiled GPU bubble: about 4 ms every decode step, between the GPU's steps.
    assert ENGINE_HOST_S_PER_STEP["vLLM"] == 4e-3 and "vLLM" in ENGINES_WITH_SERIAL_HOST
    assert "TensorRT-LLM" not in ENGINES_WITH_SERIAL_HOST
    spec = serve_models()["llama-3.1-8b"].spec
    cluster = make_cluster("h100-sxm-80gb", 1)
    serial = ServeSettings(128, 128, host_s_per_step=4e-3, host_s_per_request=10e-6, host_overlapped=False)
    # Host: 4 ms + 64 x 10 us = 4.64 ms, added to the kernels' sum rather than hidden under it.
    assert math.isclose(host_step_s(serial, 64), 4.64e-3)
    kernels = sum(decode_step_parts(spec, cluster, serial, 64).values())
    assert math.isclose(decode_step_time_s(spec, cluster, serial, 64), kernels + 4.64e-3)
    assert decode_step_time_s(spec, cluster, replace(serial, host_overlapped=True), 64) == max(kernels, 4.64e-3)
    # A vLLM row's batch-1 latency is its decode kernels plus the 4 ms; the same row under TensorRT-LLM has none.
    row = {"id": "x", "system": "vLLM benchmark_latency.py", "model": "llama-3.1-8b", "hardware": "h100-sxm-80gb",
           "n_devices": "1", "tp": "1", "precision": "fp8", "input_tokens": "128", "output_tokens": "128",
           "metric": "ms_per_token_low_batch", "value": "5"}
    vllm = _predict_inference_row(row, serve_models()).predicted
    trtllm = _predict_inference_row({**row, "system": "TensorRT-LLM trtllm-bench"}, serve_models()).predicted
    assert math.isclose(vllm - trtllm, 4.0, rel_tol=1e-9)  # ms: a batch-1 step's host work is under its kernels


def test_nvfp4_gemm_saturates_at_its_own_half_dimension() -> None:
    blackwell = efficiency_table()["blackwell"]
    assert blackwell.fp4_gemm_half_dim == 400
    low = blackwell.fp8_gemm_efficiency_max
    # M = 400 tokens against 8192-wide weights: fp4 at half its ceiling, 0.50 x 400 / (400 + 400) = 0.25 ...
    assert blackwell.gemm_efficiency(400, 8192, 8192, "fp4") == pytest.approx(low * 400 / 800)
    # ... while fp8 keeps the 128-wide tile's half dimension: 0.50 x 400 / 528.
    assert blackwell.gemm_efficiency(400, 8192, 8192, "fp8") == pytest.approx(low * 400 / 528)
    # A generation without a measured fp4 half dimension uses its gemm_half_dim for fp4 too.
    hopper = efficiency_table()["hopper"]
    assert hopper.fp4_gemm_half_dim is None
    assert hopper.gemm_efficiency(400, 8192, 8192, "fp4") == hopper.gemm_efficiency(400, 8192, 8192, "fp8")


def test_decode_attention_reads_the_kv_cache_at_its_measured_bandwidth() -> None:
    spec = preset("llama3-8b")
    settings = ServeSettings(input_tokens=8192, output_tokens=1, weight_dtype="fp8", kv_dtype="fp8")
    # 64 sequences of 8192 tokens, 2 x 32 layers x 8 heads x 128 bytes a token, no prefill: the KV read bounds
    # decode attention (its 4 x 32 heads x 128 FLOPs a cached token are far under the fp8 peak).
    kv = 64 * 8192 * 2 * 32 * 8 * 128
    b200 = make_cluster("b200", 1)
    assert b200.efficiency.kv_read_bw_efficiency == 0.73
    attention = decode_step_parts(spec, b200, settings, 64, prefill=False)["attention"]
    assert attention == pytest.approx(kv / (8000e9 * 0.73))
    # Hopper at FlashMLA's 3000 GB/s of H800's 3.35 TB/s (efficiency.csv), above its elementwise share of HBM.
    h200 = make_cluster("h200", 1)
    assert h200.efficiency.kv_read_bw_efficiency == 0.895 > h200.efficiency.memory_bw_efficiency
    assert decode_step_parts(spec, h200, settings, 64, prefill=False)["attention"] == pytest.approx(
        kv / (4800e9 * 0.895))
    # Without a measured figure (CDNA3) the cache streams at the elementwise share of HBM.
    mi300x = make_cluster("mi300x", 1)
    assert mi300x.efficiency.kv_read_bw_efficiency == mi300x.efficiency.memory_bw_efficiency == 0.77
    assert decode_step_parts(spec, mi300x, settings, 64, prefill=False)["attention"] == pytest.approx(
        kv / (5300e9 * 0.77))


def test_gamma_cdf_and_the_expected_maximum_match_closed_forms() -> None:
    from aiinfra.plan.expert_load import expected_max_over_mean, gamma_cdf

    # Shape 1 is the exponential, shape 2 the Erlang of two stages.
    for x in (0.1, 1.0, 2.5, 9.0):
        assert math.isclose(gamma_cdf(1.0, x), 1 - math.exp(-x), rel_tol=1e-9)
        assert math.isclose(gamma_cdf(2.0, x), 1 - math.exp(-x) * (1 + x), rel_tol=1e-9)
    # The largest of n unit exponentials has mean H_n = 1 + 1/2 + ... + 1/n.
    for n in (2, 4, 8, 32):
        harmonic = sum(1 / i for i in range(1, n + 1))
        assert math.isclose(expected_max_over_mean(n, 1.0), harmonic, rel_tol=1e-4)
    assert expected_max_over_mean(1, 0.5) == 1.0


def test_the_busiest_expert_parallel_rank_gets_more_than_its_share() -> None:
    from aiinfra.plan.expert_load import EXPERT_LOAD_CV, busiest_rank_load

    assert busiest_rank_load(256, 1, 1e6) == 1.0
    # No popularity spread, one copy an expert on average, one expert a rank: each rank's load is Poisson(1) ~
    # gamma of shape 1 / (1 / 1 + 0) = 1, an exponential, so the busiest of 4 carries H_4 = 25/12 times the mean.
    assert math.isclose(busiest_rank_load(4, 4, 4, cv=0.0), 25 / 12, rel_tol=1e-4)
    # DeepSeek-R1 at EP32 with many tokens: the gamma reproduces the blog's spread but not its tail (2.564).
    ep32 = busiest_rank_load(256, 32, 1e7)
    assert 2.0 < ep32 < 2.564
    assert math.isclose(EXPERT_LOAD_CV, 1.282, rel_tol=1e-3)
    # More ranks over the same experts: a worse busiest rank; more experts a rank average out.
    assert busiest_rank_load(256, 8, 1e6) < busiest_rank_load(256, 16, 1e6) < ep32
    assert busiest_rank_load(128, 8, 1e6) > busiest_rank_load(256, 8, 1e6)


def test_expert_imbalance_slows_the_routed_experts_only_under_attention_dp(monkeypatch) -> None:
    from aiinfra.plan import inference
    from aiinfra.plan.expert_load import busiest_rank_load

    model = serve_models()["llama-4-scout-17b-16e"]
    spec = model.spec
    assert (spec.n_experts, spec.experts_per_token, model.shared_experts) == (17, 2, 1)
    settings = ServeSettings(1000, 1000, tp=4, attention_dp=True, shared_experts=1)
    cluster = make_cluster("h200", 4)
    loads: list[tuple[int, int, float]] = []

    def record(experts, ep, copies):
        loads.append((experts, ep, copies))
        return busiest_rank_load(experts, ep, copies)

    monkeypatch.setattr(inference, "busiest_rank_load", record)
    # 2048 decoding sequences plus their prompts at the rate sequences finish: 4096 tokens, one routed copy each
    # over the 16 routed experts (the shared expert is not routed).
    inference.decode_step_parts(spec, cluster, settings, 2048)
    assert loads == [(16, 4, 4096.0)]
    loads.clear()
    inference.decode_step_parts(spec, cluster, replace(settings, attention_dp=False), 2048)
    inference.decode_step_parts(spec, cluster, replace(settings, tp=1), 2048)
    assert loads == []
    monkeypatch.undo()
    # Counting the shared expert as routed spreads more of the work unevenly: only the GEMMs change.
    shared = inference.decode_step_parts(spec, cluster, settings, 2048)
    routed = inference.decode_step_parts(spec, cluster, replace(settings, shared_experts=0), 2048)
    assert routed["gemm"] != shared["gemm"]
    assert {k: v for k, v in routed.items() if k != "gemm"} == {k: v for k, v in shared.items() if k != "gemm"}


def test_attention_dp_runs_always_active_experts_whole_on_each_rank() -> None:
    from aiinfra.plan.inference import WEIGHT_BYTES, busiest_rank_tokens, linear_layers_s

    spec = serve_models()["llama-4-scout-17b-16e"].spec
    cluster = make_cluster("h200", 4)
    settings = ServeSettings(1000, 1000, tp=4, attention_dp=True, shared_experts=1)
    rank_tokens, _ = busiest_rank_tokens(settings, 2048)
    # One shared expert more: its gate/up and down GEMMs over the busiest rank's own tokens with all its weights.
    routed_only = replace(settings, shared_experts=0)
    peak = cluster.peak_flops("fp8")
    bandwidth = cluster.memory_bw_bytes_per_s * cluster.efficiency.memory_bw_efficiency
    extra = 0.0
    for k, n in ((spec.dim, 2 * spec.ffn_dim), (spec.ffn_dim, spec.dim)):
        compute = 2 * rank_tokens * k * n / (peak * cluster.efficiency.gemm_efficiency(rank_tokens, k, n, "fp8"))
        extra += max(compute, k * n * WEIGHT_BYTES["fp8"] / bandwidth)
    with_shared = linear_layers_s(spec, cluster, settings, 4096, rank_tokens)
    # The routed part differs too (16 experts of one copy instead of 17 of two), so compare against its own terms.
    routed_spec = spec.model_copy(update={"n_experts": 16, "experts_per_token": 1})
    assert math.isclose(with_shared - extra, linear_layers_s(routed_spec, cluster, routed_only, 4096, rank_tokens))
    # Memory: every rank holds the shared expert whole (3/4 of it more than a 1/4 slice).
    dp = plan_serving(spec, cluster, settings)
    base = plan_serving(spec, cluster, routed_only)
    assert math.isclose(dp.weights_bytes_per_device - base.weights_bytes_per_device,
                        spec.n_layers * spec.expert_params() * WEIGHT_BYTES["fp8"] * 3 / 4)


def test_attention_dp_experts_run_whole_on_their_rank(monkeypatch) -> None:
    from aiinfra.plan import inference
    from aiinfra.plan.efficiency import EfficiencyProfile

    spec = serve_models()["qwen3-235b-a22b"].spec
    cluster = make_cluster("h200", 8)
    seen: list[tuple[float, float, float]] = []
    original = EfficiencyProfile.gemm_efficiency

    def record(self, m, k, n, dtype="bf16"):
        seen.append((m, k, n))
        return original(self, m, k, n, dtype)

    monkeypatch.setattr(EfficiencyProfile, "gemm_efficiency", record)
    settings = ServeSettings(1000, 1000, tp=8, attention_dp=True)
    inference.decode_step_parts(spec, cluster, settings, 4096)
    mlp_in = 2 * spec.ffn_dim
    # The gate/up and down projections of each expert, whole (n = 2 x ffn and hidden), not a 1/8 slice.
    assert [call[1:] for call in seen[2:4]] == [(spec.dim, mlp_in), (spec.ffn_dim, spec.dim)]
    seen.clear()
    inference.decode_step_parts(spec, cluster, replace(settings, attention_dp=False), 4096)
    assert [call[1:] for call in seen[2:4]] == [(spec.dim, mlp_in / 8), (spec.ffn_dim, spec.dim / 8)]


def test_each_moe_layer_pays_the_fused_top_k_and_the_module_s_fixed_latency() -> None:
    import numpy as np

    from aiinfra.plan.expert_load import MOE_MODULE_FIXED_S_PER_LAYER, MOE_ROUTING_S_PER_LAYER
    from aiinfra.plan.inference import decode_step_parts

    models = serve_models()
    cluster = make_cluster("h200", 8)
    settings = ServeSettings(1000, 1000, tp=8)
    # TensorRT-LLM tech blog 3: 15 us a layer for the fused top-k kernels on B200; blog 24's CUTLASS module (router
    # and top-k included) fits 111 us whatever its tokens, so 96 us more a MoE layer.
    assert MOE_ROUTING_S_PER_LAYER == 15e-6
    tokens = np.array([64, 128, 192, 208, 224, 256, 272, 336, 384.0])
    latency_us = np.array([308.44, 335.65, 350.68, 354.73, 354.01, 351.98, 357.90, 363.58, 368.12])
    design = np.c_[np.ones_like(tokens), 256 * (1 - (1 - 8 / 256) ** tokens), 8 * tokens]
    intercept = np.linalg.lstsq(design, latency_us, rcond=None)[0][0]
    assert intercept == pytest.approx(111.0, abs=0.6)
    assert MOE_ROUTING_S_PER_LAYER + MOE_MODULE_FIXED_S_PER_LAYER == pytest.approx(111e-6)
    per_layer = MOE_ROUTING_S_PER_LAYER + MOE_MODULE_FIXED_S_PER_LAYER
    moe = models["qwen3-235b-a22b"].spec
    assert math.isclose(decode_step_parts(moe, cluster, settings, 512)["routing"], 94 * per_layer)
    assert math.isclose(decode_step_parts(moe, cluster, settings, 1, prefill=False)["routing"], 94 * per_layer)
    dense = models["llama-3.1-70b"].spec
    assert decode_step_parts(dense, cluster, settings, 512)["routing"] == 0.0


def test_only_the_moe_layers_of_an_interleaved_model_pay_the_moe_layer_costs() -> None:
    from aiinfra.plan.expert_load import MOE_MODULE_FIXED_S_PER_LAYER, MOE_ROUTING_S_PER_LAYER
    from aiinfra.plan.inference import decode_step_parts, tp_all_reduce_s

    model = serve_models()["llama-4-maverick-17b-128e"]
    assert (model.spec.n_layers, model.moe_layers) == (48, 24)  # interleave_moe_layer_step 2
    cluster = make_cluster("h200", 8)
    dp = ServeSettings(1000, 1000, tp=8, attention_dp=True, moe_layers=model.moe_layers)
    parts = decode_step_parts(model.spec, cluster, dp, 1024)
    assert parts["routing"] == pytest.approx(24 * (MOE_ROUTING_S_PER_LAYER + MOE_MODULE_FIXED_S_PER_LAYER))
    # Under attention DP only the MoE layers gather and scatter (a dense layer's MLP is data-parallel too); under
    # TP every layer all-reduces twice.
    exchange = tp_all_reduce_s(cluster, dp, (1024 + 1024) * model.spec.dim * 2)
    assert parts["tp_comm"] == pytest.approx(24 * exchange)
    tp = replace(dp, attention_dp=False)
    assert decode_step_parts(model.spec, cluster, tp, 1024)["tp_comm"] == pytest.approx(96 * exchange)
    # A model without the column (every layer MoE) counts every layer.
    every = replace(dp, moe_layers=0)
    assert decode_step_parts(model.spec, cluster, every, 1024)["tp_comm"] == pytest.approx(48 * exchange)


def test_mla_prefill_attention_uses_its_unabsorbed_head_widths() -> None:
    from aiinfra.plan.inference import busiest_rank_tokens, decode_step_parts

    model = serve_models()["deepseek-r1"]
    spec = model.spec
    assert model.prefill_qkv_head_width == 192 + 128  # DeepSeek-V3 config.json: qk 128 + 64 rotary, v 128
    assert serve_models()["qwen3-235b-a22b"].prefill_qkv_head_width == 128 + 128  # = 2 x head_dim: no change
    cluster = make_cluster("h200", 8)
    settings = ServeSettings(1024, 2048, tp=8, kv_dtype="bf16", attention_dp=True, kv_dim_per_layer=576,
                             prefill_qkv_head_width=320)
    _, prompts = busiest_rank_tokens(settings, 1024)
    # Per query-key pair and head 2 x (192 + 128) FLOPs instead of 4 x 56 (hidden / heads), causal half of 1024^2.
    extra = prompts * 2 * spec.n_heads * (320 - 2 * 56) * spec.n_layers * 1024 ** 2 / 2
    seconds = extra / (cluster.peak_flops("bf16") * cluster.efficiency.attention_efficiency)
    wide = decode_step_parts(spec, cluster, settings, 1024)["attention"]
    narrow = decode_step_parts(spec, cluster, replace(settings, prefill_qkv_head_width=0), 1024)["attention"]
    assert math.isclose(wide - narrow, seconds, rel_tol=1e-9)


def test_attention_dp_ranks_run_norms_over_their_own_tokens_and_permute_only_their_copies() -> None:
    from aiinfra.plan.expert_load import MOE_MODULE_BYTES_PER_COPY_ELEMENT as PER_COPY
    from aiinfra.plan.inference import busiest_rank_tokens

    spec = serve_models()["qwen3-235b-a22b"].spec  # 94 layers, hidden 4096, 128 experts top-8, expert ffn 1536
    cluster = make_cluster("b200", 8)
    bandwidth = cluster.memory_bw_bytes_per_s * cluster.efficiency.memory_bw_efficiency
    tp = ServeSettings(1000, 1000, weight_dtype="fp4", tp=8)
    dp = replace(tp, attention_dp=True)
    batch = 4096
    tokens = batch + batch * 1000 / 1000  # 4096 decoding plus 4096 prompt tokens a step
    rank_tokens, _ = busiest_rank_tokens(dp, batch)
    h, k, layers = spec.dim, spec.experts_per_token, spec.n_layers
    activation = tokens * 3 * spec.ffn_dim * k / 8  # a 1/tp share of the routed copies either way
    # Tensor parallelism: every rank normalizes every token and permutes every routed copy.
    peak = cluster.memory_bw_bytes_per_s
    by_hand_tp = layers * 2 * (tokens * 10 * h + activation) / bandwidth + tokens * k * layers * h * PER_COPY / peak
    assert decode_step_parts(spec, cluster, tp, batch)["elementwise"] == pytest.approx(by_hand_tp)
    # Attention DP: the busiest rank normalizes its own tokens and permutes the copies routed to its 16 experts.
    by_hand_dp = (layers * 2 * (rank_tokens * 10 * h + activation) / bandwidth
                  + tokens * k / 8 * layers * h * PER_COPY / peak)
    assert decode_step_parts(spec, cluster, dp, batch)["elementwise"] == pytest.approx(by_hand_dp)
    assert rank_tokens < tokens / 2


def test_moe_module_cost_a_copy_reproduces_the_blogs_cutlass_latencies() -> None:
    """MOE_MODULE_BYTES_PER_COPY_ELEMENT from TensorRT-LLM tech blog 24's CUTLASS column (one B200, NVFP4, hidden
    7168, 256 experts top-8, TP8 rank): the least-squares slope per routed copy over 64-384 tokens, with the weight
    reads of the touched experts as a second regressor, converted to bytes a hidden element at 8 TB/s."""
    import numpy as np

    from aiinfra.plan.expert_load import MOE_MODULE_BYTES_PER_COPY_ELEMENT as PER_COPY

    tokens = np.array([64, 128, 192, 208, 224, 256, 272, 336, 384.0])
    latency_us = np.array([308.44, 335.65, 350.68, 354.73, 354.01, 351.98, 357.90, 363.58, 368.12])
    touched = 256 * (1 - (1 - 8 / 256) ** tokens)
    design = np.c_[np.ones_like(tokens), touched, 8 * tokens]
    (fixed, per_expert, per_copy), *_ = np.linalg.lstsq(design, latency_us, rcond=None)
    assert per_copy * 1e3 == pytest.approx(12.37, abs=0.01)  # ns a routed copy
    assert per_expert == pytest.approx(0.86, abs=0.01)  # us an expert's 3.1 MB of NVFP4 weights
    assert np.abs(design @ [fixed, per_expert, per_copy] - latency_us).max() < 4.0
    assert PER_COPY == pytest.approx(per_copy * 1e-6 * 8e12 / 7168, rel=1e-3)  # 13.8 bytes a copy and element
    # On a rank the term is copies x layers x hidden x 13.8 bytes over the datasheet bandwidth: Qwen3-235B (94
    # layers, hidden 4096, top-8) on one H200 of a TP8 group, 8192 tokens a step, every rank permuting every copy.
    spec = serve_models()["qwen3-235b-a22b"].spec
    cluster = make_cluster("h200", 8)
    settings = ServeSettings(1000, 1000, weight_dtype="fp8", tp=8)
    parts = decode_step_parts(spec, cluster, settings, 4096)
    by_hand = 8192 * 8 * 94 * 4096 * PER_COPY / 4.8e12
    norms = 94 * 2 * (8192 * 10 * 4096 + 8192 * 3 * spec.ffn_dim * 8 / 8) / (4.8e12 * 0.80)
    assert parts["elementwise"] == pytest.approx(norms + by_hand)


def test_a_finite_benchmark_runs_its_requests_in_waves_of_the_batch() -> None:
    from aiinfra.plan.errors import PlanError
    from aiinfra.plan.inference import decode_step_time_s, finite_run_output_tokens_per_s

    spec = serve_models()["llama-3.1-8b"].spec
    cluster = make_cluster("h100-sxm-80gb", 1)
    settings = ServeSettings(128, 256)
    # 2500 requests at most 1000 at a time: two full waves of 256 steps at 1000, one of 256 steps at 500.
    seconds = 256 * (2 * decode_step_time_s(spec, cluster, settings, 1000)
                     + decode_step_time_s(spec, cluster, settings, 500))
    assert math.isclose(finite_run_output_tokens_per_s(spec, cluster, settings, 1000, 2500), 2500 * 256 / seconds)
    # Whole waves run at the steady state's rate; fewer requests than the batch run at their own, lower one.
    steady = 1000 / decode_step_time_s(spec, cluster, settings, 1000)
    assert math.isclose(finite_run_output_tokens_per_s(spec, cluster, settings, 1000, 3000), steady)
    assert finite_run_output_tokens_per_s(spec, cluster, settings, 1000, 400) < steady
    with pytest.raises(PlanError, match="requests=0"):
        finite_run_output_tokens_per_s(spec, cluster, settings, 1000, 0)


def test_a_row_names_its_request_count_or_gets_its_benchmark_procedures() -> None:
    from aiinfra.plan.runs import RowNotRepresentable
    from aiinfra.plan.serve_rows import _predict_inference_row, benchmark_requests

    row = {"id": "x", "system": "TensorRT-LLM max-throughput", "model": "llama-3.1-8b", "hardware": "b200",
           "n_devices": "1", "tp": "1", "precision": "fp8", "input_tokens": "128", "output_tokens": "4096",
           "metric": "output_tokens_per_s", "value": "3"}
    assert benchmark_requests(row) == 1500  # perf-overview's dataset table for 128/4096
    assert benchmark_requests({**row, "requests": "64"}) == 64
    assert benchmark_requests({**row, "input_tokens": "300"}) == 0  # lengths the table does not list
    assert benchmark_requests({**row, "system": "TensorRT-LLM trtllm-bench"}) == 0
    assert benchmark_requests({**row, "system": "vLLM benchmark_throughput.py"}) == 1000
    with pytest.raises(RowNotRepresentable, match="requests='-3'"):
        benchmark_requests({**row, "requests": "-3"})
    # 64 requests never fill a B200 that holds hundreds of 4k-token sequences: the batch is the request count.
    small = _predict_inference_row({**row, "requests": "64"}, serve_models())
    assert (small.batch, small.limited_by) == (64, "requests")
    assert small.predicted < _predict_inference_row(row, serve_models()).predicted


@pytest.mark.parametrize(("system", "engine"), [
    ("NVIDIA TensorRT-LLM", "TensorRT-LLM"), ("TensorRT LLM v0.17", "TensorRT-LLM"), ("tensorrt_llm", "TensorRT-LLM"),
    ("TRT-LLM max-throughput", "TensorRT-LLM"), ("trtllm-bench", "TensorRT-LLM"), ("vllm (ROCm)", "vLLM"),
    ("AMD vLLM 0.9", "vLLM"), ("SGLang v0.4.6", "SGLang"), ("TGI", "TGI"), ("", ""),
])
def test_an_engine_as_tables_name_it_is_its_own_spelling(system: str, engine: str) -> None:
    from aiinfra.plan.serve_rows import engine_name

    assert engine_name(system) == engine


def _qwen3_235b_h200_row() -> dict[str, str]:
    """The table's Qwen3-235B row on 8 H200 (fp8), as the CSV gives it."""
    from aiinfra.plan.serve_rows import INFERENCE_RUNS_CSV

    with open(INFERENCE_RUNS_CSV, newline="") as handle:
        return next(r for r in csv.DictReader(handle) if r["id"] == "trtllm-qwen3-235b-h200x8-fp8-1000")


def test_an_empty_precision_is_what_the_checkpoint_name_says() -> None:
    from aiinfra.plan.serve_rows import _predict_inference_row, name_precision

    assert (name_precision("Qwen/Qwen3-235B-A22B-FP8"), name_precision("nvidia/Llama-3.1-405B-Instruct-FP4"),
            name_precision("TheBloke/Llama-2-70B-Chat-AWQ"), name_precision("llama-3.1-70b")) == (
        "fp8", "fp4", "int4-weights", "")
    models = serve_models()
    row = _qwen3_235b_h200_row()
    stated = _predict_inference_row(row, models)
    named = _predict_inference_row({**row, "model": "Qwen/Qwen3-235B-A22B-FP8", "precision": ""}, models)
    assert named.predicted == stated.predicted
    # A stated precision wins over the name.
    bf16 = _predict_inference_row({**row, "model": "Qwen/Qwen3-235B-A22B-FP8", "precision": "bf16"}, models)
    assert bf16.predicted != stated.predicted


def test_an_inference_row_whose_hardware_counts_its_parts_needs_no_device_count() -> None:
    from aiinfra.plan.serve_rows import _predict_inference_row

    models = serve_models()
    row = _qwen3_235b_h200_row()
    stated = _predict_inference_row(row, models)
    counted = _predict_inference_row({**row, "hardware": "8x H200", "n_devices": ""}, models)
    assert counted.predicted == stated.predicted


def test_mi300x_streams_skinny_gemm_weights_at_hipblaslts_measured_rate() -> None:
    # HF/AMD blog (huggingface/blog mi300kernels.md): torch's hipBLASLt FP8 GEMMs at M = 1 on Llama 3.1 405B's TP8
    # shapes: QKV 2304 x 16384 in 14.938 us, gate/up 13312 x 16384 in 77.636 us, down 16384 x 6656 in 31.066 us.
    weights = 2304 * 16384 + 13312 * 16384 + 16384 * 6656
    assert weights == pytest.approx(365.0e6, rel=1e-3)
    rate = weights / (14.938e-6 + 77.636e-6 + 31.066e-6)
    mi300x = make_cluster("mi300x", 8)
    assert mi300x.efficiency.weight_stream_bw_efficiency == pytest.approx(rate / 5.3e12, abs=5e-4) == 0.557
    assert mi300x.efficiency.gemm_bw_efficiency == 0.557 < mi300x.efficiency.memory_bw_efficiency
    # A batch-1 decode step reads every weight once: the linear layers take their bytes at that rate.
    spec = preset("llama3-8b")
    settings = ServeSettings(input_tokens=1, output_tokens=128, weight_dtype="fp8", kv_dtype="fp8")
    from aiinfra.plan.inference import linear_layers_s

    one = linear_layers_s(spec, make_cluster("mi300x", 1), settings, 1, 1)
    h, q, kv, f = 4096, 4096, 1024, 14336
    assert one == pytest.approx((h * (q + 2 * kv) + q * h + h * 2 * f + f * h) / (5.3e12 * 0.557), rel=1e-6)
    # Generations without a measured figure stream at their elementwise share.
    assert make_cluster("h100-sxm-80gb", 1).efficiency.gemm_bw_efficiency == \
        make_cluster("h100-sxm-80gb", 1).efficiency.memory_bw_efficiency


def test_a_layers_norm_and_activation_kernels_take_their_measured_floor_at_tiny_batches() -> None:
    # The same blog: vLLM's fused add + RMSNorm kernel takes 5.5145 us at one row of 16384, its SwiGLU 3.84116 us.
    floor = 2 * 5.5145e-6 + 3.84116e-6
    mi300x = make_cluster("mi300x", 1)
    assert mi300x.efficiency.layer_elementwise_floor_s == pytest.approx(floor, rel=1e-3)
    spec = preset("llama3-8b")
    settings = ServeSettings(input_tokens=1, output_tokens=128, weight_dtype="fp8", kv_dtype="fp8")
    one = decode_step_parts(spec, mi300x, settings, 1, prefill=False)["elementwise"]
    assert one == pytest.approx(spec.n_layers * mi300x.efficiency.layer_elementwise_floor_s)
    # At a serving batch the bytes take longer than the floor, and a generation without one is unchanged.
    many = decode_step_parts(spec, mi300x, settings, 4096, prefill=False)["elementwise"]
    assert many > spec.n_layers * floor
    h100 = make_cluster("h100-sxm-80gb", 1)
    assert h100.efficiency.layer_elementwise_floor_s == 0.0
    assert decode_step_parts(spec, h100, settings, 1, prefill=False)["elementwise"] < spec.n_layers * 1e-6
