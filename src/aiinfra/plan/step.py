"""Step time of one training step: computation, collectives, pipeline bubble and optimizer, per device.

Conventions (see aiinfra.spec for the FLOP count): model FLOPs = 3 x forward (6N + attention, full sequence, no
causal discount); MFU divides them by step time x devices x dense peak (PaLM, Chowdhery et al. 2022, appendix B);
HFU also counts recomputed forward work, which is what Megatron-LM reports as "achieved TFLOP/s per GPU"
(Narayanan et al. 2021, eq. 3).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiinfra.plan.cluster import Cluster, collective_time_s
from aiinfra.plan.dp_comm import dp_comm_s, overlapped_s
from aiinfra.plan.eager import eager_extra_forward_bytes, foreach_adamw_bytes_per_param
from aiinfra.plan.layout import (
    Layout,
    TrainSettings,
    check_layout,
    layers_per_stage,
    local_attention_widths,
    micro_batches,
)
from aiinfra.plan.memory import memory_breakdown
from aiinfra.plan.moe_routing import (
    ep_comm_s,
    expert_gemm_rows,
    expert_host_exposed_s,
    grouped_call_s,
    multi_stream_floor_s,
)
from aiinfra.plan.offload import host_transfer_exposed_s, layer_offload_exposed_s
from aiinfra.spec import ModelSpec

# Bytes moved per logit by a fused vocab-parallel cross-entropy (write bf16 logits, read them, write fp32
# softmax statistics and gradient): a stated approximation, small next to the head GEMM.
CROSS_ENTROPY_BYTES_PER_LOGIT = 10
# Backward elementwise kernels read the saved input and the incoming gradient and write a gradient: about twice
# the forward traffic. Flash attention's backward does 5 matmuls to the forward's 2 (Dao 2023, FlashAttention-2).
BACKWARD_ELEMENTWISE_FACTOR = 2.0
FLASH_BACKWARD_FACTOR = 2.5
# A backward split into a dK/dV kernel (recompute S = QK^T, then dV, dP = dO V^T, dK: 4 matmuls) and a dQ kernel
# (S again, dP again, dQ: 3), as JAX's Pallas TPU flash attention runs it (_flash_attention_bwd_dkv and
# _flash_attention_bwd_dq): 7 matmuls to the forward's 2.
SPLIT_FLASH_BACKWARD_FACTOR = 3.5
FLASH_BLOCK = 128  # query/key tile: a causal mask skips every tile above the diagonal
SELECTIVE_ELEMENTWISE_SHARE = 0.5  # of a layer's elementwise traffic that selective recompute repeats (flash)
GEMM_INPUT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "fp4": 0.5625}  # NVFP4: 16 values + a scale
# A bf16 -> fp8 cast reads 2 bytes and writes the fp8 copy and its transpose, 1 + 1 per element: the weight-gradient
# GEMM needs the input quantized along the other axis (Transformer Engine's fused cast_transpose on Hopper; MXFP8 and
# NVFP4 keep rowwise and columnwise copies, each with its own block scales).
FP8_CAST_BYTES = 4
FP8_TRANSPOSE_BYTES = 2  # the transposed copy made from an fp8 tensor: read 1 byte, write 1
# Dynamic tensorwise scaling reads each bf16 input once more to find its absolute maximum before the cast can scale
# it (torchao float8 "tensorwise" recipe: the scale is computed from the current tensor's amax); delayed or block
# scaling (Transformer Engine's amax history, MXFP8) folds the scale into the cast's own pass.
AMAX_PASS_BYTES = 2
MOE_PERMUTE_PASSES = 4  # permute (read + write) and unpermute (read + write) of every routed token copy


@dataclass(frozen=True)
class PassTimes:
    """Seconds of one layer's forward pass for one micro-batch on one device, by kind of work."""

    gemm_s: float
    mlp_gemm_s: float  # the MLP's share of gemm_s (router and experts for mixture-of-experts)
    attention_s: float  # score and value products (materialized or fused)
    scores_elementwise_s: float  # softmax/dropout on materialized scores (recomputed by selective recompute)
    elementwise_s: float  # norms, residuals, activations, rotary
    tp_comm_s: float  # tensor/sequence-parallel collectives, before any overlap
    cp_comm_s: float  # context-parallel K/V all-gather
    ep_comm_s: float  # expert-parallel all-to-all (dispatch and combine)


def _gemm_time_s(cluster: Cluster, precision: str, m: float, k: float, n: float, count: float = 1.0) -> float:
    """One GEMM (or `count` of them) at its roofline: the shape-dependent share of the peak, or the time to move its
    operands and result through HBM, whichever is longer (Williams et al. 2009); skinny GEMMs on fast chips are
    memory-bound."""
    flops = 2.0 * m * k * n * count
    compute = flops / (cluster.peak_flops(precision) * cluster.efficiency.gemm_efficiency(m, k, n, precision))
    operand_bytes = GEMM_INPUT_BYTES.get(precision, 2.0)
    traffic = ((m * k + k * n) * operand_bytes + m * n * 2.0) * count
    return max(compute, traffic / (cluster.memory_bw_bytes_per_s * cluster.efficiency.gemm_bw_efficiency))


def _mlp_gemm_s(spec: ModelSpec, layout: Layout, cluster: Cluster, precision: str, m: float,
                capacity_factor: float = 0.0, row_tile: int = 0, per_group_s: float = 0.0) -> float:
    """The MLP's GEMMs for m tokens: dense, or router plus local experts' grouped GEMMs (`expert_tokens`), each of
    the two grouped calls paying `split_gemm_overhead_s` where it runs one GEMM per expert."""
    # Experts split over their own tensor parallelism (`Layout.expert_tp`), dense MLPs over the layers' TP.
    ffn_local = spec.ffn_dim / (layout.expert_tp if spec.is_moe else layout.tp)
    mlp_in = (2 if spec.mlp == "swiglu" else 1) * ffn_local
    h = spec.dim
    if not spec.is_moe:
        return _gemm_time_s(cluster, precision, m, h, mlp_in) + _gemm_time_s(cluster, precision, m, ffn_local, h)
    gemm = 0.0
    if spec.n_experts > 1:  # a single expert takes every token: nothing to route
        gemm += _gemm_time_s(cluster, precision, m, h, spec.n_experts)  # router
    local_experts = spec.n_experts / layout.ep
    tokens_per_expert = expert_gemm_rows(spec, layout, m, capacity_factor, row_tile)
    floor = multi_stream_floor_s(cluster, per_group_s)
    up = _gemm_time_s(cluster, precision, tokens_per_expert, h, mlp_in, local_experts)
    down = _gemm_time_s(cluster, precision, tokens_per_expert, ffn_local, h, local_experts)
    return (gemm + grouped_call_s(up, local_experts, per_group_s, floor)
            + grouped_call_s(down, local_experts, per_group_s, floor))


def mlp_down_projection_s(spec: ModelSpec, settings: TrainSettings, layout: Layout, cluster: Cluster) -> float:
    """Forward time of a layer's last GEMM, the MLP's down projection (the local experts' under MoE), whose output
    only feeds the residual sum: under XLA a full recompute leaves it out (`recompute_drops_output_gemm`)."""
    m = layout.micro_batch * settings.seq_len / layout.cp
    ffn_local = spec.ffn_dim / (layout.expert_tp if spec.is_moe else layout.tp)
    if not spec.is_moe:
        return _gemm_time_s(cluster, settings.gemm_precision, m, ffn_local, spec.dim)
    rows = expert_gemm_rows(spec, layout, m, settings.moe_capacity_factor, settings.grouped_gemm_row_tile)
    local = spec.n_experts / layout.ep
    per_group = settings.grouped_gemm_per_group_s
    return grouped_call_s(_gemm_time_s(cluster, settings.gemm_precision, rows, ffn_local, spec.dim, local), local,
                          per_group, multi_stream_floor_s(cluster, per_group))


def attention_product_flops(spec: ModelSpec, settings: TrainSettings, m: float, heads: float) -> float:
    """Forward FLOPs of QK^T and PV for m query tokens over the full key range (spec convention): 2 x seq x heads x
    (query/key width + value width) per token, the widths being hidden / heads unless the model's attention says
    otherwise (MLA: 192 and 128, `runs.ATTENTION_HEAD_DIMS`)."""
    qk = settings.qk_head_dim or spec.head_dim
    v = settings.v_head_dim or spec.head_dim
    return 2.0 * m * settings.seq_len * heads * (qk + v)


def flash_tile_fraction(settings: TrainSettings) -> float:
    """Share of the full score square a fused causal kernel computes, averaged over layers: tiles above the diagonal
    are skipped, 0.5 (1 + B / s); a sliding-window layer of width w computes only the tiles its window reaches,
    (w + B) / s (FlashAttention-2's window_size; the local layers of GPT-OSS, config.json sliding_window 128 on every
    second layer, `runs.SLIDING_WINDOWS`); a chunked layer the causal tiles of its own chunks, 0.5 (1 + B / c) c / s
    for chunks of c < s (Llama 4's chunked layers, `runs.CHUNKED_ATTENTION`)."""
    seq = settings.seq_len
    causal = 0.5 * (1 + FLASH_BLOCK / seq) if seq > FLASH_BLOCK else 1.0
    fraction = causal
    if settings.window_layer_share > 0 and settings.attention_window > 0:
        windowed = min(causal, (settings.attention_window + FLASH_BLOCK) / seq)
        fraction -= settings.window_layer_share * (causal - windowed)
    chunk = settings.attention_chunk
    if settings.chunk_layer_share > 0 and 0 < chunk < seq:
        chunked = min(causal, 0.5 * (1 + FLASH_BLOCK / chunk) * chunk / seq)
        fraction -= settings.chunk_layer_share * (causal - chunked)
    return fraction


def alternate_mm_shapes(spec: ModelSpec, layout: Layout) -> list[tuple[float, float]]:
    """(k, n) of every second matmul of a transformer block in execution order, per micro-batch token row: q, k,
    v, o, then the MLP's w1, w3 (gate) and w2 (torchtitan's Attention and FeedForward), i.e. k, o and w3 (fc2 for
    a 2-matrix MLP). An MoE block's experts run as grouped GEMMs, outside the count: only k and o."""
    h = spec.dim
    q_local, kv_local = local_attention_widths(spec, layout.tp)
    ffn_local = spec.ffn_dim / layout.tp
    shapes = [(h, kv_local), (q_local, h)]
    if not spec.is_moe:
        shapes.append((h, ffn_local) if spec.mlp == "swiglu" else (ffn_local, h))
    return shapes


def alternate_mm_recompute_s(spec: ModelSpec, settings: TrainSettings, layout: Layout, cluster: Cluster) -> float:
    """Forward time of the matmuls torchtitan's per-op selective checkpointing recomputes: it saves the output of
    every compute op except every second aten.mm of a block (torchtitan activation checkpointing, _custom_policy:
    "Saves output of all compute ops, except every second mm"), so those GEMMs run again in the backward."""
    m = layout.micro_batch * settings.seq_len / layout.cp
    return sum(_gemm_time_s(cluster, settings.gemm_precision, m, k, n) for k, n in alternate_mm_shapes(spec, layout))


def _attention_core(spec: ModelSpec, settings: TrainSettings, cluster: Cluster, m: float,
                    heads_local: float) -> tuple[float, float]:
    """(seconds, score bytes) of one layer's attention products for m tokens on one device: a fused kernel at its
    own efficiency over the tiles it visits, or materialized per-head GEMMs with their softmax traffic."""
    eff = cluster.efficiency
    a = settings.activation_bytes
    seq = settings.seq_len
    attention_flops = attention_product_flops(spec, settings, m, heads_local)
    scores_bytes = 0.0
    if settings.attention_kernel == "flash":
        # Tiles above the causal diagonal are skipped; the kernel runs at its own efficiency.
        causal_fraction = flash_tile_fraction(settings)
        # fp8/fp4 recipes keep the attention products in bf16 (Transformer Engine's default DotProductAttention).
        attention = attention_flops * causal_fraction / (cluster.peak_flops("bf16")
                                                          * eff.flash_efficiency(settings.attention_fa2))
    else:
        # Batched GEMMs per head, (s x d) @ (d x s) and (s x s) @ (s x d): thin in the head dimension.
        per_head_eff = eff.gemm_efficiency(m, spec.head_dim, seq, "bf16")
        attention = attention_flops / (cluster.peak_flops("bf16") * per_head_eff)
        mask = 1 if settings.dropout else 0
        # Fused scale-mask-softmax reads and writes each score; dropout reads, writes and stores a mask.
        scores_bytes = m * heads_local * seq * (2 * a + (2 * a + 1) * mask)

    return attention, scores_bytes


def _elementwise_bytes(spec: ModelSpec, settings: TrainSettings, layout: Layout, m: float) -> float:
    """Bytes one layer's memory-bound kernels move in the forward for m tokens on one device: norms, residuals,
    activation, rotary, QK-norm, MoE permutation, low-precision casts and an eager run's unfused ops."""
    a = settings.activation_bytes
    tp = layout.tp
    h = spec.dim
    precision = settings.gemm_precision
    q_local, kv_local = local_attention_widths(spec, tp)
    ffn_local = spec.ffn_dim / tp
    sp_divisor = tp if layout.sequence_parallel else 1
    mask = 1 if settings.dropout else 0
    # Two norms (read + write) and two residual adds (read two, write one, plus dropout mask).
    replicated_bytes = m * h * (10 * a + 2 * mask) / sp_divisor
    # Post-norms after attention and MLP (Gemma 3) read and write the residual-width output once more each.
    replicated_bytes += m * h * 2 * a * settings.post_norms / sp_divisor
    activation_bytes = m * (2 if spec.mlp == "gelu" else 3) * a * ffn_local
    if spec.is_moe:
        activation_bytes *= spec.experts_per_token
    rotary_bytes = m * 2 * a * (q_local + kv_local) if spec.position == "rope" else 0.0
    # QK-norm (Gemma 3, Qwen3): an RMSNorm over every query and key head reads and writes q and k once more.
    qk_norm_bytes = m * 2 * a * (q_local + kv_local) if settings.qk_norm else 0.0
    if spec.is_moe and spec.n_experts > 1:
        # Token permutation before the experts and unpermutation after: each routed copy is read and written twice
        # (folded to expert TP 1, a TP rank permutes only its own m / tp tokens: `moe_routing.expert_tokens`).
        permuted = m * layout.expert_tp / tp
        activation_bytes += permuted * spec.experts_per_token * h * a * MOE_PERMUTE_PASSES
    if precision in ("fp8", "fp4"):
        # Each low-precision GEMM casts its input before it runs (Transformer Engine's per-tensor or block
        # scaling): the attention input (h), the attention output (q_local), the MLP input (h, each routed copy
        # under MoE) and the MLP's inner activation (ffn_local). Under sequence parallelism the two norm outputs are
        # quantized on the rank's own S/TP rows and all-gathered in fp8 (Transformer Engine's Linear/LayerNormLinear:
        # the input quantizer runs before gather_along_first_dim), and the transposed copy is made from the gathered
        # fp8 tensor (read 1, write 1).
        experts = spec.experts_per_token if spec.is_moe else 1
        cast = FP8_CAST_BYTES + (AMAX_PASS_BYTES if settings.fp8_amax_pass else 0)
        gathered = sp_divisor > 1
        norm_cast = (cast - 1) / sp_divisor + FP8_TRANSPOSE_BYTES if gathered else cast  # local cast, then transpose
        attention_in = h * norm_cast
        mlp_in = h * experts * cast if spec.is_moe else h * norm_cast
        activation_bytes += m * (attention_in + mlp_in + cast * (q_local + ffn_local * experts))
    activation_bytes += eager_extra_forward_bytes(spec, settings, layout, m)  # unfused ops of an eager run
    return replicated_bytes + activation_bytes + rotary_bytes + qk_norm_bytes


def layer_forward_times(spec: ModelSpec, settings: TrainSettings, layout: Layout, cluster: Cluster) -> PassTimes:
    """Forward-pass costs of one transformer layer for one micro-batch on one device."""
    eff = cluster.efficiency
    precision = settings.gemm_precision
    a = settings.activation_bytes
    tp = layout.tp
    h = spec.dim
    m = layout.micro_batch * settings.seq_len / layout.cp  # tokens this device computes
    q_local, kv_local = local_attention_widths(spec, tp)
    heads_local = spec.n_heads / tp

    gemm = _gemm_time_s(cluster, precision, m, h, q_local + 2 * kv_local)  # fused QKV projection
    gemm += _gemm_time_s(cluster, precision, m, q_local, h)  # output projection
    mlp_gemm = _mlp_gemm_s(spec, layout, cluster, precision, m, settings.moe_capacity_factor,
                           settings.grouped_gemm_row_tile, settings.grouped_gemm_per_group_s)
    gemm += mlp_gemm

    seq = settings.seq_len
    attention, scores_bytes = _attention_core(spec, settings, cluster, m, heads_local)
    elementwise_bytes = _elementwise_bytes(spec, settings, layout, m)
    bandwidth = cluster.memory_bw_bytes_per_s * eff.memory_bw_efficiency
    elementwise = elementwise_bytes / bandwidth

    # Two all-reduces per layer (Shoeybi et al. 2019), or the same bytes as all-gather + reduce-scatter pairs
    # under sequence parallelism (Korthikanti et al. 2022, 4.2.2).
    # Folded experts (expert TP 1) are not tensor-parallel: the MoE block has no TP collective, only attention's.
    tp_blocks = 1 if spec.is_moe and layout.experts_folded else 2
    tp_comm = tp_blocks * collective_time_s(cluster, "all_reduce", m * h * a, tp, 1)
    kv_bytes = layout.micro_batch * seq * 2 * kv_local * a
    cp_comm = collective_time_s(cluster, "all_gather", kv_bytes, layout.cp, tp)  # all-gather CP (Llama 3, 3.3.2)
    ep_comm = ep_comm_s(spec, settings, layout, cluster, m)
    return PassTimes(
        gemm_s=gemm,
        mlp_gemm_s=mlp_gemm,
        attention_s=attention,
        scores_elementwise_s=scores_bytes / bandwidth,
        elementwise_s=elementwise,
        tp_comm_s=tp_comm,
        cp_comm_s=cp_comm,
        ep_comm_s=ep_comm,
    )


@dataclass(frozen=True)
class MicroBatchTimes:
    """Seconds one device spends on one micro-batch through one layer (forward, backward, recomputation)."""

    compute_s: float
    tp_comm_exposed_s: float
    other_comm_exposed_s: float  # context and expert parallel, host transfers of offloaded activations, and the
    # host work the MoE dispatcher's host sync exposes (`moe_routing.expert_host_exposed_s`)
    backward_s: float  # the backward share, the window that data-parallel reductions overlap

    @property
    def total_s(self) -> float:
        return self.compute_s + self.tp_comm_exposed_s + self.other_comm_exposed_s


def layer_micro_batch_times(
    spec: ModelSpec, settings: TrainSettings, layout: Layout, cluster: Cluster
) -> MicroBatchTimes:
    """Forward + backward (+ recomputation) of one layer for one micro-batch."""
    fwd = layer_forward_times(spec, settings, layout, cluster)
    flash_bwd = SPLIT_FLASH_BACKWARD_FACTOR if settings.split_flash_backward else FLASH_BACKWARD_FACTOR
    attention_bwd = flash_bwd if settings.attention_kernel == "flash" else 2.0
    fwd_compute = fwd.gemm_s + fwd.attention_s + fwd.scores_elementwise_s + fwd.elementwise_s
    bwd_compute = (
        2 * fwd.gemm_s
        + attention_bwd * fwd.attention_s
        + BACKWARD_ELEMENTWISE_FACTOR * (fwd.scores_elementwise_s + fwd.elementwise_s)
    )
    recompute = 0.0
    recomputed_tp_passes = 0.0
    if layout.recompute == "full":
        recompute = fwd_compute
        recomputed_tp_passes = 1.0
        if settings.recompute_drops_output_gemm:
            # The down projection and the reduction after it (a reduce-scatter of the two all-gather/reduce-scatter
            # pairs under sequence parallelism, else one of the two all-reduces) are not rerun.
            recompute -= mlp_down_projection_s(spec, settings, layout, cluster)
            recomputed_tp_passes = 0.75 if layout.sequence_parallel else 0.5
    elif layout.offload_activations:
        # Offloaded policy: the attention side comes back from the host, the MLP and the norms run again.
        recompute = fwd.mlp_gemm_s + fwd.elementwise_s
    elif layout.recompute == "selective" and settings.attention_kernel == "materialized":
        recompute = fwd.attention_s + fwd.scores_elementwise_s
    elif layout.recompute == "selective":
        # Keeping matmul outputs only, the norms and the gated product run again: about half the elementwise work.
        # torchtitan's per-op policy saves only mm, SDPA, reduce-scatter and max outputs (_save_list), so every
        # elementwise op of the block runs again.
        per_op = settings.selective_recomputes_alternate_mms
        recompute = (1.0 if per_op else SELECTIVE_ELEMENTWISE_SHARE) * fwd.elementwise_s
        if per_op:
            recompute += alternate_mm_recompute_s(spec, settings, layout, cluster)
    recompute *= layout.recompute_fraction
    recomputed_tp_passes *= layout.recompute_fraction

    def exposed(comm: float, hidden_behind: float) -> float:
        return overlapped_s(comm, hidden_behind) if settings.tp_overlap else comm

    tp_exposed = exposed(fwd.tp_comm_s, fwd.gemm_s) + exposed(fwd.tp_comm_s, 2 * fwd.gemm_s)
    tp_exposed += recomputed_tp_passes * exposed(fwd.tp_comm_s, fwd.gemm_s)
    # K/V gathers overlap the attention of the chunk already present; the backward gathers and reduce-scatters.
    cp_exposed = overlapped_s(fwd.cp_comm_s, fwd.attention_s)
    cp_exposed += overlapped_s(2 * fwd.cp_comm_s, attention_bwd * fwd.attention_s)
    offload = host_transfer_exposed_s(spec, settings, layout, cluster, fwd_compute, bwd_compute + recompute)
    offload += layer_offload_exposed_s(spec, settings, layout, cluster, fwd_compute, bwd_compute)
    if settings.ep_overlap:
        # Dispatch and combine of one micro-batch run under another's compute (Megatron-Core's EP all-to-all
        # overlap in 1F1B; DeepSeek-V3's DualPipe), paying the SM tax.
        ep_exposed = overlapped_s(2 * fwd.ep_comm_s, fwd_compute + bwd_compute)
    else:
        ep_exposed = 2 * fwd.ep_comm_s  # dispatch/combine block the expert GEMMs in both passes
    # Dropless routing only: a capacity-padded buffer has static sizes and needs no host sync (drop-and-pad is
    # Megatron's "no_sync" point).
    dropless = spec.is_moe and settings.moe_capacity_factor <= 0
    host = expert_host_exposed_s(spec.n_experts / layout.ep, settings.expert_host_op_s) if dropless else 0.0
    return MicroBatchTimes(
        compute_s=fwd_compute + bwd_compute + recompute,
        tp_comm_exposed_s=tp_exposed,
        other_comm_exposed_s=cp_exposed + ep_exposed + offload + host,
        backward_s=bwd_compute + recompute,
    )


def head_micro_batch_s(spec: ModelSpec, settings: TrainSettings, layout: Layout, cluster: Cluster) -> float:
    """Output projection and cross-entropy for one micro-batch (forward + backward), on the last stage."""
    m = layout.micro_batch * settings.seq_len / layout.cp
    vocab_local = spec.vocab_size / layout.tp
    gemm = _gemm_time_s(cluster, "bf16", m, spec.dim, vocab_local)  # low-precision recipes keep the head in bf16
    bandwidth = cluster.memory_bw_bytes_per_s * cluster.efficiency.memory_bw_efficiency
    loss = m * vocab_local * CROSS_ENTROPY_BYTES_PER_LOGIT / bandwidth
    return 3 * gemm + (1 + BACKWARD_ELEMENTWISE_FACTOR) * loss


def hardware_flops_per_token(spec: ModelSpec, seq_len: int, recompute: str, attention_kernel: str,
                             recompute_fraction: float = 1.0, offload: bool = False,
                             alternate_mms: bool = False, drops_output_gemm: bool = False) -> float:
    """Training FLOPs per token including recomputation (the HFU numerator; Megatron's eq. 3 for full); the offload
    policy recomputes the MLP's forward; under XLA a full recompute leaves out the MLP's down projection."""
    flops = float(spec.train_flops_per_token(seq_len))
    head = 2.0 * spec.vocab_size * spec.dim
    if offload:
        matrices = 3 if spec.mlp == "swiglu" else 2
        flops += 2.0 * matrices * spec.dim * spec.ffn_dim * (spec.experts_per_token if spec.is_moe else 1) \
            * spec.n_layers
    elif recompute == "full":
        flops += recompute_fraction * (spec.forward_flops_per_token(seq_len) - head)  # the head is not recomputed
        if drops_output_gemm:
            flops -= recompute_fraction * spec.n_layers * 2.0 * spec.dim * spec.ffn_dim \
                * (spec.experts_per_token if spec.is_moe else 1)
    elif recompute == "selective" and attention_kernel == "materialized":
        flops += recompute_fraction * spec.attention_flops_per_token(seq_len)
    elif recompute == "selective" and alternate_mms:
        flops += recompute_fraction * spec.n_layers * sum(2.0 * k * n for k, n in alternate_mm_shapes(spec, Layout()))
    return flops


@dataclass(frozen=True)
class StepBreakdown:
    """One training step on the critical pipeline stage; all times in seconds."""

    compute_s: float  # all micro-batches' computation on the slowest stage
    tp_comm_s: float  # exposed tensor/sequence-parallel communication
    other_comm_s: float  # exposed context/expert-parallel communication, host (offload) transfers, MoE host sync
    pp_p2p_s: float  # pipeline sends and receives
    bubble_s: float  # pipeline fill and drain
    dp_comm_s: float  # exposed data-parallel / ZeRO / FSDP collectives
    optimizer_s: float  # the optimizer update (memory-bound)
    step_time_s: float
    micro_batches: int
    model_flops: float  # per step, whole cluster
    hardware_flops: float  # per step, whole cluster, recomputation included

    def mfu(self, cluster: Cluster, precision: str) -> float:
        """Model FLOPs utilisation: model FLOPs / (step time x devices x dense peak)."""
        return self.model_flops / (self.step_time_s * cluster.n_devices * cluster.peak_flops(precision))

    def hfu(self, cluster: Cluster, precision: str) -> float:
        """Hardware FLOPs utilisation: like MFU but counting recomputed forward work."""
        return self.hardware_flops / (self.step_time_s * cluster.n_devices * cluster.peak_flops(precision))


def step_breakdown(spec: ModelSpec, settings: TrainSettings, layout: Layout, cluster: Cluster) -> StepBreakdown:
    """Predict one training step: slowest stage x micro-batches + bubble + data-parallel + optimizer."""
    check_layout(spec, settings, layout, cluster.n_devices)
    m = micro_batches(settings, layout)
    mb = layer_micro_batch_times(spec, settings, layout, cluster)
    head = head_micro_batch_s(spec, settings, layout, cluster)
    stage_layers = layers_per_stage(spec, layout)
    if layout.pp == 1:
        slowest, typical = stage_layers * mb.total_s + head, stage_layers * mb.total_s + head
    else:
        # The last stage carries the output head; uneven splits put fewer layers there (Llama 3, 3.3.2).
        last_stage = (spec.n_layers - (layout.pp - 1) * stage_layers) * mb.total_s + head
        slowest = max(stage_layers * mb.total_s, last_stage)
        typical = stage_layers * mb.total_s
    # Each chunk boundary sends activations forward and gradients back; SP or the scatter/gather optimization
    # sends 1/t of them per TP rank (Narayanan et al. 2021, 4.1).
    p2p_bytes = layout.micro_batch * settings.seq_len / layout.cp * spec.dim * settings.activation_bytes
    if layout.sequence_parallel or settings.p2p_scatter_gather:
        p2p_bytes /= layout.tp
    stage_stride = layout.tp * layout.cp * layout.dp
    p2p_one = collective_time_s(cluster, "p2p", p2p_bytes, 2 if layout.pp > 1 else 1, stage_stride)
    p2p_per_micro_batch = 2 * layout.virtual_stages * p2p_one
    # Fill and drain: (p - 1) / v micro-batch slots (GPipe, Huang et al. 2019; 1F1B and interleaved 1F1B,
    # Narayanan et al. 2021, 2.2).
    bubble = (layout.pp - 1) / layout.virtual_stages * (typical + p2p_per_micro_batch)
    dp = dp_comm_s(spec, settings, layout, cluster, mb, stage_layers, m)

    states = memory_breakdown(spec, settings, layout)
    params_updated = states.optimizer_bytes / settings.optimizer_bytes_per_param
    # Adam reads and writes master weights and moments, reads the gradient, writes the working weights.
    touched = params_updated * (2 * settings.optimizer_bytes_per_param + settings.grad_bytes + settings.param_bytes)
    if settings.foreach_optimizer:  # unfused torch.optim AdamW: eight passes (`eager.foreach_adamw_bytes_per_param`)
        touched = params_updated * foreach_adamw_bytes_per_param()
    optimizer = touched / (cluster.memory_bw_bytes_per_s * cluster.efficiency.memory_bw_efficiency)

    compute = m * (slowest - stage_layers * (mb.tp_comm_exposed_s + mb.other_comm_exposed_s))
    step = m * (slowest + p2p_per_micro_batch) + bubble + dp + optimizer
    tokens = settings.tokens_per_step
    return StepBreakdown(
        compute_s=compute,
        tp_comm_s=m * stage_layers * mb.tp_comm_exposed_s,
        other_comm_s=m * stage_layers * mb.other_comm_exposed_s,
        pp_p2p_s=m * p2p_per_micro_batch,
        bubble_s=bubble,
        dp_comm_s=dp,
        optimizer_s=optimizer,
        step_time_s=step,
        micro_batches=m,
        model_flops=tokens * float(spec.train_flops_per_token(settings.seq_len)),
        hardware_flops=tokens
        * hardware_flops_per_token(spec, settings.seq_len, layout.recompute, settings.attention_kernel,
                                   layout.recompute_fraction, layout.offload_activations,
                                   settings.selective_recomputes_alternate_mms, settings.recompute_drops_output_gemm),
    )
