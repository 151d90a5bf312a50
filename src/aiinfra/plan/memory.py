"""Memory per device: weights, gradients and optimizer state under ZeRO 0-3, and activations.

Activations are counted tensor by tensor, as Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", arXiv 2205.05198, section 4.1) do for a GPT layer, so the same code also covers grouped-query
attention, SwiGLU, mixture-of-experts, flash attention and layers without dropout. For a GPT layer with dropout it
reduces to their Table 2: s b h (34 + 5 a s / h) bytes without parallelism, s b h (10 + 24/t + 5 a s /(h t)) with
tensor parallelism, s b h (34/t + 5 a s/(h t)) with sequence parallelism, 34 s b h / t with selective
recomputation on top, and 2 s b h (/t under sequence parallelism) with full recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from aiinfra.plan.layout import Layout, TrainSettings, layers_per_stage, local_attention_widths, micro_batches
from aiinfra.spec import ModelSpec


@dataclass(frozen=True)
class ActivationTerms:
    """Bytes stored per token per layer for one micro-batch, split by how tensor parallelism divides them."""

    replicated_bytes: float  # norms, residual inputs, dropout masks: split only under sequence parallelism
    split_bytes: float  # tensors inside the TP-sharded matmuls (Q, K, V, MLP hidden), always / t
    scores_bytes: float  # materialized attention scores (softmax, dropout): dropped by selective recomputation


def activation_terms(spec: ModelSpec, settings: TrainSettings, tp: int) -> ActivationTerms:
    """Per-token, per-layer stored activations (bytes) of one device's TP shard, before sequence parallelism."""
    a = settings.activation_bytes
    mask = 1 if settings.dropout else 0  # dropout masks are one byte per element (Korthikanti 4.1)
    h = spec.dim
    q_local, kv_local = local_attention_widths(spec, tp)
    heads_local = spec.n_heads / tp
    ffn_local = spec.ffn_dim / tp
    experts = spec.experts_per_token if spec.is_moe else 1
    # Norm input and matmul input for attention and MLP, plus the dropout mask after each.
    replicated = 4 * a * h + 2 * mask * h
    attention = a * q_local + 2 * a * kv_local + a * q_local  # Q, K, V for the score/value products; proj input
    if spec.mlp == "gelu":
        mlp = 2 * a * ffn_local  # GELU input (FC1 output) and FC2 input
    else:
        mlp = 3 * a * ffn_local  # gate output, up output, their product (down-projection input)
    mlp *= experts
    if settings.fp8_saved_inputs and settings.precision in ("fp8", "fp4"):
        # Transformer Engine keeps the quantized (1-byte) copy of each linear layer's input for the weight-gradient
        # GEMM, not the 16-bit one: the two norm outputs (h each), the attention output and the down-projection input.
        replicated -= (a - 1) * 2 * h
        attention -= (a - 1) * q_local
        mlp -= (a - 1) * ffn_local * experts
    if settings.attention_kernel == "flash":
        scores = 0.0
        attention += 4 * heads_local  # fp32 log-sum-exp per head, kept for the backward pass
    else:
        # softmax output (2 bytes), dropout mask (1) and dropout output (2) per score: 5 a s in Table 2.
        scores = (a + mask + a * mask) * heads_local * settings.seq_len
    return ActivationTerms(replicated_bytes=replicated, split_bytes=attention + mlp, scores_bytes=scores)


def layer_input_bytes(spec: ModelSpec, settings: TrainSettings, layout: Layout) -> float:
    """The layer input of one micro-batch (what full recomputation keeps; Korthikanti Table 2: 2 s b h)."""
    tokens = layout.micro_batch * settings.seq_len / layout.cp
    return tokens * settings.activation_bytes * spec.dim / (layout.tp if layout.sequence_parallel else 1)


def offloaded_layer_bytes(spec: ModelSpec, settings: TrainSettings, layout: Layout) -> float:
    """Bytes of one layer and micro-batch that wait in host memory under activation offload.

    The policy is MaxText's tuned `remat_policy: custom` (tpu-recipes' Llama 3.1 configs: decoder_layer_input,
    query_proj, key_proj, value_proj and out_proj set to offload; everything else rematerialized): the layer input,
    Q, K, V and the attention output go to the host (jax.checkpoint's save_and_offload_only_these_names), the MLP and
    the norms are recomputed in the backward.
    """
    if not layout.offload_activations:
        return 0.0
    a = settings.activation_bytes
    tokens = layout.micro_batch * settings.seq_len / layout.cp
    q_local, kv_local = local_attention_widths(spec, layout.tp)
    lse = 4 * spec.n_heads / layout.tp if settings.attention_kernel == "flash" else 0.0
    return tokens * (a * (2 * q_local + 2 * kv_local) + lse) + layer_input_bytes(spec, settings, layout)


def stored_layer_bytes(spec: ModelSpec, settings: TrainSettings, layout: Layout) -> float:
    """Everything one layer saves for its backward for one micro-batch (what whole-layer offload moves)."""
    return _layer_activation_bytes(spec, settings, layout)


def layer_activation_bytes(spec: ModelSpec, settings: TrainSettings, layout: Layout) -> float:
    """Activations one layer stores for one micro-batch on one device, averaged over the stage's layers when only
    a share of them is recomputed (the others keep everything)."""
    if layout.offload_activations:
        return 0.0
    stored = _layer_activation_bytes(spec, settings, layout)
    if layout.offload_layer_fraction > 0:  # those layers' activations wait in host memory
        return (1 - layout.offload_layer_fraction) * stored
    if layout.recompute == "none" or layout.recompute_fraction >= 1:
        return stored
    kept = _layer_activation_bytes(spec, settings, replace(layout, recompute="none"))
    return layout.recompute_fraction * stored + (1 - layout.recompute_fraction) * kept


def _layer_activation_bytes(spec: ModelSpec, settings: TrainSettings, layout: Layout) -> float:
    tokens = layout.micro_batch * settings.seq_len / layout.cp
    terms = activation_terms(spec, settings, layout.tp)
    sp_divisor = layout.tp if layout.sequence_parallel else 1
    if layout.recompute == "full":
        # Only the layer input survives the forward pass (Chen et al. 2016; Korthikanti Table 2: 2 s b h).
        return tokens * settings.activation_bytes * spec.dim / sp_divisor
    stored = terms.replicated_bytes / sp_divisor + terms.split_bytes
    if layout.recompute == "none":
        stored += terms.scores_bytes
    elif settings.attention_kernel == "flash":
        # With fused attention there are no scores to drop; selective policies (torchtitan's per-op AC, MaxText's
        # "minimal") keep the matmul outputs and recompute the elementwise ops between them: the norm outputs
        # and, in a gated MLP, the product of gate and up.
        stored -= _elementwise_output_bytes(spec, settings, layout, gelu_output=False)
    return tokens * stored


def _elementwise_output_bytes(spec: ModelSpec, settings: TrainSettings, layout: Layout, gelu_output: bool) -> float:
    """Per-token bytes of a layer's elementwise outputs that feed a matmul: the two norm outputs and the MLP
    activation's output (SwiGLU's gate x up; GELU's output only where `gelu_output`, since a selective policy keeps
    it as the down projection's saved input)."""
    a = settings.activation_bytes
    experts = spec.experts_per_token if spec.is_moe else 1
    sp_divisor = layout.tp if layout.sequence_parallel else 1
    activation = a * spec.ffn_dim / layout.tp * experts if spec.mlp == "swiglu" or gelu_output else 0.0
    return 2 * a * spec.dim / sp_divisor + activation


def in_flight_micro_batches(settings: TrainSettings, layout: Layout) -> float:
    """Micro-batches whose activations the first pipeline stage holds at its peak.

    GPipe keeps all m; 1F1B keeps min(p, m) (Narayanan et al. 2021, 2.2.1); interleaved 1F1B keeps p (1 + (p-1)/(p v))
    layer-stacks' worth (Korthikanti et al. 2022, 4.2.3).
    """
    m = micro_batches(settings, layout)
    p = layout.pp
    if p == 1:
        return 1.0
    if layout.pp_schedule == "gpipe":
        return float(m)
    in_flight = float(min(p, m))
    if layout.pp_schedule == "interleaved_1f1b":
        in_flight *= 1 + (p - 1) / (p * layout.virtual_stages)
    return in_flight


@dataclass(frozen=True)
class ParamCounts:
    """Parameters held by the most loaded device before any ZeRO sharding."""

    dense_params: float  # attention, norms, embeddings, router: replicated across data parallel
    expert_params: float  # MoE expert weights: split across expert parallel

    @property
    def total(self) -> float:
        return self.dense_params + self.expert_params


def device_param_counts(spec: ModelSpec, layout: Layout) -> ParamCounts:
    """Parameters on the heaviest pipeline stage's device: its layers / tp, plus embedding or output head."""
    layers = layers_per_stage(spec, layout)
    expert_layer = spec.n_experts * spec.expert_params() if spec.is_moe else 0
    dense_layer = spec.layer_params() - expert_layer
    vocab_rows = spec.vocab_size * spec.dim
    positions = spec.max_seq_len * spec.dim if spec.position == "learned" else 0
    first_stage_extra = vocab_rows + positions
    # Megatron keeps a copy of a tied embedding on the last stage for the output head.
    last_stage_extra = vocab_rows + spec.norm_params()
    extra = first_stage_extra + last_stage_extra if layout.pp == 1 else max(first_stage_extra, last_stage_extra)
    if layout.pp == 1 and spec.tie_embeddings:
        extra -= vocab_rows
    dense = (layers * dense_layer + extra) / layout.tp
    expert = layers * expert_layer / (layout.expert_tp * layout.ep)
    return ParamCounts(dense_params=dense, expert_params=expert)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per device at the peak of a training step."""

    weights_bytes: float
    gradients_bytes: float
    optimizer_bytes: float
    activations_bytes: float

    @property
    def states_bytes(self) -> float:
        return self.weights_bytes + self.gradients_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> float:
        return self.states_bytes + self.activations_bytes


def recomputed_layer_bytes(spec: ModelSpec, settings: TrainSettings, layout: Layout) -> float:
    """What one layer holds for one micro-batch while it is recomputed for its backward: everything it would have
    stored, less, where the compiler fuses elementwise producers into the matmuls that read them
    (`recompute_fuses_elementwise`, XLA), the two norm outputs and the MLP activation's output (GELU(x), or SwiGLU's
    gate x up), which exist only inside those fusions."""
    held = _layer_activation_bytes(spec, settings, replace(layout, recompute="none", offload_activations=False))
    if not settings.recompute_fuses_elementwise:
        return held
    tokens = layout.micro_batch * settings.seq_len / layout.cp
    return held - tokens * _elementwise_output_bytes(spec, settings, layout, gelu_output=True)


def activation_memory_bytes(spec: ModelSpec, settings: TrainSettings, layout: Layout) -> float:
    """Activations held by the first pipeline stage's device at its peak."""
    per_layer = layer_activation_bytes(spec, settings, layout)
    stage_layers = layers_per_stage(spec, layout)
    in_flight = in_flight_micro_batches(settings, layout)
    stored = per_layer * stage_layers * in_flight
    tokens = layout.micro_batch * settings.seq_len / layout.cp
    sp_divisor = layout.tp if layout.sequence_parallel else 1
    # Transients that live only in the backward pass: the layer being recomputed (or brought back from the host)
    # holds its full activations for one micro-batch; under offload the next layer's saved tensors are prefetched.
    backward_transient = 0.0
    if layout.recompute == "full" or layout.offload_activations:
        backward_transient = recomputed_layer_bytes(spec, settings, layout)
        backward_transient += offloaded_layer_bytes(spec, settings, layout)
    if layout.offload_layer_fraction > 0:
        # The layer being written out and the one being brought back for its backward are on the device.
        stored += 2 * _layer_activation_bytes(spec, settings, layout)
    if settings.dropout:
        stored += tokens * spec.dim / sp_divisor * in_flight  # embedding dropout mask (Korthikanti 4.3)
    head_transient = 0.0
    if layout.pp == 1:
        # Final norm and head inputs plus the logits: 4 s b h / t (1 + v / h) in Korthikanti 4.3 with fp32 logits.
        a = settings.activation_bytes
        head_transient = tokens * (2 * a * spec.dim / sp_divisor + settings.logit_bytes * spec.vocab_size / layout.tp)
    # The logits peak at the loss, before any layer's backward; they are freed once the output head's backward has
    # consumed their gradient, so they never coexist with a recomputed layer: the peak is the larger transient.
    return stored + max(backward_transient, head_transient)


def memory_breakdown(spec: ModelSpec, settings: TrainSettings, layout: Layout) -> MemoryBreakdown:
    """Weights, gradients, optimizer state (ZeRO-sharded over dp_shard x cp) and activations per device.

    ZeRO stages follow Rajbhandari et al. 2020: stage 1 shards optimizer state, stage 2 also gradients, stage 3
    (FSDP, Zhao et al. 2023) also parameters, which are all-gathered one layer at a time (two with prefetch).
    """
    counts = device_param_counts(spec, layout)
    shard = (layout.dp_shard if layout.zero_stage else 1) * layout.cp
    # Expert states shard over the expert-data-parallel ranks: dp_shard x cp / ep, times tp / expert_tp when folded.
    expert_shard = max(1, shard * layout.tp // (layout.expert_tp * layout.ep))

    def sharded(stage: int) -> float:
        if layout.zero_stage < stage:
            return counts.total
        return counts.dense_params / shard + counts.expert_params / expert_shard

    weights = settings.param_bytes * sharded(3)
    if layout.zero_stage == 3:
        # Gathered working copies: the layer being computed and the one being prefetched; without resharding after
        # the forward pass every gathered layer of the stage stays until its backward.
        layer = counts.total / layers_per_stage(spec, layout)
        gathered_layers = 2 if settings.reshard_after_forward else layers_per_stage(spec, layout)
        weights += gathered_layers * settings.gathered_bytes * layer
    return MemoryBreakdown(
        weights_bytes=weights,
        gradients_bytes=settings.grad_bytes * sharded(2),
        optimizer_bytes=settings.optimizer_bytes_per_param * sharded(1),
        activations_bytes=activation_memory_bytes(spec, settings, layout),
    )
