"""The OpenAI sampling fields against their references: logprobs are the log-softmax of the model's own logits,
each penalty and logit_bias follow their formulas, and a seed reproduces a sample whatever else is running."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from aiinfra.data.tokenizer import encode
from aiinfra.serve.engine import EngineConfig, LLMEngine
from aiinfra.serve.loading import ServedModel
from aiinfra.serve.request import SamplingParams

from .server import stream_events

PROMPT = "def function_3(value):"


@torch.inference_mode()
def reference_logprobs(served: ServedModel, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab): row p is log P(next token | ids[: p + 1]) by a plain full forward pass."""
    return served.model(torch.tensor([ids]))[0].float().log_softmax(dim=-1)


def test_completion_logprobs_and_echo_scoring_equal_the_log_softmax_of_the_logits(server, served) -> None:
    url = f"{server.base_url}/v1/completions"
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 5, "echo": True,
            "return_token_ids": True, "ignore_eos": True}
    choice = httpx.post(url, json=body, timeout=60).json()["choices"][0]
    prompt_ids = served.tokenizer.encode(PROMPT, add_special_tokens=False).ids
    ids = prompt_ids + choice["token_ids"]
    reference = reference_logprobs(served, ids)
    block = choice["logprobs"]
    texts = [served.tokenizer.decode([token], skip_special_tokens=False) for token in range(300)]
    assert len(block["tokens"]) == len(ids) and block["token_logprobs"][0] is None
    assert block["top_logprobs"][0] is None
    for position in range(1, len(ids)):
        expected = reference[position - 1, ids[position]].item()
        assert abs(block["token_logprobs"][position] - expected) < 1e-5
        best = reference[position - 1].topk(5).indices.tolist() + [ids[position]]
        # Keyed by text, as OpenAI's legacy format is: ids with the same text share a key (the chat test checks
        # the ranked list exactly).
        for key, value in block["top_logprobs"][position].items():
            assert any(texts[token] == key and abs(reference[position - 1, token].item() - value) < 1e-5
                       for token in best)
    assert block["text_offset"][0] == 0 and choice["text"].startswith(PROMPT)
    assert "".join(block["tokens"]) == choice["text"]
    assert block["text_offset"][-1] == len(choice["text"]) - len(block["tokens"][-1])

    streamed = stream_events(url, body | {"stream": True})
    tokens = [t for chunk in streamed for t in (chunk["choices"][0]["logprobs"] or {}).get("tokens", [])]
    values = [v for chunk in streamed for v in (chunk["choices"][0]["logprobs"] or {}).get("token_logprobs", [])]
    assert tokens == block["tokens"]
    assert values[0] is None and max(abs(a - b) for a, b in zip(values[1:], block["token_logprobs"][1:])) < 1e-6
    assert "".join(chunk["choices"][0]["text"] for chunk in streamed) == choice["text"]


def test_chat_logprobs_streamed_and_whole_equal_the_log_softmax_of_the_logits(server, served) -> None:
    url = f"{server.base_url}/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0,
            "logprobs": True, "top_logprobs": 3, "return_token_ids": True, "ignore_eos": True}
    whole = httpx.post(url, json=body, timeout=60).json()
    choice = whole["choices"][0]
    content = choice["logprobs"]["content"]
    generated = choice["token_ids"]
    assert len(content) == len(generated) == whole["usage"]["completion_tokens"]
    prompt_len = whole["usage"]["prompt_tokens"]

    rendered = "<|user|>\nhello\n<|assistant|>\n"
    prompt_ids = encode(served.tokenizer, rendered)
    assert len(prompt_ids) == prompt_len
    reference = reference_logprobs(served, prompt_ids + generated)
    for offset, (entry, token) in enumerate(zip(content, generated)):
        row = reference[prompt_len - 1 + offset]
        assert abs(entry["logprob"] - row[token].item()) < 1e-5
        assert len(entry["top_logprobs"]) == 3
        best = row.topk(3)
        assert [e["logprob"] for e in entry["top_logprobs"]] == pytest.approx(best.values.tolist(), abs=1e-5)
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][-1]["logprob"]
    streamed = stream_events(url, body | {"stream": True})
    streamed_content = [e for chunk in streamed for e in ((chunk["choices"][0].get("logprobs") or {}).get("content")
                                                           or [])]
    assert [e["token"] for e in streamed_content] == [e["token"] for e in content]
    top_only = httpx.post(url, json=body | {"logprobs": False}, timeout=60)
    assert top_only.status_code == 400 and top_only.json()["error"]["param"] == "top_logprobs"


def greedy_reference(served: ServedModel, prompt: list[int], steps: int, adjust) -> list[int]:
    """Greedy decoding by full forward passes, with `adjust(logits, prompt, output)` applied to each step's logits."""
    output: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = served.model(torch.tensor([prompt + output]))[0, -1].float()
            output.append(int(adjust(logits.clone(), prompt, output).argmax()))
    return output


def repetition(penalty: float):
    def adjust(logits: torch.Tensor, prompt: list[int], output: list[int]) -> torch.Tensor:
        for token in set(prompt + output):  # CTRL (Keskar et al. 2019), as HF's RepetitionPenaltyLogitsProcessor
            logits[token] = logits[token] / penalty if logits[token] > 0 else logits[token] * penalty
        return logits
    return adjust


def openai_penalties(presence: float, frequency: float):
    def adjust(logits: torch.Tensor, prompt: list[int], output: list[int]) -> torch.Tensor:
        for token in set(output):  # OpenAI: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
            logits[token] -= output.count(token) * frequency + presence
        return logits
    return adjust


def biased(bias: dict[int, float]):
    def adjust(logits: torch.Tensor, prompt: list[int], output: list[int]) -> torch.Tensor:
        for token, value in bias.items():
            logits[token] += value
        return logits
    return adjust


@pytest.mark.parametrize(("fields", "adjust"), [
    ({"repetition_penalty": 1.8}, repetition(1.8)),
    ({"repetition_penalty": 0.6}, repetition(0.6)),
    ({"presence_penalty": 1.5}, openai_penalties(1.5, 0.0)),
    ({"frequency_penalty": 0.7}, openai_penalties(0.0, 0.7)),
    ({"presence_penalty": -0.5, "frequency_penalty": 1.2}, openai_penalties(-0.5, 1.2)),
    ({"logit_bias": ((7, 5.0), (42, 3.5), (9, -100.0))}, biased({7: 5.0, 42: 3.5, 9: -100.0})),
])
def test_each_penalty_follows_its_reference_formula(served, fields, adjust) -> None:
    engine = LLMEngine(served.model, EngineConfig(block_size=4, num_blocks=64, max_num_batched_tokens=5),
                       served.eos_token_id)  # chunked prefill and prefix caching on the way
    prompt = served.tokenizer.encode(PROMPT, add_special_tokens=False).ids
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, **fields)
    plain = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    outputs = engine.generate([prompt, prompt, prompt[:5]], [params, plain, params])
    assert outputs[0] == greedy_reference(served, prompt, 32, adjust)
    assert outputs[2] == greedy_reference(served, prompt[:5], 32, adjust)
    assert outputs[1] == greedy_reference(served, prompt, 32, lambda logits, *_: logits)
    assert outputs[0] != outputs[1]  # the penalty changed something, so the comparison above means something


def test_a_seed_reproduces_a_sample_whatever_else_runs(server) -> None:
    url = f"{server.base_url}/v1/completions"
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 1.0, "seed": 1234, "ignore_eos": True,
            "return_token_ids": True}

    async def alone_and_in_company() -> tuple[list[int], list[list[int]]]:
        async with httpx.AsyncClient(timeout=60) as http:
            alone = (await http.post(url, json=body)).json()["choices"][0]["token_ids"]
            others = [{"prompt": f"def function_{i}(x):", "max_tokens": 16, "temperature": 1.0} for i in range(6)]
            responses = await asyncio.gather(*(http.post(url, json=other) for other in others),
                                             http.post(url, json=body), http.post(url, json=body | {"seed": 99}))
            return alone, [r.json()["choices"][0].get("token_ids", []) for r in responses[-2:]]

    alone, (again, other_seed) = asyncio.run(alone_and_in_company())
    assert alone == again and len(alone) == 16
    assert other_seed != alone
    several = httpx.post(url, json=body | {"n": 3}, timeout=60).json()["choices"]
    assert several[0]["token_ids"] == alone and several[1]["token_ids"] != alone  # sample i uses seed + i


@pytest.mark.parametrize(("field", "value"), [
    ("best_of", 3), ("use_beam_search", True), ("min_p", 0.1), ("typical_p", 0.5), ("response_format",
    {"type": "json_object"}), ("guided_json", {"type": "object"}), ("tools", [{"type": "function"}]),
    ("suffix", "end"), ("prompt_logprobs", 1),
])
def test_sampling_fields_that_are_not_implemented_are_refused_by_name(server, field, value) -> None:
    response = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "x", field: value}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field and field in response.json()["error"]["message"]
    neutral = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "x", "max_tokens": 2, "best_of": 1,
                                                                   "response_format": {"type": "text"}}, timeout=30)
    assert neutral.status_code == 200
