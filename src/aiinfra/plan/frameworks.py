"""What each training framework does that a run table does not say, selected by the row's `framework` column.

One entry per framework (never per paper or per row): its attention kernel, dropout, how it overlaps and buckets
data-parallel collectives, the precision of the gradient reduction, its default pipeline schedule, the bytes of its
model states, and how it counts FLOPs for MFU. Each value is the framework's documented default, with where it is
documented.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiinfra.plan.cells import cell_key
from aiinfra.plan.errors import PlanError
from aiinfra.plan.moe_routing import HOST_OP_S, TE_MULTI_STREAM_GEMM_PER_GROUP_S


@dataclass(frozen=True)
class FrameworkFacts:
    """Documented software behaviour of one training framework."""

    name: str
    source: str
    dropout_families: tuple[str, ...] = ()  # model families trained with dropout by default
    dp_overlap: bool = True  # data-parallel collectives overlap the passes
    tp_overlap: bool = False  # tensor-parallel collectives overlap their GEMMs
    grad_reduce_fp32: bool = True  # bf16 gradients reduced in fp32
    interleaved_by_default: bool = False  # pipeline runs interleave (several chunks per rank) unless told otherwise
    dp_bucket_params: float = 0.0  # parameters per ZeRO-0/1/2 gradient bucket; 0: one per layer
    dp_bucket_params_per_rank: float = 0.0  # buckets grow with the data-parallel size: at least this x dp x cp
    zero3_bucket_params: float = 0.0  # parameters per ZeRO-3 gather; 0: one per layer (FSDP units)
    ep_overlap: bool = False  # expert-parallel all-to-alls hidden under another micro-batch's compute
    grad_reduce_every_micro_batch: bool = False  # ZeRO-1/2 reduce-scatter after every micro-batch
    param_bytes: int = 2  # working weights
    gather_param_bytes: int = 0  # bytes per weight ZeRO-3 gathers (0: param_bytes)
    grad_bytes: int = 4  # gradient accumulation buffer
    optimizer_bytes_per_param: int = 12  # master weights (if separate) and Adam moments
    sequence_parallel: bool = False  # norms and dropout sharded along the sequence inside a TP group
    partial_recompute: bool = False  # can recompute only some layers of a stage (a searched knob when unstated)
    shard_within_domain: bool = False  # FSDP shards inside a scale-up domain and replicates across domains
    fsdp_like_is_hybrid: bool = False  # an FSDP-style scheme here is HYBRID_SHARD: ZeRO-3 in a node, DDP across
    mfu_causal_attention: bool = False  # its MFU counts half the attention products (causal), not the full square
    activation_offload: bool = False  # a selective policy may keep its saved activations in host memory
    logit_bytes: int = 4  # bytes per stored logit
    fp8_saved_inputs: bool = False  # fp8/fp4 linear inputs saved for the backward quantized (Transformer Engine)
    fp8_amax_pass: bool = False  # fp8 scales from each tensor's current amax, one extra read per cast (tensorwise)
    grouped_gemm_row_tile: int = 0  # dropless experts' grouped GEMM walks row tiles of this size (0: untiled)
    grouped_gemm_per_group_s: float = 0.0  # a grouped expert GEMM runs one GEMM per expert, each extra one costing this
    expert_host_op_s: float = 0.0  # host seconds per per-expert op the MoE dispatcher's host sync exposes (0: none)
    split_flash_backward: bool = False  # flash attention's backward as separate dK/dV and dQ kernels (7 matmuls, not 5)
    selective_recomputes_alternate_mms: bool = False  # per-op selective checkpointing reruns every second matmul
    layer_offload: bool = False  # can keep whole layers' activations in host memory (a searched knob when unstated)
    recompute_drops_output_gemm: bool = False  # full recompute leaves out the layer's last GEMM (dead code under XLA)
    recompute_fuses_elementwise: bool = False  # a recomputed layer keeps no norm or MLP-activation outputs (XLA)
    test_model_head_width: int = 0  # head width of the framework's own synthetic test models (0: hidden / heads)
    bf16_weights_when_needed: bool = False  # a run whose fp32 weights would not fit kept them in bf16 (a fallback)
    eager_by_default: bool = False  # runs without torch.compile: each elementwise op its own kernel (`eager`)
    attention_fa2: bool = False  # its fused attention is FlashAttention-2 (SDPA's flash backend or flash-attn 2)
    foreach_optimizer: bool = False  # torch.optim.AdamW's default foreach implementation (`eager`)
    fsdp1_flat_grad: bool = False  # FSDP1's FlatParameter: the backward concatenates (and casts) the flat gradient
    fsdp2_copy_out: bool = False  # FSDP2's per-parameter copy-out after every all-gather (`eager.fsdp_copy_out_s`)
    default_sharding: str = "none"  # the `sharding` a row of this framework means when it leaves the column empty


FRAMEWORKS: dict[str, FrameworkFacts] = {
    "megatron": FrameworkFacts(
        "megatron",
        "Megatron-LM/Megatron-Core arguments.py and DDP config: GPT hidden/attention dropout 0.1; --overlap-grad-"
        "reduce and --overlap-param-gather; buckets of max(40M, 1M x dp) parameters; fp32 main gradients reduced in "
        "fp32; interleaved 1F1B (--num-layers-per-virtual-pipeline-stage); sequence parallel with TP; TP comm "
        "overlap; --recompute-num-layers for recomputing part of a stage; --cpu-offloading with "
        "--cpu-offloading-num-layers keeps whole layers' activations in host memory; Megatron-FSDP gathers per "
        "module; the MoE "
        "all-to-all blocks the expert GEMMs (TransformerConfig.overlap_moe_expert_parallel_comm defaults to False: "
        "overlapping it with another micro-batch is opt-in, and the published tables do not say it was on); TE "
        "fused attention; TE's fp8/fp4 linear layers save their quantized input for the weight gradient; "
        "--moe-grouped-gemm runs TE's GroupedLinear, one cuBLAS GEMM per local expert on a pool of streams "
        "(`moe_routing.TE_MULTI_STREAM_GEMM_PER_GROUP_S`); the all-to-all dispatcher reads the token counts on "
        "the host before the expert all-to-all, exposing each extra local expert's host ops "
        "(`moe_routing.HOST_OP_S`); NeMo's and Megatron-Bridge's recipes run the distributed "
        "optimizer (ZeRO-1) unless Megatron-FSDP is named (the reference README: zero1 where the tables do not say)",
        dropout_families=("gpt",), tp_overlap=True, fp8_saved_inputs=True, interleaved_by_default=True,
        default_sharding="zero1",
        dp_bucket_params=40e6, dp_bucket_params_per_rank=1e6, sequence_parallel=True, partial_recompute=True,
        layer_offload=True, grouped_gemm_per_group_s=TE_MULTI_STREAM_GEMM_PER_GROUP_S, expert_host_op_s=HOST_OP_S,
    ),
    "megatron-2021": FrameworkFacts(
        "megatron-2021",
        "Megatron-LM as its 2021-22 papers ran it (Narayanan et al. 2021; Korthikanti et al. 2022), before Megatron-"
        "Core: gradients all-reduced after the backward by its local DDP (--DDP-impl local, the default; "
        "--overlap-grad-reduce arrived with Megatron-Core's DistributedDataParallel in 2023), tensor-parallel "
        "all-reduces synchronous in RowParallelLinear (no TP overlap before Transformer Engine's userbuffers), "
        "GPT dropout 0.1, interleaved 1F1B, sequence parallelism only where a run states it (Korthikanti 2022 "
        "introduced it)",
        dropout_families=("gpt",), dp_overlap=False, interleaved_by_default=True,
    ),
    "megatron-deepspeed": FrameworkFacts(
        "megatron-deepspeed",
        "Megatron-DeepSpeed: Megatron's model code under DeepSpeed's engine (reduce_bucket_size 5e8 elements, "
        "gradient reduction at every micro-step for ZeRO-1/2, no TP overlap)",
        dropout_families=("gpt",), interleaved_by_default=True, dp_bucket_params=5e8,
        grad_reduce_every_micro_batch=True, partial_recompute=True,
    ),
    "deepspeed": FrameworkFacts(
        "deepspeed",
        "DeepSpeed ZeRO config defaults: overlap_comm, reduce_bucket_size 5e8, stage3_prefetch_bucket_size 5e7 "
        "elements (ZeRO-3 gathers per prefetch bucket, so a large layer costs many small collectives), gradients "
        "partitioned at every micro-step, fp32 reduction; no ZeRO stage unless the config names one "
        "(zero_optimization.stage defaults to 0)",
        dp_bucket_params=5e8, zero3_bucket_params=5e7, grad_reduce_every_micro_batch=True,
    ),
    "torchtitan": FrameworkFacts(
        "torchtitan",
        "torchtitan parallelize_llama: FSDP2 fully_shard per transformer block (one all-gather and one "
        "reduce-scatter per block, prefetched), mixed_precision_reduce float32, SDPA flash attention, no dropout, "
        "sequence parallel with TP (data_parallel_shard_degree -1: FSDP over every data-parallel rank unless "
        "replication is named); Float8 training through torchao's default tensorwise dynamic scaling (each "
        "input's amax computed before its cast); selective per-op activation checkpointing saves every compute op's "
        "output except every second matmul of a block, which runs again in the backward (_custom_policy); "
        "train_configs set compile = false and norm_type rmsnorm (eager RMSNorm, rotary and SwiGLU kernels); "
        "FSDP2 copies every all-gather's output into the parameters on the compute stream",
        sequence_parallel=True, fp8_amax_pass=True, selective_recomputes_alternate_mms=True,
        eager_by_default=True, fsdp2_copy_out=True, attention_fa2=True, foreach_optimizer=True,
        default_sharding="fsdp",
    ),
    "pytorch-fsdp": FrameworkFacts(
        "pytorch-fsdp",
        "PyTorch FSDP (Zhao et al. 2023): one FlatParameter per wrapped transformer block, BACKWARD_PRE prefetch, "
        "bf16 MixedPrecision (parameters, reduction and buffers in bf16), SDPA attention; its FSDP-style variant is "
        "ShardingStrategy.HYBRID_SHARD (full shard inside a node, replicate across nodes); run eagerly "
        "(fms-fsdp scripts --use_torch_compile=False; the IBM/PyTorch blog lists torch.compile as future work)",
        grad_reduce_fp32=False, fsdp_like_is_hybrid=True, eager_by_default=True, attention_fa2=True,
        foreach_optimizer=True, fsdp1_flat_grad=True, default_sharding="fsdp",
    ),
    "llm-foundry": FrameworkFacts(
        "llm-foundry",
        "llm-foundry/Composer FSDP FULL_SHARD wrapped per MPT block, mixed_precision DEFAULT (reduce in fp32), "
        "flash attention, no dropout in the benchmark configs; Composer wraps torch's FSDP1 FullyShardedDataParallel "
        "(FlatParameter per block)",
        fsdp1_flat_grad=True, default_sharding="fsdp",
    ),
    "jax": FrameworkFacts(
        "jax",
        "MaxText base.yml: weight_dtype float32 (fp32 weights and gradients, Adam moments in fp32, no separate "
        "master copy; XLA casts to bf16 before the FSDP all-gather), ici_fsdp_parallelism -1 and "
        "dcn_data_parallelism -1 (shard inside a slice, replicate across slices), latency-hiding scheduler, fused "
        "(splash) attention; its MFU counts causal attention (calculate_tflops_training_per_device); remat_policy "
        "custom and the *_offloaded policies move saved activations to host memory (jax.checkpoint offload policies); "
        "logits_dot_in_fp32 False (bf16 logits); dropless MoE through megablox grouped matmuls with row tiles of "
        "tile_batch_seq 512 (MoE tiling defaults; a tile that straddles two experts is visited once per expert); "
        "remat_policy full (jax.checkpoint saving nothing) recomputes in the backward only what the backward reads: "
        "the MLP's down projection, whose output only feeds the residual sum, is dead code there (JAX's remat "
        "partial evaluation runs dead-code elimination on the recomputed jaxpr, and XLA's HLO DCE removes an "
        "unread op), and so is its tensor-parallel reduction; its synthetic test models (global_parameter_scale, "
        "family gpt) set embedding, heads, MLP and layers and inherit base.yml's head_dim 256 (base.yml at 76bd53b0f, "
        "2023-12, the commit of the published v4/v5e/v5p tables); weight_dtype bfloat16 is the documented switch "
        "for a model whose fp32 weights do not fit (tpu-recipes' Llama 3.1 70B on v6e-32 sets it), so a row that "
        "states no weight dtype and does not fit in fp32 is taken to have used it; XLA fuses elementwise "
        "producers (the norms, the MLP activation) into the matmuls that read them, so a recomputed layer "
        "materializes only matmul outputs (XLA operation fusion: producer-consumer fusion into dot/convolution "
        "operands); the TPU flash attention's backward runs as two kernels, dK/dV then dQ, each recomputing the "
        "scores (jax/experimental/pallas/ops/tpu/flash_attention.py _flash_attention_bwd_dkv and "
        "_flash_attention_bwd_dq; splash attention likewise unless sa_use_fused_bwd_kernel, which MaxText's "
        "configs/types.py defaults to False)",
        split_flash_backward=True,
        tp_overlap=True, grad_reduce_fp32=False, param_bytes=4, gather_param_bytes=2, optimizer_bytes_per_param=8,
        sequence_parallel=True, shard_within_domain=True, mfu_causal_attention=True, activation_offload=True,
        logit_bytes=2, grouped_gemm_row_tile=512, recompute_drops_output_gemm=True, recompute_fuses_elementwise=True,
        test_model_head_width=256, bf16_weights_when_needed=True, default_sharding="fsdp",
    ),
    "in-house": FrameworkFacts(
        "in-house",
        "an unnamed stack: the Megatron-style defaults large in-house runs describe (Llama 3 3.3.2: overlapped "
        "FSDP-style sharding, fp32 gradient reduction, interleaved pipeline, sequence parallel, no dropout); MFU "
        "counted with causal attention, an ASSUMPTION (Llama 3 does not state its counting; PaLM-style full "
        "counting would put 131K-context attention at a higher efficiency than 8K's)",
        tp_overlap=True, interleaved_by_default=True, dp_bucket_params=40e6, dp_bucket_params_per_rank=1e6,
        sequence_parallel=True,
        partial_recompute=True, mfu_causal_attention=True, default_sharding="fsdp-like",
    ),
}


# The products each schema word covers (the reference README's `framework` row), any case: NeMo and Megatron-Bridge
# run Megatron-Core, MaxText and Pax run on JAX, Composer is llm-foundry's trainer. NeMo Megatron is NeMo's earlier
# name for the same stack; AMD's Primus-Megatron and Primus-Torchtitan run those two trainers on ROCm; IBM's
# fms-fsdp is the PyTorch FSDP trainer the pytorch-fsdp facts cite; llmfoundry is llm-foundry's package name, and
# MosaicML alone names its one public trainer. AXLearn, Levanter and T5X also run on JAX but
# with their own defaults (weight dtypes, remat), so they are not taken to be MaxText's and stay unknown.
FRAMEWORK_ALIASES = {
    "megatron-lm": "megatron", "megatron-core": "megatron", "mcore": "megatron", "nemo": "megatron",
    "megatron-bridge": "megatron", "nemo-megatron": "megatron", "primus-megatron": "megatron",
    "maxtext": "jax", "pax": "jax", "paxml": "jax", "composer": "llm-foundry",
    "deepspeed-megatron": "megatron-deepspeed", "primus-torchtitan": "torchtitan",
    "fsdp": "pytorch-fsdp", "pytorch-fsdp2": "pytorch-fsdp", "fsdp2": "pytorch-fsdp", "fsdp1": "pytorch-fsdp",
    "fms-fsdp": "pytorch-fsdp", "torch-fsdp": "pytorch-fsdp", "nemo-framework": "megatron",
    "llmfoundry": "llm-foundry", "mosaicml": "llm-foundry",
}


# Words around a framework's name in published tables that do not change it: the vendor (NVIDIA NeMo, MosaicML
# Composer), a version (NeMo 2.0, Megatron-LM v0.9) and the ZeRO stage DeepSpeed is named with (that is `sharding`).
_VENDOR = re.compile(r"^(nvidia|amd|mosaicml|mosaic|google|microsoft|meta|databricks|ibm)-")
_VERSION = re.compile(r"-(v?\d+(\.\d+)*|zero(-stage)?(-?[0-3])?|stage-?[0-3])$")


def _spelled(text: str) -> str:
    key = cell_key(text)
    return FRAMEWORK_ALIASES.get(key, key)


def _framework_key(text: str) -> str | None:
    """The FRAMEWORKS key a spelling names: as written (`FRAMEWORK_ALIASES`), else without its vendor and version
    words; None if neither is one."""
    key = _spelled(text)
    if key in FRAMEWORKS:
        return key
    bare = _VENDOR.sub("", key)
    while _VERSION.search(bare):
        bare = _VERSION.sub("", bare)
    bare = FRAMEWORK_ALIASES.get(bare, bare)
    return bare if bare in FRAMEWORKS else None


def framework_facts(name: str) -> FrameworkFacts:
    """The facts of a framework named as in the run table's `framework` column, or by a product it covers
    (`FRAMEWORK_ALIASES`, any case, with a vendor, a version or a ZeRO stage around it: "NVIDIA NeMo 2.0",
    "DeepSpeed ZeRO-3"; a parenthesis is detail, "torchtitan (FSDP2)"; "JAX/MaxText" by either part where both name
    one framework); empty: in-house."""
    if not name.strip():
        return FRAMEWORKS["in-house"]
    key = _framework_key(name) or _framework_key(re.sub(r"\(.*?\)", " ", name))
    if key is None:
        parts = {_framework_key(part) for part in re.split(r"[/()+,]", name) if part.strip()} - {None}
        key = parts.pop() if len(parts) == 1 else None
    if key is None:
        raise PlanError(f"framework={name!r}: expected one of {', '.join(FRAMEWORKS)}")
    return FRAMEWORKS[key]


def named_sharding(name: str) -> str:
    """The ZeRO stage a `framework` cell names ("DeepSpeed ZeRO-3", "ZeRO stage 2": zero3, zero2), or ""."""
    found = re.search(r"zero[\s_-]*(stage[\s_-]*)?([1-3])", name.lower())
    return f"zero{found.group(2)}" if found else ""
