"""The serving engines' documented limits, against hand computations."""

import math
from dataclasses import replace

import pytest

from aiinfra.plan.cluster import make_cluster
from aiinfra.plan.efficiency import efficiency_table
from aiinfra.plan.inference import ServeSettings, decode_step_parts, plan_serving, serve_models, trtllm_bench_limits
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

    from aiinfra.plan.inference import _predict_inference_row
    from aiinfra.plan.runs import RowNotRepresentable

    row = {"id": "x", "system": "TensorRT-LLM trtllm-bench", "model": "llama-3.1-8b", "hardware": "b200",
           "n_devices": "1", "tp": "1", "precision": "fp8", "input_tokens": "1024", "output_tokens": "2048",
           "metric": "ms_per_token_low_batch", "value": "3", "speculative": "mtp-3"}
    with pytest.raises(RowNotRepresentable, match=r"speculative decoding \(mtp-3\)"):
        _predict_inference_row(row, serve_models())
    assert _predict_inference_row({**row, "speculative": ""}, serve_models()).predicted > 0


def test_a_step_takes_the_longer_of_the_kernels_and_the_host_work() -> None:
    from aiinfra.plan.inference import ENGINE_HOST_S_PER_REQUEST, decode_step_parts, decode_step_time_s, host_step_s

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
    assert decode_step_time_s(spec, cluster, replace(base, attention_dp=True), 1000) == kernels


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
    # Without a measured figure (Hopper) the cache streams at the elementwise share of HBM.
    h200 = make_cluster("h200", 1)
    assert h200.efficiency.kv_read_bw_efficiency == h200.efficiency.memory_bw_efficiency == 0.80
    assert decode_step_parts(spec, h200, settings, 64, prefill=False)["attention"] == pytest.approx(kv / (4800e9 * 0.8))
