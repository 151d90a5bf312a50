"""Flash attention's backward as JAX's Pallas TPU kernels run it: a dK/dV kernel and a dQ kernel, each recomputing
the scores (7 matmuls to the forward's 2), against FlashAttention-2's fused backward (5)."""

from dataclasses import replace

import pytest

from aiinfra.plan.cluster import make_cluster
from aiinfra.plan.frameworks import framework_facts
from aiinfra.plan.layout import Layout, TrainSettings
from aiinfra.plan.step import (
    FLASH_BACKWARD_FACTOR,
    SPLIT_FLASH_BACKWARD_FACTOR,
    layer_forward_times,
    layer_micro_batch_times,
)
from aiinfra.spec import ModelSpec

SPEC = ModelSpec(vocab_size=32000, dim=4096, n_layers=8, n_heads=32, n_kv_heads=8, ffn_dim=14336, max_seq_len=8192)


def test_the_matmul_counts() -> None:
    # Forward: S = QK^T, O = PV. Fused backward: S, dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q.
    assert FLASH_BACKWARD_FACTOR == pytest.approx(5 / 2)
    # Split: dK/dV kernel S, dV, dP, dK; dQ kernel S, dP, dQ.
    assert SPLIT_FLASH_BACKWARD_FACTOR == pytest.approx((4 + 3) / 2)


def test_only_jax_splits_it() -> None:
    assert framework_facts("jax").split_flash_backward
    for name in ("megatron", "torchtitan", "pytorch-fsdp", "deepspeed", "llm-foundry"):
        assert not framework_facts(name).split_flash_backward


def test_the_backward_pays_one_more_attention_forward() -> None:
    cluster = make_cluster("tpu-v5p", 64)
    fused = TrainSettings(seq_len=8192, global_batch_seqs=64, precision="bf16", attention_kernel="flash")
    split = replace(fused, split_flash_backward=True)
    layout = Layout(dp_shard=64, micro_batch=1)
    attention = layer_forward_times(SPEC, fused, layout, cluster).attention_s
    assert attention > 0
    a = layer_micro_batch_times(SPEC, fused, layout, cluster)
    b = layer_micro_batch_times(SPEC, split, layout, cluster)
    assert b.compute_s - a.compute_s == pytest.approx((3.5 - 2.5) * attention)
    assert b.backward_s - a.backward_s == pytest.approx(attention)


def test_materialized_attention_is_unchanged() -> None:
    cluster = make_cluster("tpu-v5p", 64)
    plain = TrainSettings(seq_len=2048, global_batch_seqs=64, precision="bf16", attention_kernel="materialized")
    layout = Layout(dp_shard=64, micro_batch=1)
    assert layer_micro_batch_times(SPEC, replace(plain, split_flash_backward=True), layout, cluster) \
        == layer_micro_batch_times(SPEC, plain, layout, cluster)
