"""What each training framework does that a run table does not say, selected by the row's `framework` column.

One entry per framework (never per paper or per row): its attention kernel, dropout, how it overlaps and buckets
data-parallel collectives, the precision of the gradient reduction, its default pipeline schedule, the bytes of its
model states, and how it counts FLOPs for MFU. Each value is the framework's documented default, with where it is
documented.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiinfra.plan.errors import PlanError


@dataclass(frozen=True)
class FrameworkFacts:
    """Documented software behaviour of one training framework."""

    name: str
    dropout_families: tuple[str, ...]  # model families trained with dropout by default
    dp_overlap: bool  # data-parallel collectives overlap the passes
    tp_overlap: bool  # tensor-parallel collectives overlap their GEMMs
    grad_reduce_fp32: bool  # bf16 gradients reduced in fp32
    interleaved_by_default: bool  # pipeline runs interleave (several chunks per rank) unless told otherwise
    dp_bucket_params: float  # parameters per data-parallel collective; 0: one per layer (FSDP units)
    grad_reduce_every_micro_batch: bool  # ZeRO-1/2 reduce-scatter after every micro-batch
    param_bytes: int  # working weights
    grad_bytes: int  # gradient accumulation buffer
    optimizer_bytes_per_param: int  # master weights (if separate) and Adam moments
    sequence_parallel: bool  # norms and dropout sharded along the sequence inside a TP group
    mfu_causal_attention: bool  # its MFU counts half the attention products (causal), not the full square
    source: str


MEGATRON = FrameworkFacts(
    "megatron", ("gpt",), True, True, True, True, 40e6, False, 2, 4, 12, True, False,
    "Megatron-LM/Megatron-Core arguments.py and DDP config: GPT hidden/attention dropout 0.1; --overlap-grad-reduce "
    "and --overlap-param-gather; buckets of max(40M, 1M x dp) parameters; fp32 main gradients reduced in fp32; "
    "interleaved 1F1B with --num-layers-per-virtual-pipeline-stage; sequence parallel with TP; TE fused attention",
)

FRAMEWORKS: dict[str, FrameworkFacts] = {
    "megatron": MEGATRON,
    "megatron-deepspeed": FrameworkFacts(
        "megatron-deepspeed", ("gpt",), True, False, True, True, 5e8, True, 2, 4, 12, False, False,
        "Megatron-DeepSpeed: Megatron's model code under DeepSpeed's engine (reduce_bucket_size 5e8 elements, "
        "gradient reduction at every micro-step for ZeRO-2 and 3, no TP-overlap)",
    ),
    "deepspeed": FrameworkFacts(
        "deepspeed", (), True, False, True, False, 5e7, True, 2, 4, 12, False, False,
        "DeepSpeed ZeRO config defaults: overlap_comm, stage3_prefetch_bucket_size 5e7 and reduce_bucket_size 5e8 "
        "elements (ZeRO-3 gathers per prefetch bucket, so a layer costs many small collectives), gradients "
        "partitioned at every micro-step, fp32 reduction",
    ),
    "torchtitan": FrameworkFacts(
        "torchtitan", (), True, False, True, False, 0.0, False, 2, 4, 12, True, False,
        "torchtitan parallelize_llama: FSDP2 fully_shard per transformer block (one all-gather and one "
        "reduce-scatter per block, prefetched), mixed_precision_reduce float32, SDPA flash attention, no dropout",
    ),
    "pytorch-fsdp": FrameworkFacts(
        "pytorch-fsdp", (), True, False, False, False, 0.0, False, 2, 4, 12, False, False,
        "PyTorch FSDP (Zhao et al. 2023): one FlatParameter per wrapped transformer block, BACKWARD_PRE prefetch, "
        "bf16 MixedPrecision (parameters, reduction and buffers in bf16), SDPA attention",
    ),
    "llm-foundry": FrameworkFacts(
        "llm-foundry", (), True, False, True, False, 0.0, False, 2, 4, 12, False, False,
        "llm-foundry/Composer FSDP FULL_SHARD wrapped per MPT block, mixed_precision DEFAULT (reduce in fp32), "
        "flash attention, no dropout in the benchmark configs",
    ),
    "jax": FrameworkFacts(
        "jax", (), True, True, False, False, 0.0, False, 4, 4, 8, True, True,
        "MaxText base.yml: weight_dtype float32 (fp32 weights and gradients, Adam moments in fp32, no separate "
        "master copy), XLA latency-hiding scheduler overlaps the per-layer FSDP gathers, fused (splash) attention; "
        "its MFU counts causal attention (MaxText calculate_tflops_training_per_device)",
    ),
    "in-house": FrameworkFacts(
        "in-house", (), True, True, True, True, 40e6, False, 2, 4, 12, True, False,
        "an unnamed stack: the Megatron-style defaults large in-house runs describe (Llama 3 3.3.2: overlapped "
        "FSDP-style sharding, fp32 gradient reduction, interleaved pipeline, sequence parallel; no dropout)",
    ),
}


def framework_facts(name: str) -> FrameworkFacts:
    """The facts of a framework named as in the run table's `framework` column (empty: in-house)."""
    key = name.strip() or "in-house"
    if key not in FRAMEWORKS:
        raise PlanError(f"framework={name!r}: expected one of {', '.join(FRAMEWORKS)}")
    return FRAMEWORKS[key]
