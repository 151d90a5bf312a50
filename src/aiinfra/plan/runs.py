"""One row of the shared run schema (../shared/reference/README.md) as a spec, settings, layout and cluster.

Every column is read: shape, batch, hardware, the degrees tp/pp/dp/cp/ep/vp, `sharding`, `recompute`,
`precision`, `framework` (which selects documented software behaviour, `frameworks.py`), the mixture-of-experts
shape, and the optional `attention` (flash or materialized) and `weight_dtype` (fp32 or bf16) columns, where a
source states them. Nothing is looked up by the row's `source` or `id`. A knob the row leaves empty (micro-batch,
interleaved chunks, recomputation) is searched: the fastest setting that fits, as the authors tuned theirs. A row
the planner cannot represent raises `RowNotRepresentable` with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError

from aiinfra.plan.cells import (
    HYBRID_SHARD,
    SHARDING_STAGES,
    RowNotRepresentable,
    count,
    positive,
    published_value,
    recompute_word,
    row_precision,
    sharding_word,
    with_counted_hardware,
)
from aiinfra.plan.cluster import Cluster, make_cluster
from aiinfra.plan.errors import PlanError
from aiinfra.plan.frameworks import FrameworkFacts, framework_facts, named_sharding
from aiinfra.plan.known_models import (
    NAMED_COLUMNS,
    SHAPE_COLUMNS,
    Version,
    model_version,
    named_model,
    published_shape,
    sparse_in_catalog,
)
from aiinfra.plan.layout import Layout, TrainSettings
from aiinfra.plan.step import StepBreakdown
from aiinfra.spec import ModelSpec

METRICS = ("tflops_per_device_hw", "mfu", "step_time_s", "tokens_per_s_per_device", "gpu_hours_per_trillion_tokens",
           "gpu_hours_total")
# fsdp-like: sharded optimizer and gradients with weights kept between passes (Llama 3, 3.3.2), a ZeRO-2 pattern;
# under PyTorch FSDP it names HYBRID_SHARD (`FrameworkFacts.fsdp_like_is_hybrid`).
# Families whose published models use a 2-matrix MLP, LayerNorm, learned positions and biases (GPT-2/3, the
# MaxText test models), or a 2-matrix squared-ReLU MLP (Nemotron-4); all others are Llama-style (SwiGLU, RMSNorm,
# rotary positions). GPT's vocabulary is GPT-2's BPE when a row does not give one (Brown et al. 2020). Tied input
# and output embeddings: GPT, PaLM, every Gemma, Llama 3.2's small models and Cohere's Command R and R+
# (CohereForAI/c4ai-command-r-v01 config.json tie_word_embeddings true).
# The pre-Llama open families, each from its Hugging Face configuration and modelling code, all with a 2-matrix
# MLP of GELU (ReLU for OPT) and LayerNorm: MPT (mosaicml/mpt-7b configuration_mpt.py: no_bias true, ALiBi, tied,
# vocab 50432) and BLOOM (bigscience/bloom: ALiBi, biases, tied, vocab 250880) have no rotary positions (ALiBi's
# bias on the scores is counted as learned positions: no rotation, and max_seq_len x hidden parameters, 0.1% of a 7B
# model); OPT (facebook/opt-*: learned positions, biases, tied, vocab 50272); Falcon (tiiuae/falcon-*: rotary,
# no biases, vocab 65024); GPT-J (EleutherAI/gpt-j-6b: rotary, biases, vocab 50400); GPT-NeoX and Pythia
# (EleutherAI/gpt-neox-20b, pythia-*: rotary, biases); StarCoder (bigcode/starcoder, gpt_bigcode: learned
# positions, biases, vocab 49152) and StarCoder2 (rotary, biases, vocab 49152).
GPT_FAMILIES = ("gpt",)
TWO_MATRIX_FAMILIES = ("gpt", "nemotron", "mpt", "bloom", "opt", "falcon", "gpt-j", "gpt-neox", "pythia",
                       "starcoder", "starcoder2")
LAYERNORM_FAMILIES = ("gpt", "mpt", "bloom", "opt", "falcon", "gpt-j", "gpt-neox", "pythia", "starcoder",
                      "starcoder2")
UNROTATED_FAMILIES = ("gpt", "mpt", "bloom", "opt", "starcoder")  # learned or ALiBi positions
BIAS_FAMILIES = ("gpt", "bloom", "opt", "gpt-j", "gpt-neox", "pythia", "starcoder", "starcoder2")
TIED_FAMILIES = ("gpt", "palm", "gemma", "gemma2", "gemma3", "llama3.2", "cohere", "mpt", "bloom", "opt")
DEFAULT_VOCAB = {"gpt": 50257, "mpt": 50432, "bloom": 250880, "opt": 50272, "falcon": 65024, "gpt-j": 50400,
                 "starcoder": 49152, "starcoder2": 49152}
# Node-limited routing in the model's own router: DeepSeek-V3 config.json n_group 8, topk_group 4 (each token's 8
# experts come from at most 4 of 8 groups, one group per node in the authors' EP64 layout; arXiv 2412.19437, 3.2.2).
NODE_LIMITED_ROUTING = {"deepseek-v3": 4}
# Attention head widths that are not hidden / heads: multi-head latent attention scores with 128 + 64 (rotary)
# wide query/key heads and mixes 128-wide value heads (DeepSeek-V3 config.json qk_nope_head_dim 128, qk_rope_head_dim
# 64, v_head_dim 128; arXiv 2412.19437, 2.1.1), against hidden / heads = 56. The rows' own reported model TFLOP/s
# (152.4 on v5p, 1292 on GB200) match these widths, not 56. Qwen3's MoE models set head_dim 128 apart from hidden /
# heads (Qwen3-235B-A22B: 4096 / 64 = 64; Qwen3-30B-A3B: 2048 / 32 = 64; config.json head_dim 128), and so do the
# dense ones (Qwen3-32B: 5120 / 64 = 80, head_dim 128; the smaller sizes already have 128 = hidden / heads).
# DeepSeek-V2 uses the same MLA widths (arXiv 2405.04434, 2.1.2: d_h^R 64 beside 128-wide heads).
# GLM-4.5 and GLM-4.5-Air (zai-org config.json head_dim 128: 96 heads against 5120 / 96 and 4096 / 96) and
# MiniMax-M2 (MiniMaxAI/MiniMax-M2 config.json head_dim 128 against 3072 / 48 = 64) do the same.
ATTENTION_HEAD_DIMS = {"deepseek-v3": (192, 128), "deepseek-v2": (192, 128), "qwen3-moe": (128, 128),
                       "qwen3": (128, 128), "gpt-oss": (64, 64), "glm4-moe": (128, 128), "minimax-m2": (128, 128)}
# Sliding-window attention: GPT-OSS alternates 128-token local layers with full-attention layers (config.json
# sliding_window 128, layer_types sliding/full; OpenAI gpt-oss model card, 2025) and uses 64-wide heads (head_dim 64
# against hidden / heads = 2880 / 64 = 45). Gemma 3 runs five 1024-token local layers for each global one and
# 256-wide heads (Gemma 3 technical report, 2025, 2.1; config.json sliding_window 1024, sliding_window_pattern 6,
# head_dim 256 against 3840 / 16 = 240 for 12B). Gemma 2 alternates 4096-token local and global layers one to one
# (Gemma 2 technical report, 2024, 2: "sliding window size of 4096 tokens" on every other layer). Gemma head widths
# per release are in known_models.GEMMA_VERSIONS. (window, share of the layers).
SLIDING_WINDOWS = {"gpt-oss": (128, 0.5), "gemma2": (4096, 0.5), "gemma3": (1024, 5 / 6)}
# Chunked local attention: Llama 4's rotary layers attend only within their 8192-token chunk and every fourth layer
# is a global one without positions (iRoPE; config.json attention_chunk_size 8192, no_rope_layer_interval 4, so
# layer_types are chunked_attention except layers 3, 7, 11, ...). (chunk, share of the layers).
CHUNKED_ATTENTION = {"llama4": (8192, 0.75)}
# The same published head widths size the query, key, value and output projections (config.json head_dim: the
# q projection is heads x head_dim wide, not hidden): Qwen3-235B-A22B 64 x 128 = 8192 against hidden 4096.
PUBLISHED_HEAD_WIDTHS = {"qwen3-moe": 128, "qwen3": 128, "gpt-oss": 64, "glm4-moe": 128, "minimax-m2": 128}
# Norms beyond the pre-norms: Gemma 3 adds a post-norm after attention and after the MLP and replaces Gemma 2's
# soft-capping by QK-norm (Gemma 3 technical report, 2025, 2.1; config.json / modeling: post_attention_layernorm,
# post_feedforward_layernorm, q_norm, k_norm); Qwen3 adds QK-norm (Qwen3 technical report, 2025, 2.1: QK-Norm in
# place of QKV bias); Gemma 2 already normalizes each sub-layer's output (Gemma 2 technical report, 2: "post-norm and
# pre-norm with RMSNorm"). MiniMax-M2 adds QK-norm (config.json use_qk_norm); GLM-4.5 does but GLM-4.5-Air does not
# (use_qk_norm true and false), and the family word keeps Air's. (post-norms per layer, QK-norm).
EXTRA_NORMS = {"gemma2": (2, False), "gemma3": (2, True), "qwen3-moe": (0, True), "qwen3": (0, True),
               "minimax-m2": (0, True)}


class DoesNotFit(RowNotRepresentable):
    """No layout of the row's searched knobs fits in device memory."""


def is_moe_row(row: dict[str, str]) -> bool:
    """A mixture-of-experts row: more than one routed expert."""
    return count(row, "experts", 0) > 1


# A row whose active parameters are below this share of its total is sparse whatever its `experts` cell says (the
# sparsest dense-looking gap, untied embeddings left out of an "active" count, is a few percent; MoE rows run 4-22%).
MOE_ACTIVE_SHARE = 0.9


def moe_evident(row: dict[str, str]) -> bool:
    """A row that states a mixture-of-experts model by other cells than `experts`: active parameters clearly below
    the total (`MOE_ACTIVE_SHARE`), experts per token, expert parallelism, or a family and count whose every
    published configuration is one (`known_models.sparse_in_catalog`)."""
    total, active = positive(row, "params_b"), positive(row, "active_params_b")
    if sparse_in_catalog(row.get("model", "").strip(), total):
        return True
    if total is not None and active is not None and active < MOE_ACTIVE_SHARE * total:
        return True
    return count(row, "experts_per_token", 0) > 0 or count(row, "ep", 1) > 1


def moe_shape(row: dict[str, str], dense_params: float, layers: int, hidden: int,
              matrices: int) -> tuple[int, int, int]:
    """Expert width, experts and experts per token from the published total and active parameter counts.

    A routed expert holds P_e = (total - active) / (L (E - k)) parameters (the experts a token skips); the active
    count then gives the experts every token uses, routed plus shared: (active - dense) / (L P_e). Shared experts
    and dense first layers, which the columns do not carry, come out as extra always-active experts.
    """
    experts, top_k = count(row, "experts"), count(row, "experts_per_token")
    total, active = positive(row, "params_b"), positive(row, "active_params_b")
    if total is None or active is None or experts <= top_k:
        return count(row, "ffn"), experts, top_k
    expert_params = (total - active) * 1e9 / (layers * (experts - top_k))
    width = max(1, round(expert_params / (matrices * hidden)))
    used = max(top_k, round((active * 1e9 - dense_params) / (layers * expert_params)))
    shared = used - top_k
    return width, experts + shared, used


def row_version(row: dict[str, str]) -> Version:
    """The released configuration a row's family word and shape identify (known_models.model_version)."""
    hidden = count(row, "hidden", 0) or None
    layers = count(row, "layers", 0) or None
    return model_version(row.get("model", "").strip(), hidden, layers, is_moe_row(row))


def with_published_shape(row: dict[str, str]) -> dict[str, str]:
    """The row with its blank shape cells (and a mixture-of-experts row's blank `experts_per_token`) taken from the
    published configuration of its family that agrees with its parameter count and every shape cell it states
    (known_models.published_shape), where exactly one does: Llama 2 7B's vocabulary from its 32 layers of 4096 and
    6.7B parameters, not Llama 3 8B's. A `model` cell that names a catalog checkpoint rather than a family word
    (known_models.named_model) becomes that checkpoint's family, its blank shape cells that checkpoint's."""
    named = named_model(row.get("model", "").strip())
    if named is not None:  # a checkpoint's name: its family word, and its published shape where the row is blank
        row = {**row, "model": named["family"],
               **{k: named[k] for k in NAMED_COLUMNS if named.get(k) and not (row.get(k) or "").strip()}}
    moe = is_moe_row(row) or moe_evident(row)  # a sparse row with `experts` blank takes its experts too
    fillable = SHAPE_COLUMNS + (("experts", "experts_per_token", "params_b", "active_params_b") if moe else ())
    if all((row.get(column) or "").strip() for column in fillable):
        return row
    stated = {k: row.get(k) or "" for k in (*fillable, "experts") if k not in ("params_b", "active_params_b")}
    shape = published_shape(row.get("model", "").strip(), positive(row, "params_b"), moe, stated)
    if shape is None:
        return row
    return {**row, **{k: v for k, v in shape.items() if not (row.get(k) or "").strip()}}


def _head_width(row: dict[str, str]) -> int:
    """The optional `head_dim` column: each attention head's width where the source states one that is not
    hidden / heads; empty: the release's published width (known_models), the family's, or the framework's default
    for its own test models (`FrameworkFacts.test_model_head_width`: MaxText's base.yml), else hidden / heads."""
    text = (row.get("head_dim") or "").strip()
    if not text:
        family = row.get("model", "").strip()
        width = row_version(row).head_width or PUBLISHED_HEAD_WIDTHS.get(family, 0)
        if not width and family in GPT_FAMILIES:
            width = framework_facts(row.get("framework") or "").test_model_head_width
        return width
    return count(row, "head_dim")


def spec_from_row(row: dict[str, str]) -> ModelSpec:
    """A ModelSpec from the run table's shape columns; mixture-of-experts from `experts` and the parameter counts."""
    row = with_published_shape(row)
    family = row.get("model", "").strip()
    hidden, layers, heads = count(row, "hidden"), count(row, "layers"), count(row, "heads")
    kv_heads = count(row, "kv_heads", heads)
    vocab = count(row, "vocab", DEFAULT_VOCAB.get(family))
    seq = count(row, "seq_len")
    matrices = 2 if family in TWO_MATRIX_FAMILIES else 3
    # A head width the rotary embedding cannot split (odd) keeps its cost but not its rotation: learned positions.
    # The width is the published one where it is not hidden / heads (GPT-OSS: 64, against 2880 / 64 = 45).
    head_width = _head_width(row)
    rope = family not in UNROTATED_FAMILIES and (head_width or hidden // heads) % 2 == 0
    version = row_version(row)
    tied = version.tied or version.version in TIED_FAMILIES
    arch = dict(mlp="gelu" if matrices == 2 else "swiglu",
                norm="layernorm" if family in LAYERNORM_FAMILIES else "rmsnorm",
                position="rope" if rope else "learned", bias=family in BIAS_FAMILIES, tie_embeddings=tied)
    common = dict(vocab_size=vocab, dim=hidden, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                  max_seq_len=seq, head_width=head_width, **arch)
    if not is_moe_row(row) and moe_evident(row):
        raise RowNotRepresentable("experts not stated for a mixture-of-experts row (sparse by its parameter counts, "
                                  "experts_per_token, ep or family), and no single published configuration of the "
                                  "family matches: expected the number of routed experts")
    try:
        if is_moe_row(row):
            dense = ModelSpec(**common, ffn_dim=1).num_params()
            width, experts, top_k = moe_shape(row, dense, layers, hidden, matrices)
            return ModelSpec(**common, ffn_dim=width, n_experts=experts, experts_per_token=top_k)
        ffn = count(row, "ffn", 4 * hidden if matrices == 2 else None)
        return ModelSpec(**common, ffn_dim=ffn)
    except ValidationError as error:
        raise RowNotRepresentable(f"shape: {error.errors()[0]['msg']}") from None


@dataclass(frozen=True)
class RunSetup:
    """Everything needed to predict one published run, and which of its knobs are searched."""

    row: dict[str, str]
    spec: ModelSpec
    settings: TrainSettings
    layout: Layout
    cluster: Cluster
    facts: FrameworkFacts
    search_micro_batch: bool
    search_virtual_stages: bool
    search_recompute: bool


def _attention(row: dict[str, str]) -> str:
    """The attention kernel: the row's `attention` column (an optional extension of the schema: flash or
    materialized) or, when empty, fused flash-style attention, every framework's default since 2023."""
    text = (row.get("attention") or "").strip()
    if text in ("", "flash"):
        return "flash"
    if text == "materialized":
        return text
    raise RowNotRepresentable(f"attention={text!r}: expected flash or materialized")


def _with_weight_dtype(settings: TrainSettings, row: dict[str, str]) -> TrainSettings:
    """The optional `weight_dtype` column: bf16 keeps the weights, their gradients and both Adam moments in bf16 with
    no fp32 master copy (MaxText weight_dtype=bfloat16: optax's moments follow the parameters' dtype and mu_dtype
    defaults to weight_dtype), 2 + 2 + 4 bytes a parameter; fp32 or empty: the framework's default."""
    text = (row.get("weight_dtype") or "").strip()
    if text in ("", "fp32"):
        return settings
    if text != "bf16":
        raise RowNotRepresentable(f"weight_dtype={text!r}: expected fp32 or bf16")
    return bf16_weights(settings)


def bf16_weights(settings: TrainSettings) -> TrainSettings:
    """Weights, gradients and Adam moments in bf16 with no fp32 master copy: 2 + 2 + 4 bytes a parameter."""
    return replace(settings, param_bytes=2, gather_param_bytes=2, grad_bytes=2, grad_reduce_bytes=2,
                   optimizer_bytes_per_param=4)


def _capacity_factor(row: dict[str, str]) -> float:
    """The optional `capacity_factor` column: a token-dropping MoE's expert capacity factor where the source states
    one (MaxText's capacity_factor); empty: dropless routing, each expert computing the tokens routed to it."""
    value = positive(row, "capacity_factor")
    if value is None:
        return 0.0
    if value < 1.0:
        raise RowNotRepresentable(f"capacity_factor={value:g}: expected >= 1 (or empty for dropless)")
    return value


def within_domain(dp: int, ranks_per_domain: int) -> int:
    """The largest divisor of dp that fits in a scale-up domain (MaxText: FSDP over ICI, data parallel over DCN)."""
    return max((d for d in range(1, dp + 1) if dp % d == 0 and d <= max(1, ranks_per_domain)), default=1)


def _data_parallel(row: dict[str, str], tp: int, pp: int, cp: int) -> int:
    """The `dp` column, or where it is empty the devices left over by the model-parallel degrees: n / (tp pp cp)."""
    if (row.get("dp") or "").strip():
        return count(row, "dp")
    n_devices = count(row, "n_devices")
    if n_devices % (tp * pp * cp):
        raise RowNotRepresentable(f"dp not stated and tp x pp x cp = {tp * pp * cp} does not divide "
                                  f"n_devices = {n_devices}")
    return n_devices // (tp * pp * cp)


def parallel_degrees(row: dict[str, str]) -> tuple[int, int, int, int]:
    """(tp, pp, cp, dp): each stated degree, an empty one 1, and an empty `dp` what the others leave of n_devices.
    Where `dp` is stated and the product falls short of n_devices, the one empty degree of `tp` and `pp` is what
    the devices leave (a row of 64 devices stating pp 4 and dp 8 runs tp 2), and with both empty nothing is guessed."""
    tp, pp, cp = count(row, "tp", 1), count(row, "pp", 1), count(row, "cp", 1)
    dp = _data_parallel(row, tp, pp, cp)
    n_devices = count(row, "n_devices", 0)
    empty = [column for column in ("tp", "pp") if not (row.get(column) or "").strip()]
    others = tp * pp * cp * dp
    if len(empty) == 1 and n_devices > others and n_devices % others == 0:
        if empty[0] == "tp":
            tp = n_devices // others
        else:
            pp = n_devices // others
    return tp, pp, cp, dp


def _layout(row: dict[str, str], facts: FrameworkFacts) -> tuple[Layout, bool, bool]:
    tp, pp, cp, dp = parallel_degrees(row)
    ep, vp = count(row, "ep", 1), count(row, "vp", 1)
    # An empty column is the stage the framework cell names ("DeepSpeed ZeRO-3"), else the framework's documented
    # default (`FrameworkFacts.default_sharding`).
    stated = (row.get("sharding") or "").strip()
    sharding = sharding_word(stated) if stated else named_sharding(row.get("framework") or "") or facts.default_sharding
    stage = SHARDING_STAGES.get(sharding.split("-")[0] if sharding.startswith("fsdp-") and sharding != "fsdp-like"
                                else sharding)
    if stage is None:
        raise RowNotRepresentable(f"sharding={stated!r}: expected one of {', '.join(SHARDING_STAGES)}")
    recompute, stated_sp = recompute_word(row.get("recompute") or "")
    interleaved = pp > 1 and (bool((row.get("vp") or "").strip()) or facts.interleaved_by_default)
    if interleaved and vp == 1 and (row.get("vp") or "").strip():
        interleaved = False
    within = stage and facts.shard_within_domain
    if (sharding == "fsdp-like" and facts.fsdp_like_is_hybrid) or sharding == HYBRID_SHARD:
        stage, within = 3, True
    shard = dp if stage else 1
    if within:
        domain = make_cluster((row.get("hardware") or "").strip(), count(row, "n_devices")).scaleup_domain
        shard = within_domain(dp, domain // (tp * cp))
    layout = Layout(
        tp=tp, pp=pp, dp_replicate=dp // shard, dp_shard=shard, cp=cp, ep=ep,
        virtual_stages=vp, pp_schedule="interleaved_1f1b" if interleaved else "1f1b", zero_stage=stage,
        micro_batch=count(row, "micro_batch", 1), recompute=recompute,  # type: ignore[arg-type]
        sequence_parallel=tp > 1 and (stated_sp or facts.sequence_parallel),
    )
    search_vp = interleaved and not (row.get("vp") or "").strip()
    return layout, search_vp, not (row.get("recompute") or "").strip()


def _global_batch(row: dict[str, str]) -> int:
    """Sequences per optimizer step; where a row states only the per-device micro-batch, one micro-batch per data-
    parallel replica (no gradient accumulation stated, none assumed)."""
    if (row.get("global_batch_seqs") or "").strip() or not (row.get("micro_batch") or "").strip():
        return count(row, "global_batch_seqs")
    return count(row, "micro_batch") * parallel_degrees(row)[3]


def architecture_settings(version: str) -> dict[str, Any]:
    """The TrainSettings fields a model version's published architecture sets: attention head widths (MLA, Qwen3),
    sliding-window and chunked layers, extra norms and node-limited routing (the tables above, each with its
    source)."""
    qk_dim, v_dim = ATTENTION_HEAD_DIMS.get(version, (0, 0))
    window, window_share = SLIDING_WINDOWS.get(version, (0, 0.0))
    chunk, chunk_share = CHUNKED_ATTENTION.get(version, (0, 0.0))
    post_norms, qk_norm = EXTRA_NORMS.get(version, (0, False))
    return {"qk_head_dim": qk_dim, "v_head_dim": v_dim, "attention_window": window,
            "window_layer_share": window_share, "attention_chunk": chunk, "chunk_layer_share": chunk_share,
            "post_norms": post_norms, "qk_norm": qk_norm, "moe_node_limit": NODE_LIMITED_ROUTING.get(version, 0)}


def with_device_count(row: dict[str, str]) -> dict[str, str]:
    """The row with an empty `n_devices` the product of its degrees where it states `dp` (tp, pp and cp empty: 1),
    else the count its hardware cell gives ("8x H100": `cells.with_counted_hardware`, which also leaves the part
    alone in the cell), so a fully stated layout needs no device count; without either the count stays unstated."""
    stated = (row.get("n_devices") or "").strip()
    if not stated and (row.get("dp") or "").strip():
        stated = str(math.prod(count(row, column, 1) for column in ("tp", "pp", "cp", "dp")))
    return with_counted_hardware({**row, "n_devices": stated})


def setup_from_row(row: dict[str, str]) -> RunSetup:
    """Translate one run-table row into a spec, settings, layout and cluster (RowNotRepresentable if it cannot)."""
    if row.get("metric") not in METRICS:
        raise RowNotRepresentable(f"metric={row.get('metric')!r}: expected one of {', '.join(METRICS)}")
    if row.get("metric", "") == "gpu_hours_total":
        raise RowNotRepresentable("gpu_hours_total needs the run's token count, which the columns do not hold")
    published_value(row)
    for column in ("params_b", "active_params_b"):  # checked even where the shape columns decide the model
        positive(row, column)
    facts = framework_facts(row.get("framework") or "")
    row = with_device_count(with_published_shape(row))
    family = row.get("model", "").strip()
    version = row_version(row).version
    spec = spec_from_row(row)
    n_devices = count(row, "n_devices")
    precision = row_precision(row)
    if precision not in ("bf16", "fp16", "fp8", "fp4"):
        raise RowNotRepresentable(f"precision={precision!r}: expected bf16, fp16, fp8 or fp4")
    settings = TrainSettings(
        seq_len=spec.max_seq_len, global_batch_seqs=_global_batch(row),
        precision=precision,  # type: ignore[arg-type]
        attention_kernel=_attention(row), dropout=family in facts.dropout_families,
        param_bytes=facts.param_bytes, gather_param_bytes=facts.gather_param_bytes, grad_bytes=facts.grad_bytes,
        grad_reduce_bytes=4 if facts.grad_reduce_fp32 else 2,
        optimizer_bytes_per_param=facts.optimizer_bytes_per_param,
        dp_overlap=facts.dp_overlap, tp_overlap=facts.tp_overlap, dp_bucket_params=facts.dp_bucket_params,
        dp_bucket_params_per_rank=facts.dp_bucket_params_per_rank,
        zero3_bucket_params=facts.zero3_bucket_params, ep_overlap=facts.ep_overlap,
        grad_reduce_every_micro_batch=facts.grad_reduce_every_micro_batch,
        logit_bytes=facts.logit_bytes,
        fp8_amax_pass=facts.fp8_amax_pass, fp8_saved_inputs=facts.fp8_saved_inputs,
        grouped_gemm_row_tile=facts.grouped_gemm_row_tile, grouped_gemm_per_group_s=facts.grouped_gemm_per_group_s,
        expert_host_op_s=facts.expert_host_op_s, split_flash_backward=facts.split_flash_backward,
        selective_recomputes_alternate_mms=facts.selective_recomputes_alternate_mms,
        recompute_drops_output_gemm=facts.recompute_drops_output_gemm,
        recompute_fuses_elementwise=facts.recompute_fuses_elementwise,
        # torchao's float8 path is documented with torch.compile on (`eager`): an fp8 run is taken to be compiled.
        eager_elementwise=facts.eager_by_default and precision not in ("fp8", "fp4"),
        fsdp_copy_out=facts.fsdp2_copy_out, attention_fa2=facts.attention_fa2,
        foreach_optimizer=facts.foreach_optimizer, fsdp_flat_grad=facts.fsdp1_flat_grad,
    )
    settings = replace(settings, moe_capacity_factor=_capacity_factor(row), **architecture_settings(version))
    settings = _with_weight_dtype(settings, row)
    try:
        cluster = make_cluster((row.get("hardware") or "").strip(), n_devices)
        cluster.peak_flops(settings.gemm_precision)
    except PlanError as error:
        raise RowNotRepresentable(str(error)) from None
    layout, search_vp, search_recompute = _layout(row, facts)
    if layout.n_devices != n_devices:
        raise RowNotRepresentable(f"tp x pp x dp x cp = {layout.n_devices} but n_devices = {n_devices}")
    return RunSetup(row, spec, settings, layout, cluster, facts,
                    search_micro_batch=not (row.get("micro_batch") or "").strip(),
                    search_virtual_stages=search_vp, search_recompute=search_recompute)


def mfu_flops_per_token(spec: ModelSpec, seq_len: int, causal: bool) -> float:
    """Model FLOPs per token as a framework counts them for MFU: 3 x forward, attention full or causal (halved)."""
    flops = float(spec.train_flops_per_token(seq_len))
    if causal:
        flops -= 1.5 * spec.attention_flops_per_token(seq_len)
    return flops


def predicted_metric(setup: RunSetup, step: StepBreakdown) -> float:
    """The row's metric from a predicted step, in the row's own convention."""
    metric = setup.row.get("metric", "")
    n = setup.cluster.n_devices
    tokens_per_s_per_device = setup.settings.tokens_per_step / step.step_time_s / n
    if metric == "mfu":
        precision = setup.settings.precision
        peak = setup.cluster.peak_flops("bf16" if precision in ("bf16", "fp16") else precision)
        flops = mfu_flops_per_token(setup.spec, setup.settings.seq_len, setup.facts.mfu_causal_attention)
        return tokens_per_s_per_device * flops / peak
    if metric == "tflops_per_device_hw":
        return step.hardware_flops / (step.step_time_s * n) / 1e12
    if metric == "step_time_s":
        return step.step_time_s
    if metric == "tokens_per_s_per_device":
        return tokens_per_s_per_device
    if metric == "gpu_hours_per_trillion_tokens":
        return 1e12 / tokens_per_s_per_device / 3600
    raise RowNotRepresentable(f"metric={metric!r}")


def micro_batch_choices(per_replica: int) -> list[int]:
    """Micro-batch sizes that divide a replica's share of the global batch."""
    return [b for b in (1, 2, 4, 8, 16) if per_replica % b == 0] or [1]


def chunk_choices(stage_layers: int) -> list[int]:
    """Interleaved chunks per rank that divide a stage's layers."""
    return [v for v in range(2, stage_layers + 1) if stage_layers % v == 0] or [1]


def stage_layers_of(spec: ModelSpec, pp: int) -> int:
    """Layers of the most loaded stage."""
    return math.ceil(spec.n_layers / pp)
