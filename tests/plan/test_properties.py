"""Properties the model must keep for any input: monotone in devices, micro-batches and bandwidth."""

from dataclasses import replace

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
    fewer = Layout(dp=2**exponent, zero_stage=3, micro_batch=micro_batch, recompute=recompute)  # type: ignore[arg-type]
    more = replace(fewer, dp=2 ** (exponent + 1))
    assert memory_breakdown(spec, train, more).total_bytes <= memory_breakdown(spec, train, fewer).total_bytes


@settings(max_examples=30, deadline=None)
@given(pp=st.sampled_from([2, 4, 8]), micro_batches=st.integers(1, 64), extra=st.integers(1, 64),
       schedule=st.sampled_from(["gpipe", "1f1b", "interleaved"]))
def test_bubble_fraction_shrinks_with_more_micro_batches(pp: int, micro_batches: int, extra: int,
                                                         schedule: str) -> None:
    spec = preset("llama3-8b")
    cluster = make_cluster("h100-sxm-80gb", pp)
    layout = Layout(pp=pp, schedule=schedule, virtual_stages=2 if schedule == "interleaved" else 1)  # type: ignore[arg-type]

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
    layout = Layout(tp=tp, pp=pp, dp=64 // (tp * pp), zero_stage=zero if pp == 1 else min(zero, 1),
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
