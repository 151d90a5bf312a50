"""Properties the model must keep for any input: monotone in devices, micro-batches and bandwidth."""

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiinfra.plan.cluster import make_cluster
from aiinfra.plan.layout import Layout, TrainSettings
from aiinfra.plan.memory import memory_breakdown
from aiinfra.plan.step import step_breakdown
from aiinfra.spec import preset

SPECS = ["tiny", "small", "1b", "llama3-8b", "gpt3-175b"]


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(SPECS), exponent=st.integers(0, 8), micro_batch=st.sampled_from([1, 2, 4]),
       recompute=st.sampled_from(["none", "selective", "full"]))
def test_fsdp_more_devices_never_more_memory_per_device(name: str, exponent: int, micro_batch: int,
                                                        recompute: str) -> None:
    spec = preset(name)
    train = TrainSettings(seq_len=spec.max_seq_len, global_batch_seqs=2**10 * micro_batch)
    fewer = Layout(dp_shard=2**exponent, zero_stage=3, micro_batch=micro_batch, recompute=recompute)  # type: ignore[arg-type]
    more = replace(fewer, dp_shard=2 ** (exponent + 1))
    assert memory_breakdown(spec, train, more).total_bytes <= memory_breakdown(spec, train, fewer).total_bytes


@settings(max_examples=30, deadline=None)
@given(pp=st.sampled_from([2, 4, 8]), micro_batches=st.integers(1, 64), extra=st.integers(1, 64),
       schedule=st.sampled_from(["gpipe", "1f1b", "interleaved_1f1b"]))
def test_bubble_fraction_shrinks_with_more_micro_batches(pp: int, micro_batches: int, extra: int,
                                                         schedule: str) -> None:
    spec = preset("llama3-8b")
    cluster = make_cluster("h100-sxm-80gb", pp)
    layout = Layout(pp=pp, pp_schedule=schedule, virtual_stages=2 if schedule == "interleaved_1f1b" else 1)  # type: ignore[arg-type]

    def fraction(m: int) -> float:
        step = step_breakdown(spec, TrainSettings(seq_len=2048, global_batch_seqs=m), layout, cluster)
        return step.bubble_s / step.step_time_s

    assert fraction(micro_batches + extra) < fraction(micro_batches)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(["small", "1b", "llama3-8b", "llama3-70b"]), hardware=st.sampled_from(
    ["a100-sxm-80gb", "h100-sxm-80gb", "tpu-v5p"]), tp=st.sampled_from([1, 2, 8]), pp=st.sampled_from([1, 2]),
       zero=st.sampled_from([0, 1, 3]), scale_up=st.floats(1.0, 8.0), scale_out=st.floats(1.0, 8.0),
       scale_hbm=st.floats(1.0, 4.0))
def test_more_bandwidth_never_slows_a_step(name: str, hardware: str, tp: int, pp: int, zero: int, scale_up: float,
                                           scale_out: float, scale_hbm: float) -> None:
    spec = preset(name)
    cluster = make_cluster(hardware, 64)
    dp = 64 // (tp * pp)
    stage = zero if pp == 1 else min(zero, 1)
    layout = Layout(tp=tp, pp=pp, dp_replicate=1 if stage else dp, dp_shard=dp if stage else 1, zero_stage=stage,
                    sequence_parallel=tp > 1)
    train = TrainSettings(seq_len=2048, global_batch_seqs=256)
    faster = replace(
        cluster,
        scaleup_bw_bytes_per_s=cluster.scaleup_bw_bytes_per_s * scale_up,
        scaleout_bw_bytes_per_s=cluster.scaleout_bw_bytes_per_s * scale_out,
        accelerator=replace(cluster.accelerator, memory_bw_gbs=cluster.accelerator.memory_bw_gbs * scale_hbm),
    )
    before = step_breakdown(spec, train, layout, cluster).step_time_s
    after = step_breakdown(spec, train, layout, faster).step_time_s
    assert after <= before * (1 + 1e-12)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(["llama3-8b", "llama3-70b"]), hardware=st.sampled_from(["a100-sxm-80gb", "h100-sxm-80gb"]),
       bucket_params=st.sampled_from([0.0, 5e7, 5e8]), exponent=st.integers(3, 10))
def test_more_bandwidth_never_slows_a_zero3_step(name: str, hardware: str, bucket_params: float,
                                                  exponent: int) -> None:
    spec = preset(name)
    n = 2**exponent
    cluster = make_cluster(hardware, n)
    train = TrainSettings(seq_len=2048, global_batch_seqs=2 * n, zero3_bucket_params=bucket_params)
    layout = Layout(dp_shard=n, zero_stage=3, micro_batch=1, recompute="full")
    faster = replace(cluster, scaleout_bw_bytes_per_s=2 * cluster.scaleout_bw_bytes_per_s)
    assert step_breakdown(spec, train, layout, faster).step_time_s <= step_breakdown(spec, train, layout,
                                                                                     cluster).step_time_s


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(["small", "1b", "llama3-8b"]), tp=st.sampled_from([1, 2, 4]),
       micro_batch=st.sampled_from([1, 2]), recompute=st.sampled_from(["none", "selective", "full"]))
def test_moe_with_one_expert_and_ep1_equals_the_dense_model(name: str, tp: int, micro_batch: int,
                                                             recompute: str) -> None:
    dense = preset(name)
    one_expert = preset(name, n_experts=1, experts_per_token=1)
    cluster = make_cluster("h100-sxm-80gb", tp * 4)
    train = TrainSettings(seq_len=1024, global_batch_seqs=16)
    layout = Layout(tp=tp, dp_shard=4, zero_stage=1, micro_batch=micro_batch, recompute=recompute,  # type: ignore[arg-type]
                    sequence_parallel=tp > 1)
    # One expert adds only its router (dim x 1 weights): step and memory equal the dense model's within 0.1%.
    dense_step = step_breakdown(dense, train, layout, cluster).step_time_s
    moe_step = step_breakdown(one_expert, train, layout, cluster).step_time_s
    assert moe_step == pytest.approx(dense_step, rel=1e-3)
    assert memory_breakdown(one_expert, train, layout).total_bytes == pytest.approx(
        memory_breakdown(dense, train, layout).total_bytes, rel=1e-3)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(["1b", "llama3-8b", "llama3-70b"]), hardware=st.sampled_from(
    ["h100-sxm-80gb", "h200", "b200", "gb200", "mi300x"]), tp=st.sampled_from([1, 2, 8]),
       zero=st.sampled_from([1, 3]), recompute=st.sampled_from(["none", "selective", "full"]))
def test_fp8_is_never_slower_than_bf16_where_there_is_an_fp8_peak(name: str, hardware: str, tp: int, zero: int,
                                                                  recompute: str) -> None:
    spec = preset(name)
    cluster = make_cluster(hardware, 64)
    layout = Layout(tp=tp, dp_shard=64 // tp, zero_stage=zero, recompute=recompute,  # type: ignore[arg-type]
                    sequence_parallel=tp > 1)
    bf16 = TrainSettings(seq_len=4096, global_batch_seqs=128)
    fp8 = replace(bf16, precision="fp8")
    assert step_breakdown(spec, fp8, layout, cluster).step_time_s <= step_breakdown(spec, bf16, layout,
                                                                                    cluster).step_time_s


@settings(max_examples=50, deadline=None)
@given(m=st.integers(1, 65536), extra=st.integers(1, 4096), k=st.sampled_from([768, 2048, 8192, 28672]))
def test_nvfp4_gemm_efficiency_rises_with_rows_and_stays_under_its_ceiling(m: int, extra: int, k: int) -> None:
    from aiinfra.plan.efficiency import efficiency_table

    blackwell = efficiency_table()["blackwell"]
    low, more = blackwell.gemm_efficiency(m, k, 8192, "fp4"), blackwell.gemm_efficiency(m + extra, k, 8192, "fp4")
    assert low <= more < blackwell.fp8_gemm_efficiency_max
    # Its half dimension (400) is wider than the fp8 tile's (128): never more efficient than fp8 at the same shape.
    assert low <= blackwell.gemm_efficiency(m, k, 8192, "fp8")
