"""Eager PyTorch and FSDP mechanisms (`aiinfra.plan.eager`, `dp_comm.zero3_overlapped_s`), against hand computations."""

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiinfra.plan.cluster import make_cluster
from aiinfra.plan.dp_comm import OVERLAP_SM_TAX, zero3_overlapped_s
from aiinfra.plan.eager import (
    eager_extra_forward_bytes,
    eager_rmsnorm_bytes,
    eager_rotary_bytes,
    eager_swiglu_bytes,
    foreach_adamw_bytes_per_param,
    fsdp1_grad_copy_bytes,
    fsdp_copy_out_s,
)
from aiinfra.plan.efficiency import profile_for
from aiinfra.plan.layout import Layout, TrainSettings
from aiinfra.plan.memory import device_param_counts
from aiinfra.plan.runs import setup_from_row
from aiinfra.plan.step import layer_forward_times, step_breakdown
from aiinfra.plan.validation import load_training_runs
from aiinfra.spec import preset


def test_eager_kernel_byte_counts_by_hand() -> None:
    # bf16 activations (a = 2), fp32 intermediates.
    assert eager_rmsnorm_bytes(2) == (2 + 4) + (4 + 4) + 4 + (4 + 4) + (4 + 2) + (2 + 2) == 36
    assert eager_rotary_bytes(2) == (2 + 4) + (4 + 4) + (4 + 2) == 20
    assert eager_swiglu_bytes(2) == (2 + 2) + (4 + 2) == 10
    assert foreach_adamw_bytes_per_param() == (2 + 3 + 2 + 3 + 2 + 2 + 2 + 4) * 4 == 80


def test_eager_extra_bytes_of_llama3_8b_by_hand() -> None:
    spec = preset("llama3-8b")  # h 4096, 32 heads of 128, 8 KV heads, ffn 14336
    settings = TrainSettings(seq_len=8192, global_batch_seqs=64, eager_elementwise=True)
    m = 8192.0
    h, q, kv, ffn = 4096, 4096, 1024, 14336
    norms = 2 * h * (36 - 4)  # two RMSNorms, eager 36 bytes against a fused 4
    rotary = (q + kv) * (20 - 4)
    swiglu = ffn * (10 - 6)
    repeat_kv = 2 * 2 * (kv + q)  # keys and values copied out to the query width
    expected = m * (norms + rotary + swiglu + repeat_kv)
    assert eager_extra_forward_bytes(spec, settings, Layout(), m) == pytest.approx(expected)
    # Compiled, nothing extra; GPT-style blocks (LayerNorm, GELU, learned positions, MHA) are single native kernels.
    assert eager_extra_forward_bytes(spec, replace(settings, eager_elementwise=False), Layout(), m) == 0.0
    assert eager_extra_forward_bytes(preset("gpt3-175b"), replace(settings, seq_len=2048), Layout(), m) == 0.0


def test_eager_bytes_slow_the_layer_by_their_time_at_hbm_bandwidth() -> None:
    spec = preset("llama3-8b")
    cluster = make_cluster("h100-sxm-80gb", 8)
    compiled = TrainSettings(seq_len=8192, global_batch_seqs=8)
    eager = replace(compiled, eager_elementwise=True)
    m = 8192.0
    bandwidth = cluster.memory_bw_bytes_per_s * cluster.efficiency.memory_bw_efficiency
    delta = layer_forward_times(spec, eager, Layout(), cluster).elementwise_s \
        - layer_forward_times(spec, compiled, Layout(), cluster).elementwise_s
    assert delta == pytest.approx(eager_extra_forward_bytes(spec, eager, Layout(), m) / bandwidth)


def test_fa2_runs_at_35_percent_on_hopper_and_at_the_generation_value_elsewhere() -> None:
    hopper, ampere = profile_for("h100-sxm-80gb"), profile_for("a100-sxm-80gb")
    assert hopper.flash_efficiency(True) == 0.35
    assert hopper.flash_efficiency(False) == hopper.attention_efficiency
    assert ampere.flash_efficiency(True) == ampere.attention_efficiency  # FA2 is Ampere's own kernel
    spec = preset("llama3-8b")
    cluster = make_cluster("h100-sxm-80gb", 8)
    best = TrainSettings(seq_len=8192, global_batch_seqs=8)
    fa2 = replace(best, attention_fa2=True)
    ratio = layer_forward_times(spec, fa2, Layout(), cluster).attention_s \
        / layer_forward_times(spec, best, Layout(), cluster).attention_s
    assert ratio == pytest.approx(hopper.attention_efficiency / 0.35)


def test_zero3_first_gather_and_last_scatter_are_exposed() -> None:
    # 32 units, 3.2 s of gathers and of scatters, windows long enough to hide the rest: the first unit's gather and
    # the last unit's reduce-scatter (0.1 s each) in full, the others at the SM tax.
    exposed = zero3_overlapped_s(gather=3.2, backward_gather=3.2, scatter=3.2, calls=32, forward_window=100.0,
                                 backward_window=100.0)
    assert exposed == pytest.approx(0.1 + 0.1 + OVERLAP_SM_TAX * (3.1 + 6.3))


@given(st.floats(0.0, 10.0), st.floats(0.0, 10.0), st.integers(1, 200), st.floats(0.0, 50.0), st.floats(0.0, 50.0))
def test_zero3_exposure_never_below_the_unhideable_units_nor_above_serial(gather: float, scatter: float, calls: int,
                                                                         fwd: float, bwd: float) -> None:
    exposed = zero3_overlapped_s(gather, gather, scatter, calls, fwd, bwd)
    assert exposed >= (gather + scatter) / calls - 1e-12
    assert exposed <= 2 * gather + scatter + 1e-9


def test_fsdp2_copy_out_reads_and_writes_the_gathered_weights_per_gather() -> None:
    assert fsdp_copy_out_s(16e9, 2, 2e12) == pytest.approx(2 * 2 * 16e9 / 2e12)
    spec = preset("llama3-8b")
    cluster = make_cluster("a100-sxm-80gb", 64)
    layout = Layout(dp_shard=64, zero_stage=3)
    settings = TrainSettings(seq_len=8192, global_batch_seqs=64)
    delta = step_breakdown(spec, replace(settings, fsdp_copy_out=True), layout, cluster).dp_comm_s \
        - step_breakdown(spec, settings, layout, cluster).dp_comm_s
    bandwidth = cluster.memory_bw_bytes_per_s * cluster.efficiency.memory_bw_efficiency
    weights = device_param_counts(spec, layout).total * 2  # bf16 gathered weights
    assert delta == pytest.approx(2 * 2 * weights / bandwidth, rel=1e-6)  # forward and backward gathers, read + write


def test_runs_take_fp8_torchtitan_runs_as_compiled_and_bf16_ones_as_eager() -> None:
    rows = {r["id"]: r for r in load_training_runs()}
    eager = setup_from_row(rows["titan-llama2-13b-a100x64"]).settings
    fp8 = setup_from_row(rows["titan-llama31-70b-h100x256-2d-fp8"]).settings
    megatron = setup_from_row(rows["bridge2511-llama3-8b-h100x8-fsdp"]).settings
    assert eager.eager_elementwise and eager.fsdp_copy_out and eager.attention_fa2 and eager.foreach_optimizer
    assert not fp8.eager_elementwise and fp8.attention_fa2
    assert not (megatron.eager_elementwise or megatron.fsdp_copy_out or megatron.attention_fa2
                or megatron.foreach_optimizer or megatron.fsdp_flat_grad)
    assert setup_from_row(rows["ibm-hsdp-llama2-7b-a100x128"]).settings.fsdp_flat_grad
    assert not eager.fsdp_flat_grad  # FSDP2 has per-parameter tensors, no flat gradient


def test_fsdp1_flat_gradient_cat_and_cast_by_hand() -> None:
    # 7e9 bf16 gradients: the cat reads and writes 2 bytes each; a float32 reduction adds a read of 2 and a write of 4.
    assert fsdp1_grad_copy_bytes(7e9, 2, 2) == 7e9 * 4
    assert fsdp1_grad_copy_bytes(7e9, 2, 4) == 7e9 * (4 + 6)
    spec = preset("llama3-8b")
    cluster = make_cluster("a100-sxm-80gb", 64)
    layout = Layout(dp_shard=64, zero_stage=3)
    settings = TrainSettings(seq_len=8192, global_batch_seqs=128, grad_reduce_bytes=2)  # 2 micro-batches
    delta = step_breakdown(spec, replace(settings, fsdp_flat_grad=True), layout, cluster).dp_comm_s \
        - step_breakdown(spec, settings, layout, cluster).dp_comm_s
    bandwidth = cluster.memory_bw_bytes_per_s * cluster.efficiency.memory_bw_efficiency
    assert delta == pytest.approx(2 * device_param_counts(spec, layout).total * 4 / bandwidth, rel=1e-6)


def test_torchtitan_per_op_selective_recompute_reruns_every_elementwise_op_and_every_second_mm() -> None:
    from aiinfra.plan.step import alternate_mm_recompute_s, layer_micro_batch_times

    spec = preset("llama3-8b")
    cluster = make_cluster("a100-sxm-80gb", 8)
    settings = TrainSettings(seq_len=8192, global_batch_seqs=8, selective_recomputes_alternate_mms=True,
                             eager_elementwise=True)
    none = layer_micro_batch_times(spec, settings, Layout(), cluster).compute_s
    selective = layer_micro_batch_times(spec, settings, Layout(recompute="selective"), cluster).compute_s
    fwd = layer_forward_times(spec, settings, Layout(), cluster)
    expected = fwd.elementwise_s + alternate_mm_recompute_s(spec, settings, Layout(), cluster)
    assert selective - none == pytest.approx(expected)
