"""Hugging Face checkpoints as Llama 3.1 and later ship them, against transformers: scaled RoPE (`llama3`,
`linear`), sharded safetensors through the index, the checkpoint's dtype or the one asked, and the chat-template
helpers HF templates call."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import torch

from aiinfra.serve.engine import EngineConfig, LLMEngine
from aiinfra.serve.loading import load_model
from aiinfra.serve.request import SamplingParams
from aiinfra.serve.serving_chat import chat_template_environment

from .server import tiny_served_model

transformers = pytest.importorskip("transformers")

ROPE_SCALINGS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "factor": 4.0},
}


def save_hf_llama(folder: Path, rope_scaling: dict | None, dtype: torch.dtype = torch.float32,
                  shard: bool = True) -> torch.nn.Module:
    """A random tiny HF Llama saved in `folder` (in shards of 40 kB, with their index), with our test tokenizer."""
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=160, rope_theta=500000.0, eos_token_id=0, bos_token_id=0,
        rope_scaling=rope_scaling,
    )
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).eval().to(dtype)
    reference.save_pretrained(folder, max_shard_size="40kB" if shard else "1GB")
    tiny_served_model().tokenizer.save(str(folder / "tokenizer.json"))
    return reference


@pytest.mark.parametrize("kind", sorted(ROPE_SCALINGS))
def test_scaled_rope_and_sharded_weights_give_the_logits_of_transformers(tmp_path: Path, kind: str) -> None:
    reference = save_hf_llama(tmp_path, ROPE_SCALINGS[kind])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    (tmp_path / "stray.safetensors").write_bytes(b"not listed by the index, so never read")
    served = load_model(tmp_path)
    tokens = torch.randint(0, 300, (1, 150))  # far past the 16 positions the scaling starts from
    with torch.no_grad():
        torch.testing.assert_close(served.model(tokens), reference(tokens).logits, atol=1e-4, rtol=1e-4)
        want = reference.generate(tokens[:, :120], max_new_tokens=8, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
    engine = LLMEngine(served.model, EngineConfig(block_size=8, num_blocks=64, max_num_batched_tokens=48))
    got = engine.generate([tokens[0, :120].tolist()], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert got[0] == want[0, 120:].tolist()


def test_unknown_rope_scaling_and_missing_shards_are_refused_by_name(tmp_path: Path) -> None:
    save_hf_llama(tmp_path, None)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"rope_scaling": {"rope_type": "yarn", "factor": 4}}))
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    first_shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    first_shard.unlink()
    with pytest.raises(ValueError, match=first_shard.name):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="--dtype 'int4'"):
        load_model(tmp_path, dtype="int4")


def test_every_end_of_turn_id_a_config_lists_ends_a_request(tmp_path: Path) -> None:
    from aiinfra.serve.admission import Gate, ServerConfig
    from aiinfra.serve.async_engine import AsyncEngine
    from aiinfra.serve.protocol import CompletionRequest
    from aiinfra.serve.serving import OpenAIServing

    save_hf_llama(tmp_path, None, shard=False)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"eos_token_id": [0, 8, 9]}))  # as Llama 3.1's
    served = load_model(tmp_path)
    assert served.eos_token_id == 0 and served.other_eos_token_ids == (8, 9)
    engine = AsyncEngine(LLMEngine(served.model, EngineConfig(block_size=8, num_blocks=64)), served.tokenizer)
    serving = OpenAIServing(engine, served, Gate(engine, served, ServerConfig()))
    params = serving.sampling_params(CompletionRequest(prompt="x", stop_token_ids=[5]), 4, 0, 0)
    assert params.stop_token_ids == (5, 8, 9)
    ignoring = serving.sampling_params(CompletionRequest(prompt="x", ignore_eos=True), 4, 0, 0)
    assert ignoring.stop_token_ids == ()


def test_weights_load_in_the_checkpoints_dtype_or_the_one_asked(tmp_path: Path) -> None:
    reference = save_hf_llama(tmp_path, ROPE_SCALINGS["llama3"], torch.bfloat16, shard=False)
    served = load_model(tmp_path)
    assert {p.dtype for p in served.model.parameters()} == {torch.bfloat16}
    assert served.model.rope_cos.dtype == torch.float32
    as_fp32 = load_model(tmp_path, dtype="fp32")
    assert {p.dtype for p in as_fp32.model.parameters()} == {torch.float32}
    tokens = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        exact = reference.float()(tokens).logits
        torch.testing.assert_close(as_fp32.model(tokens), exact, atol=1e-4, rtol=1e-4)  # bf16 values, fp32 math
        assert (served.model(tokens).float() - exact).abs().max() < 0.1 * exact.std()
    engine = LLMEngine(served.model, EngineConfig(block_size=8, num_blocks=64))
    assert engine.runner.k_cache[0].dtype == torch.bfloat16
    assert len(engine.generate([tokens[0].tolist()], SamplingParams(max_tokens=4, ignore_eos=True))[0]) == 4
    assert {p.dtype for p in load_model(tmp_path, dtype="fp16").model.parameters()} == {torch.float16}


LLAMA31_STYLE_TEMPLATE = (
    "{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
    "{%- endif %}<|start_header_id|>system<|end_header_id|>\n\nToday Date: {{ date_string }}<|eot_id|>"
    "{%- for message in messages %}{%- if message['role'] not in ['user', 'assistant'] %}"
    "{{- raise_exception('roles must be user or assistant') }}{%- endif %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{%- endfor %}{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{%- endif %}"
)


def test_chat_template_helpers_render_as_transformers_renders_them() -> None:
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tiny_served_model().tokenizer,
                                                     bos_token="<|endoftext|>")
    messages = [{"role": "user", "content": " hello "}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "bye"}]
    ours = chat_template_environment().from_string(LLAMA31_STYLE_TEMPLATE).render(
        messages=messages, add_generation_prompt=True, bos_token="<|endoftext|>", eos_token="")
    theirs = tokenizer.apply_chat_template(messages, chat_template=LLAMA31_STYLE_TEMPLATE, tokenize=False,
                                           add_generation_prompt=True)
    assert ours == theirs and datetime.datetime.now().strftime("%Y") in ours
    with pytest.raises(Exception, match="roles must be user or assistant"):
        chat_template_environment().from_string(LLAMA31_STYLE_TEMPLATE).render(
            messages=[{"role": "tool", "content": "x"}], add_generation_prompt=True, bos_token="")
