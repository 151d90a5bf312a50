"""Published serving runs, predicted: the engines' documented settings and limits, and the validation of each row.

A row of `published_inference_runs.csv` names its engine (the first word of `system`), model, hardware and workload;
this module turns it into the `ServeSettings` that engine would run with (its defaults, its benchmark tool's
limits, its host behaviour) and predicts the row's metric with `inference.plan_serving`.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aiinfra.plan.cells import (
    CSV_ENCODING,
    RowNotRepresentable,
    count,
    optional_count,
    published_value,
    row_precision,
    run_row,
    with_counted_hardware,
)
from aiinfra.plan.cluster import Cluster
from aiinfra.plan.errors import PlanError
from aiinfra.plan.inference import (
    WEIGHT_BYTES,
    ServeSettings,
    decode_step_time_s,
    finite_run_output_tokens_per_s,
    plan_serving,
)
from aiinfra.plan.known_models import find_model, models_begun
from aiinfra.spec import ModelSpec

INFERENCE_RUNS_CSV = Path(__file__).with_name("published_inference_runs.csv")
INFERENCE_MODELS_CSV = Path(__file__).with_name("inference_models.csv")
# Most sequences an engine schedules at once when a row does not say, by the first word of its `system` column:
# TensorRT-LLM's max_batch_size default (2048) and vLLM's SchedulerConfig.max_num_seqs default (256). Other engines
# get TensorRT-LLM's figure.
ENGINE_MAX_BATCH = {"TensorRT-LLM": 2048, "vLLM": 256}
# Engines that run a mixture-of-experts model's attention data-parallel across the replica's ranks on request:
# TensorRT-LLM (LlmArgs enable_attention_dp) and SGLang (--enable-dp-attention), by the first word of `system`.
ATTENTION_DP_ENGINES = ("TensorRT-LLM", "SGLang")
# Host time per engine step for each request a rank's executor schedules, by the first word of `system`.
# TensorRT-LLM's PyTorch backend (trtllm-bench's backend since v0.19, per its perf-overview) runs the scheduler, input
# preparation and sampling on the host while the GPU runs the previous step (the overlap scheduler), so a step takes
# the longer of the two. TensorRT-LLM PR #10273 measured a host-bound case: 45.11 ms of host_step_time an iteration
# with 1536 requests per attention-DP rank (GPT-OSS-120B on GB200), 29.4 us a request. Engines without a published
# figure get none.
ENGINE_HOST_S_PER_REQUEST = {"TensorRT-LLM": 45.11e-3 / 1536}
# Host time per engine step whatever its batch, for engines whose scheduler runs between GPU steps rather than under
# them. vLLM's engine loop schedules, prepares the inputs, waits for the sampled tokens and processes them while the
# GPU is idle: vLLM RFC #6854 (multi-step scheduling, July 2024) profiles "about 4ms of GPU bubble" on every decode
# step (it cites 5-13 ms in general); the V1 engine overlaps scheduling with execution only with the experimental
# --async-scheduling flag (vLLM PR #19970, June 2025), off by default. We take the profiled 4 ms.
ENGINE_HOST_S_PER_STEP = {"vLLM": 4e-3}
ENGINES_WITH_SERIAL_HOST = frozenset({"vLLM"})
# Which local layers' KV blocks an engine frees, by the first word of `system` (window, chunk): vLLM's hybrid KV cache
# manager reserves "slots only for the most recent sliding_window_size tokens" on sliding-window layers and manages
# Llama 4's local chunked layers the same way (docs.vllm.ai, design/hybrid_kv_cache_manager); TensorRT-LLM keeps a
# separate pool per attention window size (its KV Cache System docs: variable attention window sizes), which covers
# sliding windows but says nothing of chunks. Other engines: neither.
ENGINE_LOCAL_KV = {"vLLM": (True, True), "TensorRT-LLM": (True, False)}
# All-reduces smaller than this run on the engine's own peer-to-peer kernels, larger ones on NCCL/RCCL: vLLM's
# CustomAllreduce(max_size=8192 * 1024) in vllm/distributed/device_communicators/custom_all_reduce.py, on MI300X in
# the ROCm fork since ROCm/vllm PR #27 (May 2024) and upstream since vLLM PR #14125 (March 2025). It matters only
# where the fabric is a mesh: over a switch the collective model already takes the one-/two-shot latency.
ENGINE_CUSTOM_ALL_REDUCE_MAX_BYTES = {"vLLM": 8192 * 1024}


# Requests a TensorRT-LLM perf-overview run queues, by (input, output) tokens: its "Preparing a Dataset" table
# (docs/source/performance/perf-overview.md, commit 00f37686: "$num_requests" per ISL/OSL, more for short sequences
# "to guarantee that the system hit a steady state"). Used for a "TensorRT-LLM max-throughput" row that has no
# `requests` column: those rows are that procedure's output. Fewer requests than the engine holds at once cap the
# batch (`inference.finite_run_output_tokens_per_s`).
TRTLLM_PERF_OVERVIEW_REQUESTS = {
    (128, 128): 30000, (128, 2048): 3000, (128, 4096): 1500, (1000, 2000): 1500, (2048, 128): 3000,
    (2048, 2048): 1500, (5000, 500): 1500, (1000, 1000): 3000, (500, 2000): 3000, (20000, 2000): 1000,
}
TRTLLM_PERF_OVERVIEW_SYSTEM = "TensorRT-LLM max-throughput"
# vLLM's offline throughput script queues --num-prompts requests, 1000 unless told (benchmarks/benchmark_throughput.py,
# `parser.add_argument("--num-prompts", type=int, default=1000)`), for a row whose `system` names the script.
VLLM_THROUGHPUT_SCRIPT = "benchmark_throughput.py"
VLLM_THROUGHPUT_DEFAULT_REQUESTS = 1000


# The engines' other spellings, lower case: TensorRT-LLM as TRT-LLM or by its benchmark tool, vLLM and SGLang in
# any case.
ENGINE_NAMES = {"tensorrt-llm": "TensorRT-LLM", "trt-llm": "TensorRT-LLM", "trtllm": "TensorRT-LLM",
                "trtllm-bench": "TensorRT-LLM", "vllm": "vLLM", "sglang": "SGLang"}


ENGINE_VENDORS = ("nvidia", "amd")


def engine_name(text: str) -> str:
    """An engine's own spelling of the first word of `text` (`ENGINE_NAMES`, after a vendor word: "NVIDIA
    TensorRT-LLM"; "TensorRT LLM" and "tensorrt_llm" as TensorRT-LLM); that word as given when it is not one of
    theirs, '' when empty."""
    words = text.replace("_", "-").split()
    if len(words) > 1 and words[0].lower() in ENGINE_VENDORS:
        words = words[1:]
    if len(words) > 1 and words[0].lower() == "tensorrt" and words[1].lower().startswith("llm"):
        words = ["tensorrt-llm", *words[2:]]
    first = (words or [""])[0]
    return ENGINE_NAMES.get(first.lower().rstrip(",;:"), first)


def row_engine(row: dict[str, str]) -> str:
    """The serving engine a row names: the first word of its `system` column (`engine_name`)."""
    return engine_name(row.get("system") or "")


@dataclass(frozen=True)
class InferenceValidationRow:
    """One published serving figure, predicted."""

    run_id: str
    source: str
    model: str
    generation: str
    metric: str
    published: float
    predicted: float
    batch: int
    limited_by: str

    @property
    def error(self) -> float:
        return (self.predicted - self.published) / self.published


@dataclass(frozen=True)
class ServeModel:
    """A named model's shape from its published configuration (`inference_models.csv`)."""

    spec: ModelSpec
    kv_dim_per_layer: int | None
    shared_experts: int = 0  # always-active experts the shape folds in beyond the published routed experts
    prefill_qkv_head_width: int = 0  # q/k plus v head width of the prefill attention when not 2 x head_dim (MLA)
    moe_layers: int = 0  # layers with routed experts when not every layer (the optional `moe_layers` column)
    version: str = ""  # the architecture version its family and shape give (`known_models.model_version`)

    def settings_fields(self) -> dict[str, Any]:
        """The ServeSettings fields its published configuration sets: MLA's latent cache, folded shared experts, the
        prefill head width, interleaved MoE layers, and its version's sliding-window and chunked layers."""
        from aiinfra.plan.runs import architecture_settings

        local = {key: value for key, value in architecture_settings(self.version).items()
                 if key in ("attention_window", "window_layer_share", "attention_chunk", "chunk_layer_share")}
        return {"kv_dim_per_layer": self.kv_dim_per_layer, "shared_experts": self.shared_experts,
                "prefill_qkv_head_width": self.prefill_qkv_head_width, "moe_layers": self.moe_layers, **local}


def serve_models(path: Path = INFERENCE_MODELS_CSV) -> dict[str, ServeModel]:
    """Every named model of the inference table, shaped by the run schema's own row translation."""
    from aiinfra.plan.runs import architecture_settings, row_version, spec_from_row

    models = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            shaped = {**row, "model": row["family"], "seq_len": "131072"}
            kv = row["kv_dim_per_layer"].strip()
            spec = spec_from_row(shaped)
            published = int(row["experts"]) if (row.get("experts") or "").strip() else spec.n_experts
            version = row_version(shaped).version
            architecture = architecture_settings(version)
            moe_layers = (row.get("moe_layers") or "").strip()
            models[row["model"]] = ServeModel(spec, int(kv) if kv else None, max(0, spec.n_experts - published),
                                              architecture["qk_head_dim"] + architecture["v_head_dim"],
                                              int(moe_layers) if moe_layers else 0, version)
    return models


def unknown_model_message(name: str, models: dict[str, ServeModel]) -> str:
    """Why `find_model` found nothing: the catalog names the name begins, when it begins several."""
    several = models_begun(name, models)
    if len(several) > 1:
        return f"model {name!r} is ambiguous: it begins {', '.join(several)}"
    return f"model {name!r} has no published shape in inference_models.csv"


def engine_settings(engine: str) -> dict[str, Any]:
    """The ServeSettings fields an engine's documented behaviour sets (by its name as `row_engine` gives it; any
    other name, none): its default batch limit, its host work a step and whether it overlaps the GPU, its
    peer-to-peer all-reduce limit, TensorRT-LLM's whole-sequence reservation, and which local layers' old KV blocks it
    frees."""
    trims_window, trims_chunk = ENGINE_LOCAL_KV.get(engine, (False, False))
    return {"max_batch": ENGINE_MAX_BATCH.get(engine, ENGINE_MAX_BATCH["TensorRT-LLM"]),
            "reserve_whole_sequence": engine == "TensorRT-LLM",
            "host_s_per_request": ENGINE_HOST_S_PER_REQUEST.get(engine, 0.0),
            "host_s_per_step": ENGINE_HOST_S_PER_STEP.get(engine, 0.0),
            "host_overlapped": engine not in ENGINES_WITH_SERIAL_HOST,
            "custom_all_reduce_max_bytes": ENGINE_CUSTOM_ALL_REDUCE_MAX_BYTES.get(engine, 0.0),
            "trims_window_kv": trims_window, "trims_chunk_kv": trims_chunk}


def engine_max_batch(row: dict[str, str]) -> int:
    """The row's `max_batch` (an optional column: sequences the engine schedules at once), else its engine's default."""
    return optional_count(row, "max_batch") or engine_settings(row_engine(row))["max_batch"]


def benchmark_requests(row: dict[str, str]) -> int:
    """Requests the row's offline benchmark queued: its optional `requests` column, else the count its benchmark
    procedure documents (TensorRT-LLM's perf-overview table, vLLM's throughput script default), else 0 (an
    unbounded stream: the steady state)."""
    stated = optional_count(row, "requests")
    if stated:
        return stated
    system = (row.get("system") or "").strip()
    if row_engine(row) == "vLLM" and VLLM_THROUGHPUT_SCRIPT in system:
        return VLLM_THROUGHPUT_DEFAULT_REQUESTS
    if system != TRTLLM_PERF_OVERVIEW_SYSTEM:
        return 0
    lengths = (count(row, "input_tokens"), count(row, "output_tokens", 0))
    return TRTLLM_PERF_OVERVIEW_REQUESTS.get(lengths, 0)


def trtllm_bench_limits(spec: ModelSpec, memory_bytes: float, devices: int, weight_dtype: str, kv_dtype: str,
                        input_tokens: int, output_tokens: int) -> tuple[int, int]:
    """(max batch, max tokens per step) that trtllm-bench sets when a run does not give them.

    TensorRT-LLM's tensorrt_llm/bench/build/tuning.py (calc_engine_setting, finetune_setting): the requests whose
    whole prompt and output fit 95% of the memory the weights leave (weights at 1 byte for fp8, 0.5 for NVFP4, 2
    otherwise; the KV cache at 1 byte under fp8, else 2), capped at 4096 and rounded up (to 32 below 256, 128 below
    1024, else 256; at least 64); the token budget that batch times (1 + input / output), capped at 32768, rounded
    up (256 below 4096, 512 below 8192, else 1024; at least 2048).
    """
    bytes_per_elem = {"fp8": 1.0, "fp4": 0.5}.get(weight_dtype, 2.0)
    kv_elem = 1.0 if kv_dtype == "fp8" else 2.0
    # Each rank holds at least one KV head. The tool counts K and V per head from the config (num_key_value_heads x
    # head_size) whatever the attention, so it sizes an MLA model's batch for a cache far larger than its latent.
    per_layer = 2 * max(devices, spec.n_kv_heads) * spec.head_dim
    per_token = spec.n_layers * per_layer * kv_elem
    cache = (memory_bytes * devices - spec.num_params() * bytes_per_elem) * 0.95
    requests = max(cache, 0.0) / (per_token * (input_tokens + output_tokens))
    raw_bs = min(requests, 4096)
    raw_tokens = min(raw_bs * (1 + input_tokens / output_tokens), 32768)
    max_bs = max(64, _round_up_by_tier(raw_bs, ((256, 32), (1024, 128)), 256))
    max_tokens = max(2048, _round_up_by_tier(raw_tokens, ((4096, 256), (8192, 512)), 1024))
    return max_bs, max_tokens


def _round_up_by_tier(value: float, tiers: tuple[tuple[int, int], ...], last_step: int) -> int:
    """`value` rounded up to a multiple of the step of the first tier (below, step) it is below, else `last_step`."""
    step = next((tier_step for below, tier_step in tiers if value < below), last_step)
    return step * math.ceil(value / step)


# A checkpoint name's quantization tag and the precision it means (the tags `known_models` strips from a name).
NAME_PRECISIONS = {"fp8": "fp8", "fp4": "fp4", "nvfp4": "fp4", "mxfp4": "fp4", "int4": "int4-weights",
                   "awq": "int4-weights", "gptq": "int4-weights", "w4a16": "int4-weights", "w8a16": "int8-weights",
                   "int8": "int8", "w8a8": "int8"}


def name_precision(model: str) -> str:
    """The precision a checkpoint's name carries ("...-Instruct-FP8", "-AWQ"), or '' when it names none."""
    tags = [tag for tag in re.split(r"[-_/\s.]+", model.lower()) if tag in NAME_PRECISIONS]
    return NAME_PRECISIONS[tags[-1]] if tags else ""


def _predict_inference_row(row: dict[str, str], models: dict[str, ServeModel]) -> InferenceValidationRow:
    from aiinfra.plan.calibrated import calibrated
    from aiinfra.plan.cluster import make_cluster

    row = with_counted_hardware(row)  # "8x H200": the part, and the count where n_devices is empty

    published = published_value(row)
    metric = row.get("metric", "")
    found = find_model(row.get("model", "").strip(), models)
    if found is None:
        raise RowNotRepresentable(unknown_model_message(row.get("model", "").strip(), models))
    name, model = found, models[found]
    if metric == "output_tokens_per_s" and not (row.get("output_tokens") or "").strip():
        raise RowNotRepresentable("output_tokens not stated (a decode-only share of a disaggregated deployment)")
    speculative = (row.get("speculative") or "").strip()
    if speculative:
        # A draft-and-verify step emits a varying number of tokens: a token's time needs the drafts accepted per step.
        raise RowNotRepresentable(f"speculative decoding ({speculative}): the drafts accepted per step are not stated")
    n_devices = count(row, "n_devices")
    tp = count(row, "tp", n_devices)
    if n_devices % tp:
        raise RowNotRepresentable(f"tp={tp} on {n_devices} devices: expected a tensor-parallel size that divides them")
    # Devices beyond one tensor-parallel group are independent replicas of it (data parallelism across engine
    # instances or vLLM's --data-parallel-size): the group's figure is the replicas' sum, each serving an equal share
    # of a finite run's requests; a batch-1 latency is one replica's.
    replicas = n_devices // tp
    # Weight-only int8/int4 keep 16-bit activations; an empty cell is what the checkpoint's name says it was
    # quantized to (Qwen3-235B-A22B-FP8, nvidia/Llama-3.1-405B-Instruct-FP4, ...-AWQ), else its own 16 bits.
    precision = row_precision(row, default=name_precision(row.get("model", "")) or "bf16")
    weight_dtype = {"int8-weights": "int8", "int4-weights": "int4"}.get(precision, precision)
    if weight_dtype not in WEIGHT_BYTES:
        raise RowNotRepresentable(f"precision={row.get('precision', '').strip()!r}: expected one of "
                                  f"{', '.join(WEIGHT_BYTES)}, int8-weights or int4-weights")
    # fp8 and fp4 checkpoints serve with an fp8 KV cache (TensorRT-LLM, vLLM); int8 weight-only keeps bf16 KV. A row
    # may say otherwise in its optional `kv_dtype` column (a checkpoint whose quantization config leaves the KV cache
    # in 16 bits, such as DeepSeek's own FP8 release, serves with a bf16 cache unless the engine is told).
    kv_dtype = (row.get("kv_dtype") or "").strip() or ("fp8" if weight_dtype in ("fp8", "fp4") else "bf16")
    if kv_dtype not in ("fp8", "bf16"):
        raise RowNotRepresentable(f"kv_dtype={kv_dtype!r}: expected fp8, bf16 or empty")
    # GEMM ceilings fitted on the training runs only: no value is fitted to an inference row.
    cluster = calibrated(make_cluster((row.get("hardware") or "").strip(), tp))
    # TensorRT-LLM's published figures come from trtllm-bench: its scheduler reserves each request's whole
    # sequence, and where a run does not state its limits the tool sets them from the memory (trtllm_bench_limits).
    engine = row_engine(row)
    tensorrt_llm = engine == "TensorRT-LLM"
    attention_dp = (row.get("attention_dp") or "").strip().lower()
    if attention_dp not in ("", "yes", "no"):
        raise RowNotRepresentable(f"attention_dp={attention_dp!r}: expected yes, no or empty")
    settings = ServeSettings(count(row, "input_tokens"), count(row, "output_tokens", 1), weight_dtype=weight_dtype,
                             kv_dtype=kv_dtype, tp=tp, attention_dp=attention_dp == "yes",
                             **{**engine_settings(engine), "max_batch": engine_max_batch(row)},
                             **model.settings_fields())
    if tensorrt_llm and not (row.get("max_batch") or "").strip():
        max_batch, max_tokens = trtllm_bench_limits(model.spec, cluster.memory_bytes, tp, weight_dtype, kv_dtype,
                                                    settings.input_tokens, settings.output_tokens)
        settings = replace(settings, max_batch=max_batch, max_tokens_per_step=max_tokens)
    if metric not in ("output_tokens_per_s", "ms_per_token_low_batch"):
        raise RowNotRepresentable(f"metric={metric!r}: expected output_tokens_per_s or ms_per_token_low_batch")
    options = [settings]
    if not attention_dp and model.spec.is_moe and engine in ATTENTION_DP_ENGINES:
        # The row does not say: the published figure is the engine at its best, so try both (as a training row
        # without a layout gets the best layout that fits).
        options.append(replace(settings, attention_dp=True))
    requests = math.ceil(benchmark_requests(row) / replicas)
    figures = [_serve_figure(metric, model.spec, cluster, option, requests) for option in options]
    pick = min if metric == "ms_per_token_low_batch" else max
    predicted, batch, limited_by = pick(figures, key=lambda figure: figure[0])
    if metric == "output_tokens_per_s":
        predicted *= replicas
    return InferenceValidationRow(row.get("id", "?"), row.get("source", ""), name, cluster.efficiency.generation,
                                  metric, published, predicted, batch, limited_by)


def _serve_figure(metric: str, spec: ModelSpec, cluster: Cluster, settings: ServeSettings,
                  requests: int = 0) -> tuple[float, int, str]:
    """(figure, batch, what bounds the batch) for a row's metric under one engine configuration; `requests` > 0
    is a finite offline run of that many requests (0: the steady state)."""
    if metric == "ms_per_token_low_batch":
        return 1e3 * decode_step_time_s(spec, cluster, settings, 1, prefill=False), 1, "latency"
    plan = plan_serving(spec, cluster, settings)
    if not requests:
        return plan.output_tokens_per_s, plan.batch, plan.limited_by
    figure = finite_run_output_tokens_per_s(spec, cluster, settings, plan.batch, requests, plan.step_time_s)
    return (figure, requests, "requests") if requests < plan.batch else (figure, plan.batch, plan.limited_by)


def validate_inference(path: Path = INFERENCE_RUNS_CSV) -> tuple[list[InferenceValidationRow], list[tuple[str, str]]]:
    """Predict every row of an inference-runs CSV: rows run, and (id, reason) for rows not run."""
    models = serve_models()
    results, not_run = [], []
    with open(path, newline="", encoding=CSV_ENCODING) as handle:
        for row in map(run_row, csv.DictReader(handle)):
            try:
                results.append(_predict_inference_row(row, models))
            except PlanError as error:
                not_run.append((row.get("id", "?"), str(error.args[0] if error.args else error)))
    return results, not_run
