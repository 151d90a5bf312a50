"""The `plan` command line: reports, one-line errors with exit code 2, JSON headline, plots."""

import json

import pytest
from typer.testing import CliRunner

from aiinfra.plan.cluster import make_cluster
from aiinfra.plan.commands import plan_app

runner = CliRunner()


def test_train_search_prints_a_report() -> None:
    result = runner.invoke(plan_app, ["train", "--model", "llama3-8b", "--tokens", "1e12", "--devices", "64",
                                      "--search", "--json"])
    assert result.exit_code == 0, result.output
    assert "memory per device" in result.output and "goodput" in result.output
    headline = json.loads(result.output.strip().splitlines()[-1])
    assert 0 < headline["mfu"] < 1


def test_train_explicit_layout() -> None:
    result = runner.invoke(plan_app, ["train", "--model", "llama3-70b", "--devices", "64", "--tp", "8", "--pp", "2",
                                      "--vp", "2", "--recompute", "full"])
    assert result.exit_code == 0, result.output
    assert "PP2(interleaved_1f1b x2)" in result.output
    assert "hopper: training validated on" in result.output


def test_train_with_no_flags_plans_its_defaults_and_says_when_they_do_not_fit() -> None:
    # 70B on 1024 H100 at TP1: the default 4M-token batch (512 sequences) is rounded up to one per replica, and the
    # replicated model states cannot fit: the report says so on its last line, with what to try.
    result = runner.invoke(plan_app, ["train"])
    assert result.exit_code == 0, result.output
    assert "1024 x 8192 tokens per step" in result.output
    ending = " ".join(result.output.split()).rsplit("validated on", 1)[1]
    assert "does not fit: TP1 DP1024" in ending and "--search finds the fastest layout that fits" in ending
    fitting = runner.invoke(plan_app, ["train", "--devices", "64", "--tp", "8", "--pp", "2", "--recompute", "full"])
    assert "does not fit" not in fitting.output


BAD_INPUTS = [
    (["train", "--model", "gpt5"], "unknown model"),
    (["train", "--hardware", "h900"], "unknown hardware"),
    (["train", "--devices", "64", "--tp", "3"], "does not divide"),
    (["train", "--model", "tiny", "--devices", "64", "--pp", "8"], "exceeds n_layers"),
    (["train", "--tp", "0"], "--tp=0"),
    (["train", "--pp", "0"], "--pp=0"),
    (["train", "--cp", "0"], "--cp=0"),
    (["train", "--ep", "-1"], "--ep=-1"),
    (["train", "--vp", "0"], "--vp=0"),
    (["train", "--micro-batch", "0"], "--micro-batch=0"),
    (["train", "--seq-len", "-5"], "--seq-len=-5"),
    (["train", "--tokens", "-1e12"], "--tokens=-1e+12"),
    (["train", "--devices", "0"], "--devices=0"),
    (["train", "--global-batch", "-1"], "--global-batch=-1"),
    (["train", "--zero", "5"], "--zero=5"),
    (["train", "--pue", "0.5"], "--pue=0.5"),
    (["train", "--devices", "64", "--dp-shard", "3"], "--dp-replicate x --dp-shard"),
    (["train", "--precision", "fp2"], "--precision"),
    (["train", "--config", "/nonexistent.toml"], "--config"),
    (["serve", "--model", "llama3-405b", "--quant", "bf16"], "raise --tp"),
    (["serve", "--rps", "-5"], "--rps=-5"),
    (["serve", "--rps", "0"], "--rps=0"),
    (["serve", "--tp", "0"], "--tp=0"),
    (["serve", "--tp", "3"], "--tp=3"),
    (["serve", "--input-tokens", "0"], "--input-tokens=0"),
    (["serve", "--output-tokens", "-1"], "--output-tokens=-1"),
    (["serve", "--max-batch", "-1"], "--max-batch=-1"),
    (["serve", "--engine", "tgi"], "--engine='tgi'"),
    (["serve", "--tpot-slo-ms", "-1"], "--tpot-slo-ms=-1"),
    (["compare", "--devices", "0"], "--devices=0"),
    (["compare", "--tokens", "-1"], "--tokens=-1"),
    (["plot", "--out", "x", "--devices", "0,8"], "--devices"),
    (["validate", "--runs", "/nonexistent.csv"], "--runs"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS)
def test_bad_inputs_exit_2_with_one_line_naming_the_flag(args: list[str], message: str) -> None:
    result = runner.invoke(plan_app, args)
    assert result.exit_code == 2, (args, result.output)
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_validate_ends_with_the_headline_json_line() -> None:
    result = runner.invoke(plan_app, ["validate"])
    assert result.exit_code == 0, result.output
    headline = json.loads(result.output.strip().splitlines()[-1])
    for key in ("validate_mape", "validate_max_ape", "rows", "rows_not_run", "inference_mape", "inference_rows",
                "inference_rows_not_run", "in_sample_mape"):
        assert key in headline
    assert headline["rows"] + headline["rows_not_run"] == 95
    assert headline["inference_rows"] + headline["inference_rows_not_run"] == 28
    assert result.output.index("leave-one-source-out") < result.output.index("In-sample")


def test_validate_markdown_prints_only_the_tables_then_the_json_line() -> None:
    """`--markdown` is for pasting: Markdown tables and the rows not run, no console tables, the JSON line last."""
    result = runner.invoke(plan_app, ["validate", "--markdown"])
    assert result.exit_code == 0, result.output
    *body, last = result.output.strip().splitlines()
    assert json.loads(last)["rows"] == 92
    assert body[0].startswith("| run | gen | metric |") and any(line.startswith("| inference run |") for line in body)
    assert not any(ch in result.output for ch in "│┃━─"), "console tables leaked into the Markdown"
    assert sum(line.startswith("- ") for line in body) == 7  # the rows not run, each with its reason


FOREIGN_CSV = """id,source,model,params_b,active_params_b,layers,hidden,heads,kv_heads,ffn,vocab,seq_len,\
global_batch_seqs,micro_batch,hardware,n_devices,tp,pp,dp,cp,ep,vp,sharding,recompute,precision,framework,experts,\
experts_per_token,metric,value,notes
x-1,Someone 2030,llama,8,,32,4096,32,8,14336,128256,8192,64,1,h100-sxm-80gb,64,1,1,64,1,1,,fsdp,full,bf16,torchtitan,,,\
tokens_per_s_per_device,5000,
x-2,Someone else 2031,llama,8,,32,4096,32,8,14336,128256,8192,64,1,h100-sxm-80gb,64,1,1,64,1,1,,fsdp,full,bf16,\
torchtitan,,,mfu,0.4,
x-3,Someone 2030,llama,8,,32,4096,32,8,14336,128256,8192,64,1,nohw,64,1,1,64,1,1,,fsdp,full,bf16,torchtitan,,,mfu,0.4,
"""


def test_validate_reads_any_csv_of_the_shared_schema(tmp_path) -> None:  # type: ignore[no-untyped-def]
    runs = tmp_path / "runs.csv"
    runs.write_text(FOREIGN_CSV)
    result = runner.invoke(plan_app, ["validate", "--runs", str(runs)])
    assert result.exit_code == 0, result.output
    headline = json.loads(result.output.strip().splitlines()[-1])
    assert headline["rows"] == 2 and headline["rows_not_run"] == 1
    assert "not run: x-3: unknown hardware 'nohw'" in result.output


@pytest.mark.parametrize(("content", "message"), [
    ("", "not a run table of the shared schema (no column metric, value, hardware"),
    ("a,b\n1,2\n", "not a run table of the shared schema"),
    (FOREIGN_CSV.splitlines()[0] + "\n", "no rows to validate"),
])
def test_validate_refuses_a_file_that_is_no_run_table(tmp_path, content: str, message: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "runs.csv"
    path.write_text(content)
    result = runner.invoke(plan_app, ["validate", "--runs", str(path)])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_validate_reports_no_error_figure_when_no_row_ran(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "runs.csv"
    path.write_text("\n".join(FOREIGN_CSV.splitlines()[:1] + [FOREIGN_CSV.splitlines()[-1]]) + "\n")  # nohw only
    result = runner.invoke(plan_app, ["validate", "--runs", str(path)])
    headline = json.loads(result.output.strip().splitlines()[-1])
    assert (headline["rows"], headline["rows_not_run"]) == (0, 1)
    assert headline["validate_mape"] is None and headline["validate_max_ape"] is None


def test_train_predicts_the_run_a_config_describes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\npreset = "small"\n[parallel]\ndp_shard = 4\ntp = 2\n')
    result = runner.invoke(plan_app, ["train", "--config", str(toml), "--hardware", "a100-sxm-80gb", "--json"])
    assert result.exit_code == 0, result.output
    assert "on 8 x a100-sxm-80gb" in result.output and "ampere: training validated on" in result.output
    assert json.loads(result.output.strip().splitlines()[-1])["layout"].startswith("TP2 DP4 ZeRO-3")


def test_serve_and_compare() -> None:
    serve = runner.invoke(plan_app, ["serve", "--model", "llama3-8b", "--rps", "20", "--tpot-slo-ms", "30"])
    assert serve.exit_code == 0, serve.output
    assert "replicas" in serve.output
    compare = runner.invoke(plan_app, ["compare", "--model", "llama3-8b", "--devices", "64",
                                       "--hardware", "h100-sxm-80gb,tpu-v5p,jetson-orin-nano-8gb"])
    assert compare.exit_code == 0, compare.output
    assert "tpu-v5p" in compare.output and "not a training device" in compare.output
    assert "tpu-v5p: tpu-v5p: training validated on" in compare.output and "UNVALIDATED" in compare.output
    assert "hopper: training validated on" in serve.output


def test_serve_with_attention_dp_schedules_per_rank() -> None:
    args = ["serve", "--model", "llama3-8b", "--hardware", "h200", "--tp", "8", "--max-batch", "256"]
    tp, dp = runner.invoke(plan_app, args), runner.invoke(plan_app, [*args, "--attention-dp"])
    assert tp.exit_code == 0 and dp.exit_code == 0, tp.output + dp.output
    # max_batch 256 caps the whole replica under tensor parallelism, each of the 8 ranks under attention DP.
    assert "256 (max-batch)" in tp.output and "2048 (max-batch)" in dp.output


def test_plot_writes_png_and_svg(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "llama"
    result = runner.invoke(plan_app, ["plot", "--out", str(out), "--model", "llama3-8b", "--tokens", "1e12",
                                      "--hardware", "h100-sxm-80gb", "--devices", "64,128"])
    assert result.exit_code == 0, result.output
    for name in ("llama-scaling.png", "llama-scaling.svg", "llama-frontier.png", "llama-frontier.svg"):
        assert (tmp_path / name).stat().st_size > 1000


def test_published_models_are_planned_as_validate_prices_them() -> None:
    """`--model` takes the validation table's published configurations too, with their version's architecture:
    DeepSeek-R1 serves from its 576-wide MLA latent (61 x 576 bytes a token in fp8), Qwen3 235B trains with EP."""
    from aiinfra.plan.models import published_serving, resolve_model
    from aiinfra.plan.serve_rows import serve_models

    r1 = resolve_model("deepseek-r1")
    assert r1.spec.num_params() == serve_models()["deepseek-r1"].spec.num_params()
    assert published_serving(r1.published)["kv_dim_per_layer"] == 576 and r1.train_settings["moe_node_limit"] == 4
    served = runner.invoke(plan_app, ["serve", "--model", "deepseek-r1", "--hardware", "h200", "--tp", "8",
                                      "--attention-dp"])
    assert served.exit_code == 0, served.output
    assert f"{61 * 576 / 1e3:.0f} kB" in served.output
    trained = runner.invoke(plan_app, ["train", "--model", "qwen3-235b-a22b", "--hardware", "b200", "--devices", "256",
                                       "--pp", "8", "--ep", "8", "--seq-len", "4096", "--global-batch", "8192",
                                       "--precision", "fp8"])
    assert trained.exit_code == 0, trained.output
    assert "235.2B parameters (22.2B active)" in trained.output and "EP8" in trained.output
    unknown = runner.invoke(plan_app, ["train", "--model", "no-such-model"])
    assert unknown.exit_code == 2 and "qwen3-235b-a22b" in unknown.output


def test_the_layout_search_tries_expert_parallelism_for_mixture_of_experts_only() -> None:
    from aiinfra.plan.layout import TrainSettings
    from aiinfra.plan.models import resolve_model
    from aiinfra.plan.training import MAX_SEARCHED_EP, candidate_layouts

    cluster = make_cluster("h100-sxm-80gb", 64)
    settings = TrainSettings(seq_len=4096, global_batch_seqs=512)
    moe = {layout.ep for layout in candidate_layouts(resolve_model("qwen3-30b-a3b", 4096).spec, settings, cluster)}
    dense = {layout.ep for layout in candidate_layouts(resolve_model("llama3-8b").spec, settings, cluster)}
    assert dense == {1}
    assert moe == {1, 2, 4, 8, 16, 32, 64} and max(moe) <= MAX_SEARCHED_EP


def test_a_hardware_spelling_finds_its_listed_price() -> None:
    from aiinfra.plan.prices import parse_prices, price_for

    prices = parse_prices(["TPU v5p=3.5"])
    assert price_for(prices, "H100") == price_for(prices, "h100-sxm-80gb") is not None
    assert price_for(prices, "tpu-v5p") == 3.5


def test_serve_applies_the_named_engines_documented_behaviour() -> None:
    args = ["serve", "--model", "gpt-oss-20b", "--tp", "1", "--input-tokens", "8000", "--output-tokens", "8000"]
    plain = runner.invoke(plan_app, args, env={"COLUMNS": "220"})
    vllm = runner.invoke(plan_app, [*args, "--engine", "vLLM"], env={"COLUMNS": "220"})
    assert plain.exit_code == vllm.exit_code == 0, plain.output + vllm.output
    assert "(kv-cache)" in plain.output
    assert "256 (max-batch)" in vllm.output  # vLLM's max_num_seqs default; its freed sliding-window blocks leave room
