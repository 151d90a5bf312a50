"""The published-model catalog, the names rows and users give its models, and serving rows over several replicas."""

import csv

import pytest

from aiinfra.plan.models import resolve_model
from aiinfra.plan.runs import RowNotRepresentable
from aiinfra.plan.serve_rows import INFERENCE_MODELS_CSV, _predict_inference_row, find_model, serve_models

ROW = {"id": "x", "system": "TensorRT-LLM max-throughput", "model": "llama-3.1-8b", "hardware": "h100-sxm-80gb",
       "n_devices": "1", "tp": "1", "precision": "fp8", "input_tokens": "1000", "output_tokens": "1000",
       "metric": "output_tokens_per_s", "value": "1"}


@pytest.mark.parametrize(("name", "catalog"), [
    ("llama-3.1-70b", "llama-3.1-70b"),
    ("meta-llama/Llama-3.1-70B-Instruct", "llama-3.1-70b"),
    ("amd/Llama-3.1-70B-Instruct-FP8-KV", "llama-3.1-70b"),
    ("Meta-Llama-3-8B-Instruct", "llama-3-8b"),
    ("llama3.1-8b", "llama-3.1-8b"),
    ("Llama 3.3 70B", "llama-3.3-70b"),
    ("qwen3-235b", "qwen3-235b-a22b"),
    ("Qwen/Qwen3-235B-A22B-Instruct-2507-FP8", "qwen3-235b-a22b"),
    ("nvidia/DeepSeek-R1-FP4", "deepseek-r1"),
    ("deepseek-r1-0528", "deepseek-r1"),
    ("deepseek-v3/r1", "deepseek-v3/r1"),
    ("llama-4-scout", "llama-4-scout-17b-16e"),
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", "mixtral-8x7b"),
    ("openai/gpt-oss-120b", "gpt-oss-120b"),
    ("deepseek-ai/DeepSeek-V2-Lite-Chat", "deepseek-v2-lite"),
    ("deepseek-v2", "deepseek-v2"),
    ("meta-llama/Llama-3.2-1B-Instruct", "llama-3.2-1b"),
    ("deepseek-ai/DeepSeek-R1-Distill-Llama-70B", "deepseek-r1-distill-llama-70b"),
    ("google/gemma-2-27b-it", "gemma-2-27b"),
    ("mistralai/Mistral-Nemo-Instruct-2407", "mistral-nemo-12b"),
    ("microsoft/Phi-3-mini-4k-instruct", "phi-3-mini"),
    ("CohereForAI/c4ai-command-r-08-2024", "command-r"),
    ("CohereForAI/c4ai-command-r-plus", "command-r-plus"),
    ("moonshotai/Kimi-K2-Instruct", "kimi-k2"),
    ("Qwen/Qwen3-Coder-480B-A35B-Instruct-FP8", "qwen3-coder-480b-a35b"),
    ("zai-org/GLM-4.5-FP8", "glm-4.5"),
    ("zai-org/GLM-4.5-Air", "glm-4.5-air"),
    ("MiniMaxAI/MiniMax-M2", "minimax-m2"),
    ("EleutherAI/gpt-j-6b", "gpt-j-6b"),
    ("tiiuae/falcon-180B-chat", "falcon-180b"),
    ("Qwen/Qwen3-4B-Instruct-2507", "qwen3-4b"),
    ("Qwen/Qwen2.5-1.5B-Instruct", "qwen2.5-1.5b"),
])
def test_a_published_name_finds_its_catalog_model(name: str, catalog: str) -> None:
    assert find_model(name, serve_models()) == catalog


@pytest.mark.parametrize("name", ["llama-3", "qwen3", "gpt-oss", "deepseek", "llama-3.1-13b"])
def test_an_ambiguous_or_unknown_name_finds_none(name: str) -> None:
    # "llama-3" begins llama-3-8b and llama-3-70b; "qwen3" several Qwen3 models: guessing would price the wrong one.
    assert find_model(name, serve_models()) is None


def test_an_unknown_model_row_is_not_run_with_its_name() -> None:
    with pytest.raises(RowNotRepresentable, match="'jamba-1.5-large' has no published shape"):
        _predict_inference_row({**ROW, "model": "jamba-1.5-large"}, serve_models())
    with pytest.raises(RowNotRepresentable, match="'llama-3' is ambiguous: it begins llama-3-8b, llama-3-70b"):
        _predict_inference_row({**ROW, "model": "llama-3"}, serve_models())


def test_every_catalog_shape_has_its_published_parameter_count() -> None:
    with INFERENCE_MODELS_CSV.open(newline="") as handle:
        published = {row["model"]: float(row["params_b"]) for row in csv.DictReader(handle)}
    models = serve_models()
    # PaLM's heads are set to d_model / 256 so its multi-query cache is exact (its notes): its count is not kept.
    for name, params_b in published.items():
        if name == "palm-540b":
            continue
        assert models[name].spec.num_params() / 1e9 == pytest.approx(params_b, rel=0.015), name


def test_published_configurations_keep_their_architecture() -> None:
    models = serve_models()
    gpt_oss = models["gpt-oss-120b"].spec
    # 128 experts, top-4, each 2880 wide; 64-wide heads, so rotary positions (2880 / 64 = 45 would be odd).
    assert (gpt_oss.n_experts, gpt_oss.experts_per_token, gpt_oss.ffn_dim) == (128, 4, 2880)
    assert (gpt_oss.head_dim, gpt_oss.position) == (64, "rope")
    mixtral = models["mixtral-8x22b"].spec
    assert (mixtral.n_experts, mixtral.experts_per_token) == (8, 2)
    qwen = resolve_model("qwen3-32b")  # 64 heads of 128 against hidden 5120, and QK-norm
    assert qwen.spec.head_dim == 128 and qwen.train_settings["qk_norm"]
    assert resolve_model("Qwen/Qwen3-32B").spec == qwen.spec
    # Llama 3.2's small models tie the head to the embedding; Llama 3.1 8B does not.
    assert models["llama-3.2-1b"].spec.tie_embeddings and not models["llama-3.1-8b"].spec.tie_embeddings
    assert models["deepseek-v2-lite"].kv_dim_per_layer == 512 + 64  # MLA's latent and rotary key
    # Gemma's versions follow from (hidden, layers): Gemma 2 alternates 4096-token windows with global layers, Gemma 3
    # has five 1024-token local layers to each global one; both tie the head; 27B's heads are 128 wide, 9B's 256.
    gemma2, gemma3 = models["gemma-2-9b"], models["gemma-3-27b"]
    assert (gemma2.version, gemma2.spec.head_dim, gemma2.spec.tie_embeddings) == ("gemma2", 256, True)
    assert gemma2.settings_fields()["attention_window"] == 4096
    assert gemma2.settings_fields()["window_layer_share"] == pytest.approx(0.5)
    assert (gemma3.version, gemma3.spec.head_dim) == ("gemma3", 128)
    assert gemma3.settings_fields()["window_layer_share"] == pytest.approx(5 / 6)
    # Mistral NeMo keeps 128-wide heads at hidden 5120 (q width 4096); Mistral Large 2's are hidden / heads.
    assert models["mistral-nemo-12b"].spec.head_dim == 128 and models["mistral-large-123b"].spec.head_dim == 128
    assert models["command-r"].spec.tie_embeddings and not models["phi-4"].spec.tie_embeddings
    assert models["nemotron-4-340b"].spec.mlp == "gelu"  # two matrices (squared ReLU), not SwiGLU's three
    kimi = models["kimi-k2"]  # DeepSeek-V3's architecture with 384 routed experts and 64 MLA heads
    assert (kimi.spec.n_experts, kimi.kv_dim_per_layer, kimi.moe_layers) == (384, 576, 60)
    # GLM-4.5 and MiniMax-M2: 128-wide heads apart from hidden / heads, experts within 3% of the published
    # moe_intermediate_size (1536) from the model cards' counts, GLM's dense first layers outside the MoE count.
    glm, minimax = models["glm-4.5"], models["minimax-m2"]
    assert (glm.spec.head_dim, glm.spec.n_experts, glm.spec.experts_per_token, glm.moe_layers) == (128, 160, 8, 89)
    assert (minimax.spec.head_dim, minimax.spec.n_experts, minimax.version) == (128, 256, "minimax-m2")
    # Qwen's small releases tie their output head; the same family's larger ones do not.
    assert models["qwen3-4b"].spec.tie_embeddings and models["qwen2.5-1.5b"].spec.tie_embeddings
    assert not models["qwen3-8b"].spec.tie_embeddings and not models["qwen2.5-7b"].spec.tie_embeddings
    assert models["qwen3-4b"].spec.head_dim == 128  # 2560 / 32 = 80: the published head_dim
    falcon = models["falcon-180b"].spec  # a 2-matrix LayerNorm model with rotary positions, 64-wide heads
    assert (falcon.mlp, falcon.norm, falcon.position, falcon.head_dim, falcon.ffn_dim) == (
        "gelu", "layernorm", "rope", 64, 4 * 14848)
    assert glm.spec.ffn_dim == pytest.approx(1536, rel=0.03) and minimax.spec.ffn_dim == pytest.approx(1536, rel=0.03)


def test_devices_beyond_one_tensor_parallel_group_are_replicas() -> None:
    models = serve_models()
    steady = {**ROW, "system": "TensorRT-LLM trtllm-bench"}  # no documented request count: the steady state
    one = _predict_inference_row(steady, models).predicted
    assert _predict_inference_row({**steady, "n_devices": "8"}, models).predicted == pytest.approx(8 * one)
    # A finite run splits its requests: 3000 over 8 replicas is 375 each, fewer than one replica holds at once.
    finite = _predict_inference_row({**ROW, "n_devices": "8"}, models)
    assert finite.batch == 375 and finite.limited_by == "requests"
    latency = {**ROW, "metric": "ms_per_token_low_batch"}
    assert (_predict_inference_row({**latency, "n_devices": "8"}, models).predicted
            == _predict_inference_row(latency, models).predicted)
    with pytest.raises(RowNotRepresentable, match="tp=3 on 8 devices"):
        _predict_inference_row({**ROW, "n_devices": "8", "tp": "3"}, models)


@pytest.mark.parametrize(("column", "text", "message"), [
    ("value", "", "value='': expected the published figure"),
    ("value", "-5", "value='-5': expected the published figure"),
    ("n_devices", "abc", "n_devices='abc' is not a number"),
    ("tp", "0", "tp='0': expected a whole number >= 1"),
    ("output_tokens", "0", "output_tokens='0': expected a whole number >= 1"),
    ("input_tokens", "", "input_tokens not stated"),
])
def test_a_bad_serving_cell_is_a_row_not_run_with_its_column(column: str, text: str, message: str) -> None:
    with pytest.raises(RowNotRepresentable, match=message):
        _predict_inference_row({**ROW, column: text}, serve_models())


def test_a_precision_spelled_by_its_recipe_is_the_schemas_word() -> None:
    models = serve_models()
    blackwell = {**ROW, "hardware": "b200"}
    fp4 = _predict_inference_row({**blackwell, "precision": "fp4"}, models).predicted
    assert _predict_inference_row({**blackwell, "precision": "NVFP4"}, models).predicted == fp4
    # An empty cell serves the checkpoint's 16-bit weights.
    assert (_predict_inference_row({**blackwell, "precision": ""}, models).predicted
            == _predict_inference_row({**blackwell, "precision": "bf16"}, models).predicted)
    with pytest.raises(RowNotRepresentable, match="precision='w9': expected one of"):
        _predict_inference_row({**blackwell, "precision": "w9"}, models)


def test_an_engine_is_named_in_any_spelling() -> None:
    from aiinfra.plan.serve_rows import row_engine

    assert [row_engine({"system": text}) for text in ("vllm 0.6.3", "TRT-LLM", "trtllm-bench", "SGLang v0.4", "")] \
        == ["vLLM", "TensorRT-LLM", "TensorRT-LLM", "SGLang", ""]


def test_no_corrupted_serving_cell_escapes_as_anything_but_a_row_not_run() -> None:
    from aiinfra.plan.errors import PlanError
    from aiinfra.plan.serve_rows import INFERENCE_RUNS_CSV

    with INFERENCE_RUNS_CSV.open(newline="") as handle:
        rows = list(csv.DictReader(handle))[::4]
    models = serve_models()
    ran = refused = 0
    for row in rows:
        for column in [c for c in row if c not in ("id", "source", "notes")]:
            for text in ("0", "2.5", "-1", "abc", ""):
                try:
                    assert _predict_inference_row({**row, column: text}, models).predicted > 0
                    ran += 1
                except PlanError:
                    refused += 1
    assert ran and refused
