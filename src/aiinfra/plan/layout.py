"""The parallel layout and the training settings, as small frozen dataclasses with their checks.

The names are the training config's (`aiinfra.config.ParallelConfig`): `dp_replicate` replicas all-reduce
gradients, `dp_shard` ranks shard the model states (ZeRO stage `zero_stage` over them: 1 optimizer, 2 + gradients,
3 = FSDP + parameters), `tp`, `pp` with `pp_schedule` in gpipe, 1f1b, interleaved_1f1b. Rank order follows
Megatron-LM (tensor, context, data shard, data replicate, pipeline from innermost to outermost), so tensor-parallel
groups sit inside a scale-up domain first and pipeline stages are furthest apart. Expert parallelism reuses the
data-parallel (and context-parallel) ranks, as in Megatron-Core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from aiinfra.plan.errors import PlanError
from aiinfra.spec import ModelSpec

Recompute = Literal["none", "selective", "full"]
Schedule = Literal["gpipe", "1f1b", "interleaved_1f1b"]
Precision = Literal["bf16", "fp16", "fp8", "fp4", "fp32"]
AttentionKernel = Literal["flash", "materialized"]



def local_attention_widths(spec: ModelSpec, tp: int) -> tuple[float, int]:
    """(query, key-or-value) widths one tensor-parallel rank holds: its 1/tp of the query heads, and its share of
    the KV heads, at least one (K/V heads are replicated when tp exceeds them)."""
    return spec.n_heads * spec.head_dim / tp, spec.head_dim * math.ceil(spec.n_kv_heads / tp)

@dataclass(frozen=True)
class Layout:
    """Degrees of parallelism and the per-device execution choices."""

    tp: int = 1  # tensor parallel (Megatron column/row split of every layer)
    pp: int = 1  # pipeline stages
    dp_replicate: int = 1  # data-parallel replicas that all-reduce gradients (DDP; HSDP's outer axis)
    dp_shard: int = 1  # data-parallel ranks over which ZeRO shards the model states
    cp: int = 1  # context parallel (sequence split across devices for attention)
    ep: int = 1  # expert parallel (within dp x cp; folded over tp x dp x cp with expert TP 1, `expert_tp`)
    virtual_stages: int = 1  # model chunks per device under interleaved_1f1b
    pp_schedule: Schedule = "1f1b"
    zero_stage: int = 0  # over dp_shard: 0 replicated; 1 optimizer sharded; 2 + gradients; 3 (FSDP) + parameters
    micro_batch: int = 1  # sequences per micro-batch
    recompute: Recompute = "none"
    recompute_fraction: float = 1.0  # share of a stage's layers recomputed (Megatron --recompute-num-layers)
    sequence_parallel: bool = False  # shard norms/dropout along the sequence inside the TP group
    offload_activations: bool = False  # what the recompute policy saves, beyond layer inputs, waits in host memory
    offload_layer_fraction: float = 0.0  # share of a stage's layers kept whole in host memory (Megatron CPU offload)

    @property
    def dp(self) -> int:
        """All data-parallel ranks (each takes its own slice of the global batch)."""
        return self.dp_replicate * self.dp_shard

    @property
    def n_devices(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def expert_tp(self) -> int:
        """Tensor parallelism of the expert MLPs. Megatron-Core keeps the dense layers' TP for the experts by default
        (expert_tensor_parallel_size = tensor_model_parallel_size), so EP x expert-DP = dp x cp and EP lives inside
        the data-parallel ranks. MoE Parallel Folding (Liu et al. 2025, arXiv 2504.14960; Megatron Core MoE, arXiv
        2603.07685, 'the only constraint is ETP x EP x EDP = TP x CP x DP') lets the expert group span the TP ranks
        too, which an EP larger than dp x cp needs; the published folded recipes set expert_tensor_parallel_size=1
        (Megatron-Bridge qwen3_workload_base_configs.py, BASE_QWEN3_235B_A22B_CONFIG), which the planner takes."""
        return self.tp if (self.dp * self.cp) % self.ep == 0 else 1

    @property
    def experts_folded(self) -> bool:
        """Whether the expert group spans the TP ranks (expert TP below the dense layers' TP, `expert_tp`)."""
        return self.expert_tp != self.tp

    @property
    def expert_dp(self) -> int:
        """Ranks holding the same experts (expert data parallelism): tp x dp x cp / (expert TP x EP)."""
        return self.tp * self.dp * self.cp // (self.expert_tp * self.ep)

    def describe(self) -> str:
        """A compact one-line description such as 'TP8 PP16(interleaved_1f1b x4) DP64 ZeRO-1 mb1 selective SP'."""
        parts = [f"TP{self.tp}"]
        if self.pp > 1:
            schedule = self.pp_schedule
            if schedule == "interleaved_1f1b":
                schedule += f" x{self.virtual_stages}"
            parts.append(f"PP{self.pp}({schedule})")
        if self.dp_shard > 1 and self.dp_replicate > 1:
            parts.append(f"DP{self.dp_replicate}x{self.dp_shard}")
        else:
            parts.append(f"DP{self.dp}")
        if self.cp > 1:
            parts.append(f"CP{self.cp}")
        if self.ep > 1:
            parts.append(f"EP{self.ep}")
        recompute = self.recompute
        if recompute != "none" and self.recompute_fraction < 1:
            recompute += f"({100 * self.recompute_fraction:.0f}% of layers)"
        parts += [f"ZeRO-{self.zero_stage}", f"mb{self.micro_batch}", f"recompute={recompute}"]
        if self.offload_activations:
            parts[-1] += "+offload"
        if self.offload_layer_fraction > 0:
            parts[-1] += f"+offload({100 * self.offload_layer_fraction:.0f}% of layers)"
        if self.sequence_parallel:
            parts.append("SP")
        return " ".join(parts)


@dataclass(frozen=True)
class TrainSettings:
    """What is trained and with which numerics and software behaviour."""

    seq_len: int
    global_batch_seqs: int
    precision: Precision = "bf16"
    attention_kernel: AttentionKernel = "flash"  # flash: scores never reach HBM (Dao et al. 2022)
    dropout: bool = False  # GPT-style dropout stores masks and costs memory traffic
    param_bytes: int = 2  # working copy of the weights
    grad_bytes: int = 4  # gradient accumulation buffer (Megatron keeps fp32 main grads under bf16)
    grad_reduce_bytes: int = 4  # bytes per gradient on the wire in the data-parallel reduction
    optimizer_bytes_per_param: int = 12  # fp32 master weights + Adam's two moments (Rajbhandari et al. 2020)
    dp_overlap: bool = True  # data-parallel collectives overlap the backward/forward passes
    tp_overlap: bool = False  # tensor-parallel collectives overlap their GEMMs (Megatron-Core tp-comm-overlap)
    p2p_scatter_gather: bool = True  # pipeline sends split across the TP ranks (Narayanan et al. 2021, 4.1)
    dp_bucket_params: float = 0.0  # parameters per ZeRO-0/1/2 gradient bucket; 0: one per layer
    dp_bucket_params_per_rank: float = 0.0  # ... but at least this many per data-parallel rank (dp x cp)
    zero3_bucket_params: float = 0.0  # parameters per ZeRO-3 gather/scatter; 0: one per layer (FSDP units)
    ep_overlap: bool = False  # expert-parallel all-to-alls overlap another micro-batch's compute
    moe_node_limit: int = 0  # a token's experts lie in at most this many scale-up domains (0: no limit)
    reshard_after_forward: bool = True  # ZeRO-3 drops gathered weights after the forward, gathers again for backward
    grad_reduce_every_micro_batch: bool = False  # ZeRO-1/2 reduce-scatter after every micro-batch (DeepSpeed)
    fp8_saved_inputs: bool = False  # linear inputs kept for the backward in their 1-byte quantized form (TE)
    fp8_amax_pass: bool = False  # dynamic tensorwise fp8 scaling: an amax pass over each input before its cast
    fp8_param_gather: bool = False  # FSDP all-gathers fp8 weights (torchao float8 all-gather)
    gather_param_bytes: int = 0  # bytes per weight a ZeRO-3 gather moves and holds (0: param_bytes)
    logit_bytes: int = 4  # bytes per stored logit (Megatron keeps fp32 logits for its fused cross-entropy)
    moe_capacity_factor: float = 0.0  # token-dropping MoE: each expert computes a buffer of cf x its fair share
    grouped_gemm_row_tile: int = 0  # row tile of a tiled grouped expert GEMM (megablox); 0: no per-group waste
    grouped_gemm_per_group_s: float = 0.0  # extra seconds per extra expert GEMM of a one-GEMM-per-expert grouped call
    expert_host_op_s: float = 0.0  # host seconds per per-expert op exposed by the MoE dispatcher's host sync
    split_flash_backward: bool = False  # flash backward as separate dK/dV and dQ kernels, each recomputing the scores
    selective_recomputes_alternate_mms: bool = False  # selective recompute reruns every second matmul (torchtitan)
    recompute_drops_output_gemm: bool = False  # full recompute skips the MLP down projection (XLA dead code)
    recompute_fuses_elementwise: bool = False  # a recomputed layer's norms and MLP activation live inside fusions
    attention_window: int = 0  # sliding-window width of the local attention layers (0: none)
    window_layer_share: float = 0.0  # share of the layers that attend within the window only
    attention_chunk: int = 0  # chunk of the chunked local attention layers: a query sees its own chunk (0: none)
    chunk_layer_share: float = 0.0  # share of the layers that attend within their chunk only (Llama 4: 3 of 4)
    post_norms: int = 0  # extra RMSNorms per layer on the attention and MLP outputs (Gemma 3's post-norms)
    qk_norm: bool = False  # RMSNorm over each query and key head before the scores (Gemma 3, Qwen3)
    qk_head_dim: int = 0  # width of a query/key head in the score product when not hidden / heads (MLA); 0: that
    v_head_dim: int = 0  # width of a value head in the mixing product when not hidden / heads (MLA); 0: that
    eager_elementwise: bool = False  # RMSNorm, rotary, SwiGLU, repeat_kv as separate eager kernels (`eager`)
    attention_fa2: bool = False  # fused attention is FlashAttention-2 (PyTorch SDPA, flash-attn 2), not cuDNN/FA3
    foreach_optimizer: bool = False  # torch.optim's foreach AdamW (one kernel per elementwise step), not a fused one
    fsdp_flat_grad: bool = False  # FSDP1 concatenates the unsharded flat gradient (and casts it) on the compute stream
    fsdp_copy_out: bool = False  # FSDP2 copies each gathered buffer out into the parameters on the compute stream

    @property
    def activation_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def gathered_bytes(self) -> int:
        """Bytes per weight of ZeRO-3's gathered copies (fp32 weights are cast to bf16 before XLA's gather)."""
        return self.gather_param_bytes or self.param_bytes

    @property
    def gemm_precision(self) -> str:
        """Precision of the linear layers' GEMMs (fp8 and fp4 recipes keep attention and norms in bf16)."""
        return self.precision

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.global_batch_seqs


def layers_per_stage(spec: ModelSpec, layout: Layout) -> int:
    """Layers on the most loaded pipeline stage (uneven splits round up)."""
    return math.ceil(spec.n_layers / layout.pp)


def micro_batches(settings: TrainSettings, layout: Layout) -> int:
    """Micro-batches each pipeline processes per step: global batch / (dp x micro-batch)."""
    return settings.global_batch_seqs // (layout.dp * layout.micro_batch)


def check_layout(spec: ModelSpec, settings: TrainSettings, layout: Layout, n_devices: int) -> None:
    """Raise PlanError naming the first impossible choice of a layout."""
    degrees = {"tp": layout.tp, "pp": layout.pp, "dp_replicate": layout.dp_replicate, "dp_shard": layout.dp_shard,
               "cp": layout.cp, "ep": layout.ep, "vp": layout.virtual_stages, "micro_batch": layout.micro_batch}
    for name, value in degrees.items():
        if value < 1:
            raise PlanError(f"{name}={value}: must be >= 1")
    if layout.n_devices != n_devices:
        raise PlanError(
            f"tp x pp x dp x cp = {layout.tp}x{layout.pp}x{layout.dp}x{layout.cp} = {layout.n_devices}, "
            f"but --devices={n_devices}"
        )
    if spec.n_heads % layout.tp:
        raise PlanError(f"tp={layout.tp} must divide n_heads={spec.n_heads}")
    if layout.pp > spec.n_layers:
        raise PlanError(f"pp={layout.pp} exceeds n_layers={spec.n_layers}")
    if not 0 < layout.recompute_fraction <= 1:
        raise PlanError(f"recompute_fraction={layout.recompute_fraction:g}: must be in (0, 1]")
    if layout.zero_stage not in (0, 1, 2, 3):
        raise PlanError(f"zero_stage={layout.zero_stage}: expected 0, 1, 2 or 3")
    if layout.pp_schedule not in ("gpipe", "1f1b", "interleaved_1f1b"):
        raise PlanError(f"pp_schedule={layout.pp_schedule!r}: expected gpipe, 1f1b or interleaved_1f1b")
    if layout.pp_schedule == "interleaved_1f1b":
        if layout.pp < 2:
            raise PlanError("pp_schedule=interleaved_1f1b needs pp >= 2")
        if layout.virtual_stages > layers_per_stage(spec, layout):
            raise PlanError(
                f"virtual_stages={layout.virtual_stages} exceeds the {layers_per_stage(spec, layout)} layers "
                "of a stage"
            )
    elif layout.virtual_stages != 1:
        raise PlanError(f"vp={layout.virtual_stages} needs pp_schedule=interleaved_1f1b")
    if settings.seq_len < 1 or settings.global_batch_seqs < 1:
        raise PlanError(f"seq_len={settings.seq_len}, global batch={settings.global_batch_seqs}: must be >= 1")
    if settings.seq_len % layout.cp:
        raise PlanError(f"cp={layout.cp} must divide seq_len={settings.seq_len}")
    if settings.global_batch_seqs % (layout.dp * layout.micro_batch):
        raise PlanError(
            f"global batch {settings.global_batch_seqs} sequences is not divisible by "
            f"dp x micro_batch = {layout.dp}x{layout.micro_batch}"
        )
    if layout.ep > 1:
        if not spec.is_moe:
            raise PlanError(f"ep={layout.ep} needs a mixture-of-experts model")
        folded = layout.tp * layout.dp * layout.cp
        if folded % layout.ep or layout.ep > spec.n_experts:
            raise PlanError(f"ep={layout.ep} must divide dp x cp = {layout.dp * layout.cp} (or, folded over "
                            f"tensor parallelism with expert TP 1, tp x dp x cp = {folded}) and be <= the "
                            f"{spec.n_experts} experts")
    if layout.offload_activations and layout.recompute == "full":
        raise PlanError("offload_activations needs recompute none or selective (full keeps only layer inputs)")
    if not 0 <= layout.offload_layer_fraction <= 1 or (layout.offload_layer_fraction and layout.recompute != "none"):
        raise PlanError("offload_layer_fraction must be in [0, 1] and needs recompute none")
    if layout.sequence_parallel and layout.tp == 1:
        raise PlanError("sequence parallelism needs tp >= 2")
