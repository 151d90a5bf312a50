"""The `plan` command line: reports, one-line errors with exit code 2, JSON headline, plots."""

import json

from typer.testing import CliRunner

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
    assert "PP2(interleaved x2)" in result.output


def test_bad_inputs_exit_2_with_one_line() -> None:
    cases = [
        (["train", "--model", "gpt5"], "unknown model"),
        (["train", "--hardware", "h900"], "unknown hardware"),
        (["train", "--devices", "64", "--tp", "3"], "does not divide"),
        (["train", "--model", "tiny", "--devices", "64", "--pp", "8"], "exceeds n_layers"),
        (["serve", "--model", "llama3-405b", "--quant", "bf16"], "raise --tp"),
    ]
    for args, message in cases:
        result = runner.invoke(plan_app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_validate_ends_with_one_json_line() -> None:
    result = runner.invoke(plan_app, ["validate"])
    assert result.exit_code == 0, result.output
    headline = json.loads(result.output.strip().splitlines()[-1])
    assert headline["validate_mape"] <= 0.10 and headline["rows"] == 31


def test_serve_and_compare() -> None:
    serve = runner.invoke(plan_app, ["serve", "--model", "llama3-8b", "--rps", "20", "--tpot-slo-ms", "30"])
    assert serve.exit_code == 0, serve.output
    assert "replicas" in serve.output
    compare = runner.invoke(plan_app, ["compare", "--model", "llama3-8b", "--devices", "64",
                                       "--hardware", "h100-sxm-80gb,tpu-v5p,jetson-orin-nano-8gb"])
    assert compare.exit_code == 0, compare.output
    assert "tpu-v5p" in compare.output and "not a training device" in compare.output


def test_plot_writes_png_and_svg(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "llama"
    result = runner.invoke(plan_app, ["plot", "--out", str(out), "--model", "llama3-8b", "--tokens", "1e12",
                                      "--hardware", "h100-sxm-80gb", "--devices", "64,128"])
    assert result.exit_code == 0, result.output
    for name in ("llama-scaling.png", "llama-scaling.svg", "llama-frontier.png", "llama-frontier.svg"):
        assert (tmp_path / name).stat().st_size > 1000
