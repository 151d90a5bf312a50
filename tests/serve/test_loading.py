"""Model loading (our run directories, Hugging Face Llama folders), int8 quantization, and the commands."""

import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from aiinfra.checkpoint.run_dir import save_run
from aiinfra.config import load_config
from aiinfra.models.llama import Transformer
from aiinfra.serve.commands import bench_serve_command, serve_command
from aiinfra.serve.engine import EngineConfig, LLMEngine
from aiinfra.serve.loading import hf_name_to_ours, load_model
from aiinfra.serve.quantize import Int8Linear, quantize_int8, weight_bytes
from aiinfra.serve.request import SamplingParams

from .server import TEXTS, tiny_served_model


def test_hf_llama_folder_gives_the_same_logits_as_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, eos_token_id=0, bos_token_id=0,
    )
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path)
    tiny_served_model().tokenizer.save(str(tmp_path / "tokenizer.json"))
    served = load_model(tmp_path)
    tokens = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(served.model(tokens), reference(tokens).logits, atol=1e-4, rtol=1e-4)
        want = reference.generate(tokens, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    engine = LLMEngine(served.model, EngineConfig(block_size=4, num_blocks=64))
    got = engine.generate([tokens[0].tolist()], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert got[0] == want[0, 24:].tolist()
    assert served.eos_token_id == 0 and served.name == tmp_path.name


def test_hf_names_and_refusals(tmp_path: Path) -> None:
    assert hf_name_to_ours("model.layers.3.self_attn.q_proj.weight") == "layers.3.attention.wq.weight"
    assert hf_name_to_ours("model.layers.0.mlp.gate_proj.weight") == "layers.0.feed_forward.w1.weight"
    assert hf_name_to_ours("lm_head.weight") == "output.weight"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="only Llama-format"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        load_model(tmp_path / "missing")


def test_run_directory_loads_for_serving(tmp_path: Path, small_corpus: Path) -> None:
    served = tiny_served_model()
    config = load_config(None, [f"data.corpus={small_corpus}", "model.vocab_size=300", "model.dim=64",
                                "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
                                "model.max_seq_len=256", "train.seq_len=64"])
    model = Transformer(config.model).eval()
    save_run(tmp_path, model, config, served.tokenizer, {})
    loaded = load_model(tmp_path)
    assert loaded.eos_token_id == served.eos_token_id
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name])


def test_int8_saves_memory_and_stays_close() -> None:
    served = tiny_served_model()
    tokens = torch.tensor([served.tokenizer.encode(TEXTS[5]).ids])
    with torch.no_grad():
        before = served.model(tokens)
        bytes_before = weight_bytes(served.model)
        quantize_int8(served.model)
        after = served.model(tokens)
    assert isinstance(served.model.layers["0"].attention.wq, Int8Linear)
    assert weight_bytes(served.model) < 0.5 * bytes_before
    # Per-channel int8 keeps the logits within a few percent of their spread.
    assert (after - before).abs().max() < 0.1 * before.std()
    engine = LLMEngine(served.model, EngineConfig(block_size=8, num_blocks=64))
    assert len(engine.generate([tokens[0].tolist()[:10]], SamplingParams(max_tokens=5, ignore_eos=True))[0]) == 5


def test_commands_fail_with_one_clear_line(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("serve")(serve_command)
    app.command("bench")(bench_serve_command)
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "not a directory" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["bench", "--base-url", "http://127.0.0.1:9", "--num-prompts", "1"])
    assert result.exit_code == 2 and "cannot list models" in result.output
