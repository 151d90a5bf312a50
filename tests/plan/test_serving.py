"""The serving engines' documented limits, against hand computations."""

import math
from dataclasses import replace

from aiinfra.plan.cluster import make_cluster
from aiinfra.plan.inference import ServeSettings, plan_serving, serve_models, trtllm_bench_limits


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


def test_a_serial_host_adds_its_fixed_step_time_to_the_kernels() -> None:
    from aiinfra.plan.inference import (
        ENGINE_HOST_S_PER_STEP,
        ENGINES_WITH_SERIAL_HOST,
        _predict_inference_row,
        decode_step_parts,
        decode_step_time_s,
        host_step_s,
    )

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
