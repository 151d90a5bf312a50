"""Inference fleet sizing: KV-cache memory bounds the batch, rooflines per kernel give the step time.

The model of one serving replica (tp devices) in steady state under in-flight (continuous) batching with chunked
prefill, as TensorRT-LLM and vLLM run it:
- memory: weights (quantized linear layers, 16-bit embeddings and head), a runtime workspace, and a KV cache that
  takes a fixed share of what is left (TensorRT-LLM's KvCacheConfig free_gpu_memory_fraction, default 0.9);
- batch: the sequences whose KV fits, each holding on average its prompt plus half its output, capped by the
  engine's max batch size and per-step token budget (TensorRT-LLM defaults 2048 and 8192);
- step: every engine step decodes one token per sequence and prefills new prompts at the rate sequences finish
  (B x input/output tokens); each kernel runs at its own roofline, max(FLOPs / compute, bytes / bandwidth)
  (Williams et al. 2009), and kernels run one after another, so their times add (Pope et al. 2022 sec. 2 for the
  decode memory bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from aiinfra.plan.attention_span import causal_pairs, mean_keys
from aiinfra.plan.cluster import Cluster, collective_time_s, mesh_peer_all_reduce_s
from aiinfra.plan.errors import PlanError
from aiinfra.plan.expert_load import (
    MOE_MODULE_BYTES_PER_COPY_ELEMENT,
    MOE_MODULE_FIXED_S_PER_LAYER,
    MOE_ROUTING_S_PER_LAYER,
    busiest_rank_load,
    expert_rows,
    touched_experts,
)
from aiinfra.spec import ModelSpec

# NVFP4 stores 4-bit values with one fp8 scale per 16 (NVIDIA NVFP4 format): 0.5 + 1/16 bytes per weight.
WEIGHT_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "fp4": 0.5625, "int4": 0.5}
# CUDA context, cuBLAS/NCCL workspaces and allocator slack outside the planner's explicit terms (an assumption of
# about 1 GB, the size of a CUDA context plus library workspaces on a recent GPU).
RUNTIME_OVERHEAD_BYTES = 1.0e9

@dataclass(frozen=True)
class ServeSettings:
    """The serving workload and the engine's limits."""

    input_tokens: int
    output_tokens: int
    weight_dtype: str = "fp8"
    kv_dtype: str = "fp8"
    tp: int = 1
    max_batch: int = 2048
    max_tokens_per_step: int = 8192
    kv_memory_fraction: float = 0.9
    requests_per_s: float = 1.0
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    kv_dim_per_layer: int | None = None  # K+V elements per token per layer when not 2 x kv_heads x head_dim (MLA)
    # The scheduler admits a request only when the KV cache holds its whole prompt and output (TensorRT-LLM's
    # default CapacitySchedulerPolicy.GUARANTEED_NO_EVICT), not the average of what the running sequences hold.
    reserve_whole_sequence: bool = False
    host_s_per_request: float = 0.0  # host time a step takes per request its rank schedules
    host_s_per_step: float = 0.0  # host time a step takes whatever its batch
    # Whether the host's work for a step runs while the GPU runs the previous one (TensorRT-LLM's overlap scheduler)
    # or between GPU steps (vLLM's default engine loop), adding to the kernels' time.
    host_overlapped: bool = True
    custom_all_reduce_max_bytes: float = 0.0  # all-reduces below this run on the engine's peer-to-peer kernels
    # Attention data parallelism (TensorRT-LLM enable_attention_dp): each of the tp ranks schedules its own share of
    # the requests, so a rank's host work covers batch / tp of them.
    attention_dp: bool = False
    # Always-active experts folded into the routed ones (shared experts and dense first layers; runs.moe_shape): they
    # take every token, so expert-parallel load imbalance does not touch them.
    shared_experts: int = 0
    # Query/key plus value head width of the prefill attention when not 2 x head_dim: MLA's context phase runs
    # without absorption, 192-wide q/k and 128-wide v heads (runs.ATTENTION_HEAD_DIMS; tech blog 3: "non absorbed
    # version is beneficial for the prefill phase with input length 256 or larger").
    prefill_qkv_head_width: int = 0
    # Layers that hold routed experts when not every layer does (Llama 4 Maverick interleaves MoE and dense layers,
    # DeepSeek's first 3 are dense); 0: every layer. The shape folds the rest into an average layer; what a MoE layer
    # pays whatever its tokens (module latency, routing, attention DP's gather and scatter) is counted on these only.
    moe_layers: int = 0
    # Local attention layers (`runs.SLIDING_WINDOWS`, `runs.CHUNKED_ATTENTION`): their queries read only the last
    # `attention_window` keys, or those of their own `attention_chunk`, on this share of the layers.
    attention_window: int = 0
    window_layer_share: float = 0.0
    attention_chunk: int = 0
    chunk_layer_share: float = 0.0
    # Whether the engine's KV cache keeps only what a local layer still reads (at most the window, or the current
    # chunk) rather than every token on every layer; engine-specific (`serve_rows.ENGINE_LOCAL_KV`).
    trims_window_kv: bool = False
    trims_chunk_kv: bool = False


@dataclass(frozen=True)
class ServePlan:
    """One replica's steady state and the fleet that meets the request rate."""

    weights_bytes_per_device: float
    kv_cache_bytes_per_device: float
    kv_bytes_per_token: float  # whole replica
    batch: int
    step_time_s: float  # = time per output token (TPOT)
    ttft_s: float
    output_tokens_per_s: float  # per replica
    replicas: int
    devices: int
    limited_by: str  # what bounds the batch: kv-cache, max-batch, token-budget or an SLO

    def cost_per_million_output_tokens(self, price_per_device_hour: float) -> float:
        """Fleet cost per million output tokens at a price per device-hour."""
        return self.devices * price_per_device_hour / 3600 / (self.replicas * self.output_tokens_per_s) * 1e6


def _compute_dtype(weight_dtype: str) -> str:
    return weight_dtype if weight_dtype in ("fp8", "int8", "fp4") else "bf16"


def weights_bytes(spec: ModelSpec, weight_dtype: str) -> float:
    """Weights of the whole model: quantized linear layers, 16-bit embeddings, head and norms."""
    if weight_dtype not in WEIGHT_BYTES:
        raise PlanError(f"--quant={weight_dtype!r}: expected one of {', '.join(WEIGHT_BYTES)}")
    layer_linear = spec.layer_params() - 2 * spec.norm_params()
    sixteen_bit = spec.num_params() - spec.n_layers * layer_linear
    return spec.n_layers * layer_linear * WEIGHT_BYTES[weight_dtype] + sixteen_bit * 2.0


def kv_bytes_per_token(spec: ModelSpec, kv_dtype: str, kv_dim_per_layer: int | None = None) -> float:
    """K and V for every layer of one token (grouped-query attention stores n_kv_heads heads; MLA its latent)."""
    per_layer = kv_dim_per_layer or 2 * spec.n_kv_heads * spec.head_dim
    return spec.n_layers * per_layer * WEIGHT_BYTES[kv_dtype]


def kv_replication(spec: ModelSpec, settings: ServeSettings) -> float:
    """How many ranks of a tensor-parallel replica hold a copy of each token's K and V.

    Tensor parallelism splits attention by heads, so a rank keeps the KV heads its query heads read. With fewer KV
    heads than ranks each KV head is kept on tp / kv_heads ranks (vLLM's QKVParallelLinear: num_kv_head_replicas =
    tp_size // total_num_kv_heads; TensorRT-LLM likewise), and MLA's latent is one KV "head" every query head reads,
    so every rank keeps all of it (the duplication SGLang's DP attention removes, lmsys.org 2024-12-04 "SGLang v0.4",
    and TensorRT-LLM's enable_attention_dp). Under attention data parallelism each rank keeps only its own
    sequences, all heads, once.
    """
    if settings.attention_dp or settings.tp <= 1:
        return 1.0
    if settings.kv_dim_per_layer:
        return float(settings.tp)
    return max(1.0, settings.tp / spec.n_kv_heads)


def busiest_rank_tokens(settings: ServeSettings, batch: int, prefill: bool = True) -> tuple[float, float]:
    """(tokens, prompts) the busiest rank runs through attention in one engine step.

    Under tensor parallelism every rank shares every token: the step's tokens and new prompts over tp. Under
    attention data parallelism each rank decodes its batch / tp sequences, but a new prompt is prefilled whole on
    the one rank it is given, and every rank waits for the slowest at the next expert layer. Prompts arrive at
    batch / output_tokens a step (the rate sequences finish) as a Poisson count N; spread evenly, the busiest rank
    gets ceil(N / tp) of them. This is the imbalance TensorRT-LLM's attention_dp_config.enable_balance and SGLang's
    DP-attention load balancing exist to reduce.
    """
    new_requests = batch / settings.output_tokens if prefill else 0.0
    tp = settings.tp
    if not settings.attention_dp or tp <= 1:
        return (batch + new_requests * settings.input_tokens) / tp, new_requests / tp
    prompts = expected_ceil_share(new_requests, tp)
    return batch / tp + prompts * settings.input_tokens, prompts


def expected_ceil_share(rate: float, ranks: int) -> float:
    """E[ceil(N / ranks)] for N ~ Poisson(rate): the most items any rank gets when N are dealt out evenly."""
    if rate <= 0:
        return 0.0
    top = int(rate + 12 * math.sqrt(rate) + 20)
    term, total = math.exp(-rate), 0.0
    for count in range(top + 1):
        total += term * math.ceil(count / ranks)
        term *= rate / (count + 1)
    return total


def decode_step_time_s(
    spec: ModelSpec, cluster: Cluster, settings: ServeSettings, batch: int, prefill: bool = True
) -> float:
    """One engine step at `batch` running sequences: decode one token each plus (if `prefill`) the steady
    prefill share; without it, a pure decode step over contexts of `input_tokens`. Where the host's work for the step
    runs under the GPU's (an overlap scheduler) the step is the longer of the kernels' sum and `host_step_s`;
    where it runs between GPU steps, their sum."""
    kernels = sum(decode_step_parts(spec, cluster, settings, batch, prefill).values())
    host = host_step_s(settings, batch)
    return max(kernels, host) if settings.host_overlapped else kernels + host


def finite_run_output_tokens_per_s(spec: ModelSpec, cluster: Cluster, settings: ServeSettings, batch: int,
                                   requests: int, batch_step_s: float | None = None) -> float:
    """Output tokens per second of an offline benchmark that queues `requests` identical requests at once and runs
    them at most `batch` at a time (trtllm-bench throughput over a fixed-length synthetic dataset).

    Requests of one length that start together finish together, so the run is ceil(requests / batch) waves of
    output_tokens steps each: the full waves at `batch`, the last at what is left. Fewer requests than the engine
    can hold never fill it, however much KV cache is free; the steady state (`plan_serving`) is the limit of many
    waves. `batch_step_s` is the step at `batch` where the caller has it (`ServePlan.step_time_s`)."""
    if requests < 1:
        raise PlanError(f"requests={requests}: expected a whole number >= 1")
    full, rest = divmod(requests, batch)
    if batch_step_s is None:
        batch_step_s = decode_step_time_s(spec, cluster, settings, batch)
    seconds = full * settings.output_tokens * batch_step_s
    if rest:
        seconds += settings.output_tokens * decode_step_time_s(spec, cluster, settings, rest)
    return requests * settings.output_tokens / seconds


def host_step_s(settings: ServeSettings, batch: int) -> float:
    """Host time of one engine step: a fixed cost plus its cost per request times the requests one rank's executor
    schedules (all of them, or batch / tp under attention data parallelism)."""
    per_rank = math.ceil(batch / settings.tp) if settings.attention_dp else batch
    return settings.host_s_per_step + settings.host_s_per_request * per_rank


def data_parallel_experts(spec: ModelSpec, settings: ServeSettings) -> int:
    """Always-active experts (shared experts, dense first layers) that run data-parallel under attention DP: every
    rank holds them whole and runs them over its own tokens (TensorRT-LLM's Llama4MoE and dense MLPs:
    GatedMLP(overridden_tp_size=1 if enable_attention_dp); tech blog 3's table: MoE shared experts DP8)."""
    if not (spec.is_moe and settings.attention_dp and settings.tp > 1):
        return 0
    return min(settings.shared_experts, spec.experts_per_token - 1)


def linear_layers_s(spec: ModelSpec, cluster: Cluster, settings: ServeSettings, tokens: float,
                    rank_tokens: float) -> float:
    """Seconds of one layer's linear projections in a step of `tokens` (`rank_tokens` on the busiest attention-DP
    rank), each at the longer of its FLOPs at the shape's GEMM efficiency and reading its weights."""
    eff, tp = cluster.efficiency, settings.tp
    dtype = _compute_dtype(settings.weight_dtype)
    peak = cluster.peak_flops(dtype)
    bandwidth = cluster.memory_bw_bytes_per_s * eff.gemm_bw_efficiency  # the weights, as a skinny GEMM streams them
    h, q, kv = spec.dim, spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    mlp_in = (2 if spec.mlp == "swiglu" else 1) * spec.ffn_dim
    adp = settings.attention_dp and tp > 1
    shared = data_parallel_experts(spec, settings)
    routed = spec.model_copy(update={"n_experts": spec.n_experts - shared,
                                     "experts_per_token": spec.experts_per_token - shared}) if shared else spec
    count = routed.experts_per_token if spec.is_moe else 1
    linears = [(h, q + 2 * kv, 1, False), (q, h, 1, False), (h, mlp_in, count, True), (spec.ffn_dim, h, count, True)]
    linears += [(h, mlp_in, shared, False), (spec.ffn_dim, h, shared, False)] if shared else []
    load = busiest_rank_load(routed.n_experts, tp, tokens * count) if spec.is_moe and adp else 1.0
    total = 0.0
    for k, n, copies, mlp in linears:
        flops = 2 * tokens * k * n * copies / tp
        moe = spec.is_moe and mlp
        # Routed experts run as a grouped GEMM, each touched expert over its own rows: tokens x k spread over the
        # experts the step touches (tokens x k / E at serving batch sizes, as the training model's
        # `moe_routing.expert_tokens`; one row each for a single token), so a small share per expert leaves tiles empty.
        rows, width, shards = (expert_rows(routed, tokens) if moe else tokens), n / tp, tp
        if moe and adp:
            # Expert parallelism: a rank holds E / tp whole experts (the full width n each, not a 1/tp slice), and the
            # busiest rank's experts get `load` times the mean rank's rows (`expert_load.busiest_rank_load`).
            rows, flops, width = rows * load, flops * load, n
        if adp and not mlp:
            # Attention data parallelism: every rank holds the whole attention projections and runs them over its
            # own tokens; the step waits for the rank with the most (`busiest_rank_tokens`).
            rows, width, shards = rank_tokens, n, 1
            flops = 2 * rank_tokens * k * n * copies
        compute = flops / (peak * eff.gemm_efficiency(rows, k, width, dtype))
        stored = k * n * (touched_experts(routed, tokens) if moe else copies) * WEIGHT_BYTES[
            settings.weight_dtype] / shards
        total += max(compute, stored / bandwidth)
    return total


def decode_step_parts(
    spec: ModelSpec, cluster: Cluster, settings: ServeSettings, batch: int, prefill: bool = True
) -> dict[str, float]:
    """The seconds of one engine step by kernel group (`decode_step_time_s` is their sum)."""
    eff = cluster.efficiency
    tp = settings.tp
    bandwidth = cluster.memory_bw_bytes_per_s * eff.memory_bw_efficiency
    prefill_tokens = batch * settings.input_tokens / settings.output_tokens if prefill else 0.0
    tokens = batch + prefill_tokens
    h = spec.dim
    q = spec.n_heads * spec.head_dim
    experts = spec.experts_per_token if spec.is_moe else 1
    rank_tokens, rank_prompts = busiest_rank_tokens(settings, batch, prefill)
    gemm = spec.n_layers * linear_layers_s(spec, cluster, settings, tokens, rank_tokens)
    # The head stays in 16 bits and runs only for the last position of each sequence.
    head_flops = 2 * batch * h * spec.vocab_size / tp
    head = max(head_flops / (cluster.peak_flops("bf16") * eff.gemm_efficiency(batch, h, spec.vocab_size / tp)),
               h * spec.vocab_size * 2 / tp / bandwidth)
    # Decode attention streams each sequence's KV cache, the whole context on a global layer and the window or the
    # chunk on a local one (`attended_context`); prefill attention is compute-bound (causal half, or less).
    context = attended_context(settings, prefill)
    # The decode-attention kernel streams the cache at its own measured share of HBM (efficiency.csv).
    kv_bytes = (batch * context * kv_bytes_per_token(spec, settings.kv_dtype, settings.kv_dim_per_layer)
                * kv_replication(spec, settings) / tp)
    kv_read = kv_bytes / (cluster.memory_bw_bytes_per_s * eff.kv_read_bw_efficiency)
    pair_width = spec.n_heads * settings.prefill_qkv_head_width if settings.prefill_qkv_head_width else 2 * q
    prefill_attention_flops = rank_prompts * 2 * pair_width * spec.n_layers * prompt_pairs(settings)
    # With fp8 weights and KV cache, TensorRT-LLM runs the context (prefill) attention in fp8 too
    # (use_fp8_context_fmha); otherwise it runs at the 16-bit peak.
    attention_peak = cluster.peak_flops("fp8" if settings.kv_dtype == "fp8" else "bf16")
    # Decode attention: each query head scores and mixes the whole context, 4 x width FLOPs per cached token; the
    # width is the head's (grouped-query attention) or, under MLA with absorbed projections, the shared latent
    # (DeepSeek-V3 2.1.1), which makes it compute-bound rather than bound by reading the cache.
    width = settings.kv_dim_per_layer or spec.head_dim
    decode_flops = batch * context * 4 * spec.n_heads * width * spec.n_layers / tp
    decode = max(kv_read, decode_flops / (attention_peak * eff.attention_efficiency))
    attention = decode + prefill_attention_flops / (attention_peak * eff.attention_efficiency)
    # Norms, residuals, activation function, rotary: read and write per token (2 bytes per element). Under tensor
    # parallelism every rank runs the per-token ones over every token (their inputs are all-reduced, whole); under
    # attention data parallelism a rank runs them over its own tokens only, and the step waits for the busiest rank
    # (TensorRT-LLM's CutlassFusedMoE.forward_chunk all-gathers the ranks' tokens only at the MoE input and
    # reduce-scatters them back after it). The activation function runs on a 1/tp share of the routed copies either
    # way (a 1/tp slice of every expert's width under TP, the copies routed to its E/tp experts under EP).
    norm_tokens = rank_tokens if settings.attention_dp and tp > 1 else tokens
    # However few the tokens, the norm and activation kernels take their launch-bound floor where one is measured
    # (`EfficiencyProfile.layer_elementwise_floor_s`).
    per_layer = 2 * (norm_tokens * 10 * h + tokens * 3 * spec.ffn_dim * experts / tp) / bandwidth
    elementwise = spec.n_layers * max(per_layer, eff.layer_elementwise_floor_s)
    if spec.is_moe and spec.n_experts > 1:
        # Token permutation to the experts and back: the expand kernel writes every routed copy once and the
        # finalize kernel reads every expert output once to sum them (TensorRT-LLM's expandInputRows and
        # finalizeMoeRouting), k x h elements per token and layer, at the fused-MoE module's measured cost a copy
        # and hidden element (`expert_load.MOE_MODULE_BYTES_PER_COPY_ELEMENT`, HBM bytes at the datasheet rate).
        # Under TP every rank permutes every copy (each holds a slice of every expert); under EP a rank permutes
        # only the copies routed to its experts.
        copies = tokens * spec.experts_per_token / (tp if settings.attention_dp else 1)
        elementwise += (copies * spec.n_layers * h * MOE_MODULE_BYTES_PER_COPY_ELEMENT
                        / cluster.memory_bw_bytes_per_s)
    # Tensor parallelism all-reduces after attention and after the MLP; attention data parallelism needs only the
    # all-gather before the MLP or experts and the reduce-scatter after them, one all-reduce's worth per layer
    # (TensorRT-LLM tech blog "Optimizing DeepSeek R1 throughput on NVIDIA Blackwell GPUs", attention DP).
    # Under attention DP a dense layer's MLP runs data-parallel too, so only the MoE layers gather and scatter.
    moe_layers = (settings.moe_layers or spec.n_layers) if spec.is_moe and spec.n_experts > 1 else 0
    exchanges = spec.n_layers * 2 if not settings.attention_dp else (moe_layers or spec.n_layers)
    tp_comm = exchanges * tp_all_reduce_s(cluster, settings, tokens * h * 2)
    # Each MoE layer's fused top-k and the rest of its module's fixed latency (`expert_load`, tech blogs 3 and 24).
    routing = moe_layers * (MOE_ROUTING_S_PER_LAYER + MOE_MODULE_FIXED_S_PER_LAYER)
    return {"gemm": gemm, "head": head, "attention": attention, "elementwise": elementwise, "tp_comm": tp_comm,
            "routing": routing}


def local_layer_shares(settings: ServeSettings) -> tuple[float, float]:
    """(share of the layers in a sliding window, share in a chunk); a share without its width counts as none."""
    return (settings.window_layer_share if settings.attention_window else 0.0,
            settings.chunk_layer_share if settings.attention_chunk else 0.0)


def layer_mean(shares: tuple[float, float], global_value: float, window_value: float, chunk_value: float) -> float:
    """A per-layer quantity averaged over the layers: `global_value` on the global layers, `window_value` and
    `chunk_value` on the (window, chunk) `shares` of local ones."""
    window_share, chunk_share = shares
    return (1 - window_share - chunk_share) * global_value + window_share * window_value + chunk_share * chunk_value


def held_kv_tokens(settings: ServeSettings) -> float:
    """Tokens of KV cache a sequence holds, averaged over the layers: its prompt and half its output on average (or
    its whole output where the scheduler reserves it), and on a local layer whose blocks the engine frees no more
    than the window or the chunk."""
    held = settings.input_tokens + settings.output_tokens * (1.0 if settings.reserve_whole_sequence else 0.5)
    window_share, chunk_share = local_layer_shares(settings)
    trimmed = (window_share * settings.trims_window_kv, chunk_share * settings.trims_chunk_kv)
    return layer_mean(trimmed, held, min(held, settings.attention_window), min(held, settings.attention_chunk))


def attended_context(settings: ServeSettings, prefill: bool = True) -> float:
    """Keys a decode step's query reads, averaged over the layers and over the output positions (the first output
    position alone for a batch-1 latency, `prefill` False): input + output / 2 on a global layer, at most the window
    on a sliding one, the position's offset in its chunk on a chunked one (`attention_span.mean_keys`)."""
    start = settings.input_tokens
    stop = start + (settings.output_tokens if prefill else 1)
    whole = settings.input_tokens + (settings.output_tokens / 2 if prefill else 0.0)
    shares = local_layer_shares(settings)
    windowed = min(whole, mean_keys(start, stop, window=settings.attention_window)) if shares[0] else 0.0
    chunked = mean_keys(start, stop, chunk=settings.attention_chunk) if shares[1] else 0.0
    return layer_mean(shares, whole, windowed, chunked)


def prompt_pairs(settings: ServeSettings) -> float:
    """(query, key) pairs one prompt's prefill scores, averaged over the layers: n^2 / 2 on a global layer, fewer on
    a sliding-window or chunked one (`attention_span.causal_pairs`)."""
    n = settings.input_tokens
    shares = local_layer_shares(settings)
    whole = n * n / 2
    windowed = min(whole, causal_pairs(n, window=settings.attention_window)) if shares[0] else 0.0
    chunked = min(whole, causal_pairs(n, chunk=settings.attention_chunk)) if shares[1] else 0.0
    return layer_mean(shares, whole, windowed, chunked)


def tp_all_reduce_s(cluster: Cluster, settings: ServeSettings, size_bytes: float) -> float:
    """One tensor-parallel all-reduce: the engine's peer-to-peer kernels over a mesh below its size limit, else the
    collective library's (`collective_time_s`)."""
    if cluster.topology == "mesh" and size_bytes < settings.custom_all_reduce_max_bytes and settings.tp <= \
            cluster.scaleup_domain:
        return mesh_peer_all_reduce_s(cluster, size_bytes, settings.tp)
    return collective_time_s(cluster, "all_reduce", size_bytes, settings.tp, 1)


def _check_settings(spec: ModelSpec, settings: ServeSettings) -> None:
    """A clear error naming the flag for a workload or engine setting the plan cannot use."""
    tp = settings.tp
    if tp < 1:
        raise PlanError(f"--tp={tp}: must be >= 1")
    if spec.n_heads % tp:
        raise PlanError(f"--tp={tp}: must divide n_heads={spec.n_heads}")
    if settings.input_tokens < 1:
        raise PlanError(f"--input-tokens={settings.input_tokens}: must be >= 1")
    if settings.output_tokens < 1:
        raise PlanError(f"--output-tokens={settings.output_tokens}: must be >= 1")
    if settings.max_batch < 1:
        raise PlanError(f"--max-batch={settings.max_batch}: must be >= 1")
    if not settings.requests_per_s > 0:
        raise PlanError(f"--rps={settings.requests_per_s:g}: must be > 0")


def plan_serving(spec: ModelSpec, cluster: Cluster, settings: ServeSettings) -> ServePlan:
    """Size one replica (batch, KV cache, throughput, TTFT, TPOT) and the fleet for the request rate."""
    _check_settings(spec, settings)
    tp = settings.tp
    weights = weights_bytes(spec, settings.weight_dtype) / tp
    if settings.attention_dp:
        # Every rank keeps the whole attention projections and always-active experts, not a 1/tp slice of them.
        whole = spec.attention_params() + data_parallel_experts(spec, settings) * spec.expert_params()
        weights += spec.n_layers * whole * WEIGHT_BYTES[settings.weight_dtype] * (1 - 1 / tp)
    per_token_kv = kv_bytes_per_token(spec, settings.kv_dtype, settings.kv_dim_per_layer)
    workspace = settings.max_tokens_per_step * (3 * spec.ffn_dim / tp + 4 * spec.dim) * 2
    workspace += settings.max_batch * spec.vocab_size / tp * 4  # fp32 logits of the decoding positions
    free = cluster.memory_bytes - weights - workspace - RUNTIME_OVERHEAD_BYTES
    if free <= 0:
        raise PlanError(
            f"{cluster.accelerator.id} x tp={tp}: weights need {weights / 1e9:.1f} GB per device of "
            f"{cluster.memory_bytes / 1e9:.0f} GB; raise --tp or quantize"
        )
    kv_cache = settings.kv_memory_fraction * free
    held = held_kv_tokens(settings)
    # Under attention data parallelism every rank runs its own scheduler, each with the engine's limits
    # (trtllm-bench --max_batch_size is "max batch size in each rank", TensorRT-LLM's DeepSeek-R1 perf blog).
    schedulers = tp if settings.attention_dp else 1
    limits = {
        "kv-cache": math.floor(kv_cache * tp / (held * per_token_kv * kv_replication(spec, settings))),
        "max-batch": settings.max_batch * schedulers,
        "token-budget": math.floor(settings.max_tokens_per_step * schedulers
                                   / (1 + settings.input_tokens / settings.output_tokens)),
    }
    limited_by = min(limits, key=lambda k: limits[k])
    batch = limits[limited_by]
    if batch < 1:
        raise PlanError(f"one sequence of {settings.input_tokens + settings.output_tokens} tokens does not fit "
                        f"the KV cache on {cluster.accelerator.id} x tp={tp}")

    def ttft(b: int, step: float) -> float:
        # Chunked prefill gives a prompt what the step's token budget leaves after the decode tokens (per rank
        # under attention data parallelism).
        chunk = max(1, settings.max_tokens_per_step - math.ceil(b / schedulers))
        return math.ceil(settings.input_tokens / chunk) * step

    def meets_slo(b: int) -> bool:
        step = decode_step_time_s(spec, cluster, settings, b)
        ok_tpot = settings.tpot_slo_s is None or step <= settings.tpot_slo_s
        ok_ttft = settings.ttft_slo_s is None or ttft(b, step) <= settings.ttft_slo_s
        return ok_tpot and ok_ttft

    if not meets_slo(batch):
        if not meets_slo(1):
            raise PlanError(f"the SLOs cannot be met on {cluster.accelerator.id} x tp={tp} even at batch 1")
        low, high = 1, batch  # step time grows with batch, so bisect for the largest batch within the SLOs
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if meets_slo(mid) else (low, mid)
        batch, limited_by = low, "slo"
    step = decode_step_time_s(spec, cluster, settings, batch)
    throughput = batch / step
    replicas = max(1, math.ceil(settings.requests_per_s * settings.output_tokens / throughput))
    return ServePlan(
        weights_bytes_per_device=weights,
        kv_cache_bytes_per_device=kv_cache,
        kv_bytes_per_token=per_token_kv,
        batch=batch,
        step_time_s=step,
        ttft_s=ttft(batch, step),
        output_tokens_per_s=throughput,
        replicas=replicas,
        devices=replicas * tp,
        limited_by=limited_by,
    )
