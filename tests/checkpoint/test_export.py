"""Hugging Face export: transformers' LlamaForCausalLM and tokenizer load the folder and agree with ours."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer import Typer
from typer.testing import CliRunner

from aiinfra.checkpoint.commands import export_command
from aiinfra.checkpoint.export import export_hf, export_onnx
from aiinfra.checkpoint.run_dir import save_run
from aiinfra.config import ConfigError, load_config
from aiinfra.data.tokenizer import END_OF_TEXT, encode, load_tokenizer, train_tokenizer
from aiinfra.models import Transformer

transformers = pytest.importorskip("transformers")

TEXTS = [f"def function_{i}(value):\n    return value * {i}  # ünïcode ok\n" for i in range(200)]


def make_run(run_dir: Path, *model_overrides: str) -> Transformer:
    """A finished run directory with a tiny trained-looking model (random weights, real tokenizer)."""
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    overrides = [
        f"model.vocab_size={tokenizer.get_vocab_size()}", "model.dim=64", "model.n_layers=2", "model.n_heads=4",
        "model.n_kv_heads=2", "model.ffn_dim=128", "model.max_seq_len=32", "train.seq_len=32", *model_overrides,
    ]
    config = load_config(None, overrides)
    torch.manual_seed(0)
    model = Transformer(config.model)
    with torch.no_grad():  # norms start at 1: perturb them so a misnamed norm weight would show
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    run_dir.mkdir(parents=True)
    save_run(run_dir, model, config, tokenizer, {"final_loss": 0.0})
    return model.eval()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_transformers_gives_our_logits(tmp_path: Path, tied: bool):
    ours = make_run(tmp_path / "run", f"model.tie_embeddings={str(tied).lower()}")
    out = export_hf(tmp_path / "run", tmp_path / "hf")

    theirs = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert theirs.config.tie_word_embeddings is tied
    tokens = torch.randint(0, ours.spec.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        difference = (theirs(tokens).logits - ours(tokens)).abs().max().item()
    assert difference < 1e-4

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ours_tokenizer = load_tokenizer(tmp_path / "run" / "tokenizer.json")
    text = "def function_7(value):\n    return value * 7  # ünïcode ok\n"
    assert hf_tokenizer(text, add_special_tokens=True)["input_ids"] == encode(ours_tokenizer, text)
    assert hf_tokenizer.decode(encode(ours_tokenizer, text)) == text
    assert hf_tokenizer.eos_token == END_OF_TEXT
    assert hf_tokenizer.eos_token_id == theirs.config.eos_token_id == ours_tokenizer.token_to_id(END_OF_TEXT)


def test_non_llama_spec_is_refused_by_name(tmp_path: Path):
    make_run(tmp_path / "run", "model.mlp=gelu", "model.norm=layernorm", "model.bias=true")
    with pytest.raises(ConfigError, match=r"model.mlp='gelu'.*model.norm='layernorm'.*model.bias=true"):
        export_hf(tmp_path / "run", tmp_path / "hf")


def test_export_command(tmp_path: Path):
    app = Typer()
    app.command("export")(export_command)
    app.command("other")(lambda: None)  # two commands, so typer keeps the sub-command name as in our CLI
    make_run(tmp_path / "run")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--format", "hf"])
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        path.name for path in (tmp_path / "run" / "hf").iterdir()
    }
    wrong_format = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--format", "tflite"])
    assert wrong_format.exit_code == 2 and "--format tflite: expected one of hf, onnx" in wrong_format.output
    not_a_run = CliRunner().invoke(app, ["export", str(tmp_path / "nothing")])
    assert not_a_run.exit_code == 2 and "is it a finished run?" in not_a_run.output
    int8_hf = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--format", "hf", "--int8"])
    assert int8_hf.exit_code == 2 and "--int8 is for --format onnx" in int8_hf.output


@pytest.mark.parametrize(
    "model_overrides",
    [
        ("model.tie_embeddings=true",),
        ("model.mlp=gelu", "model.norm=layernorm", "model.position=learned", "model.bias=true"),
    ],
    ids=["llama", "gpt"],
)
def test_onnx_runtime_gives_our_logits_at_any_shape(tmp_path: Path, model_overrides: tuple[str, ...]):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    ours = make_run(tmp_path / "run", *model_overrides)
    out = export_onnx(tmp_path / "run", tmp_path / "onnx")
    assert (out / "tokenizer.json").is_file()
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(2)
    for shape in [(2, 8), (1, 32), (3, 5)]:  # batch and sequence are dynamic
        tokens = torch.randint(0, ours.spec.vocab_size, shape, generator=generator)
        (logits,) = session.run(["logits"], {"input_ids": tokens.numpy()})
        with torch.no_grad():
            assert abs(torch.from_numpy(logits) - ours(tokens)).max().item() < 1e-4


def test_int8_onnx_is_a_quarter_of_the_bytes_and_keeps_the_predictions(tmp_path: Path):
    onnxruntime = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ours = make_run(tmp_path / "run", "model.dim=128", "model.ffn_dim=352")
    app = Typer()
    app.command("export")(export_command)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--format", "onnx", "--int8"])
    assert result.exit_code == 0 and "int8 ONNX model" in result.output, result.output
    fp32_dir = export_onnx(tmp_path / "run", tmp_path / "onnx")
    int8_dir = tmp_path / "run" / "onnx-int8"
    assert sorted(path.name for path in int8_dir.iterdir()) == sorted(path.name for path in fp32_dir.iterdir())
    assert (int8_dir / "model.onnx").stat().st_size < 0.4 * (fp32_dir / "model.onnx").stat().st_size
    session = onnxruntime.InferenceSession(str(int8_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert any(node.op_type == "MatMulInteger" for node in onnx.load(str(int8_dir / "model.onnx")).graph.node)
    tokens = torch.randint(0, ours.spec.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    (logits,) = session.run(["logits"], {"input_ids": tokens.numpy()})
    with torch.no_grad():
        reference = ours(tokens)
    error = (torch.from_numpy(logits) - reference).norm() / reference.norm()
    assert error < 0.1  # int8 rounding, not a wrong graph (a wrong one is off by order 1)
    agree = (torch.from_numpy(logits).argmax(-1) == reference.argmax(-1)).float().mean()
    assert agree > 0.9
