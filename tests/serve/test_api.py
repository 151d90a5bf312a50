"""The HTTP API: the real `openai` client, error envelopes and status codes, admission control, metrics, and
200 concurrent streaming clients with random disconnects."""

import asyncio
import json
import random
import time

import httpx
import pytest
from openai import OpenAI

from aiinfra.models.sampling import sample
from aiinfra.serve.api import ServerConfig
from aiinfra.serve.engine import EngineConfig

from .server import RunningServer, running_server, stream_events, tiny_served_model


def wait_until_idle(server: RunningServer, timeout_s: float = 15.0) -> None:
    """Bounded wait for every request to leave the engine."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.engine.scheduler.requests and server.engine.block_manager.usage == 0.0:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine still busy: {len(server.engine.scheduler.requests)} requests")


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_openai_client_completions_chat_and_streaming(server, served) -> None:
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    assert [model.id for model in client.models.list()] == ["tiny"]

    prompt = "def function_3(value):"
    prompt_ids = served.tokenizer.encode(prompt, add_special_tokens=False).ids
    expected_ids = sample(served.model, prompt_ids, 12, temperature=0, stop_id=served.eos_token_id)
    completion = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert completion.choices[0].text == served.tokenizer.decode(expected_ids)
    assert completion.usage.prompt_tokens == len(prompt_ids)
    assert completion.usage.completion_tokens == len(expected_ids)

    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected_ids)

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens <= 8
    chat_stream = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        max_tokens=8, temperature=0, stream=True))
    assert chat_stream[0].choices[0].delta.role == "assistant"
    assert chat_stream[-1].choices[0].finish_reason in ("stop", "length")

    several = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, n=3, temperature=1.0, seed=1)
    assert sorted(choice.index for choice in several.choices) == [0, 1, 2]


def test_sse_ends_with_done_and_vendor_fields_are_accepted(server) -> None:
    body = {"prompt": "def ", "max_tokens": 5, "stream": True, "ignore_eos": True, "repetition_penalty": 1.1,
            "min_tokens": 2, "priority": 0, "top_k": -1}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_stop_strings_cut_the_text(server, served) -> None:
    prompt = "def function_3(value):"
    full = httpx.post(f"{server.base_url}/v1/completions", timeout=30,
                      json={"prompt": prompt, "max_tokens": 20, "temperature": 0, "ignore_eos": True}).json()
    text = full["choices"][0]["text"]
    stop = text[5:7]
    cut = httpx.post(f"{server.base_url}/v1/completions", timeout=30,
                     json={"prompt": prompt, "max_tokens": 20, "temperature": 0, "stop": [stop]}).json()
    assert cut["choices"][0]["text"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    wait_until_idle(server)


@pytest.mark.parametrize("kind", ["completions", "chat"])
@pytest.mark.parametrize("stop", [None, ["_3("]])
def test_a_continuation_resumes_a_stream_exactly_where_it_was_cut(server, kind, stop) -> None:
    """What the gateway sends on mid-stream failover: the same request plus the token ids it has seen and how much
    text it has passed on; the two halves together equal the uncut answer, text, token ids and usage alike."""
    url = f"{server.base_url}/v1/{'completions' if kind == 'completions' else 'chat/completions'}"
    body: dict = {"max_tokens": 24, "temperature": 0, "stream": True, "return_token_ids": True, "stop": stop,
                  "stream_options": {"include_usage": True}}
    body |= {"prompt": "def function_3(value):"} if kind == "completions" else {
        "messages": [{"role": "user", "content": "def function_3(value):"}]}

    def text_of(chunk: dict) -> str:
        choice = chunk["choices"][0]
        return choice["text"] if kind == "completions" else choice["delta"].get("content", "")

    whole = stream_events(url, body)
    answer_chunks = [chunk for chunk in whole if chunk["choices"]]
    full_text = "".join(text_of(chunk) for chunk in answer_chunks)
    full_ids = [token for chunk in answer_chunks for token in chunk["choices"][0]["token_ids"]]
    assert len(full_ids) == whole[-1]["usage"]["completion_tokens"] and full_text
    for cut in (1, len(answer_chunks) // 2, len(answer_chunks) - 1):
        seen = answer_chunks[:cut]
        ids = [token for chunk in seen for token in chunk["choices"][0]["token_ids"]]
        if not ids:
            continue
        sent = "".join(text_of(chunk) for chunk in seen)
        rest = stream_events(url, body | {"continuation": {"output_token_ids": ids, "emitted_chars": len(sent)}})
        rest_chunks = [chunk for chunk in rest if chunk["choices"]]
        assert sent + "".join(text_of(chunk) for chunk in rest_chunks) == full_text
        assert ids + [token for chunk in rest_chunks for token in chunk["choices"][0]["token_ids"]] == full_ids
        assert rest_chunks[-1]["choices"][0]["finish_reason"] == answer_chunks[-1]["choices"][0]["finish_reason"]
        assert rest[-1]["usage"] == whole[-1]["usage"]
    too_long = httpx.post(url, json=body | {"stream": False, "continuation": {"output_token_ids": [1] * 24}})
    assert too_long.status_code == 400 and error_of(too_long)["param"] == "continuation"
    wait_until_idle(server)


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"prompt": "x", "max_tokens": 1000}, 400, "context_length_exceeded", "max_tokens"),
        ({"prompt": "x " * 300}, 400, "context_length_exceeded", "prompt"),
        ({"prompt": "x", "temperature": -1}, 400, None, "temperature"),
        ({"prompt": "x", "n": 0}, 400, None, "n"),
        ({"prompt": "x", "top_p": 0}, 400, None, "top_p"),
        ({"prompt": "x", "max_tokens": 0}, 400, None, "max_tokens"),
        ({"max_tokens": 3}, 400, None, "prompt"),
        ({"prompt": [100000]}, 400, None, "prompt"),
        ({"prompt": "x", "logprobs": 21}, 400, None, "logprobs"),
        ({"prompt": "x", "best_of": 2}, 400, "unsupported_parameter", "best_of"),
        ({"prompt": "x", "logit_bias": {"300": 1}}, 400, None, "logit_bias"),
        ({"prompt": "x", "model": "other"}, 404, "model_not_found", "model"),
    ],
)
def test_bad_completion_requests_get_an_openai_error_envelope(server, body, status, code, param) -> None:
    response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=30)
    assert response.status_code == status
    error = error_of(response)
    assert error["code"] == code and error["param"] == param


def test_bad_chat_and_malformed_bodies(server) -> None:
    url = f"{server.base_url}/v1/chat/completions"
    assert httpx.post(url, json={"messages": []}, timeout=30).status_code == 400
    assert error_of(httpx.post(url, json={"messages": [{"role": "wizard", "content": "x"}]}, timeout=30))
    response = httpx.post(url, content=b"{not json", timeout=30)
    assert response.status_code == 400 and "JSON" in error_of(response)["message"]
    response = httpx.post(url, json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000})
    assert response.status_code == 400 and error_of(response)["code"] == "context_length_exceeded"
    assert httpx.get(f"{server.base_url}/v1/nothing-here", timeout=30).status_code == 404


def test_body_limit_api_key_queue_limits_and_timeout(served) -> None:
    config = ServerConfig(api_key="sesame", max_body_bytes=2000, max_waiting_requests=1, max_waiting_tokens=40)
    long_context = tiny_served_model(max_seq_len=2048)
    with running_server(long_context, EngineConfig(block_size=8, num_blocks=256, max_num_seqs=1), config) as server:
        url = f"{server.base_url}/v1/completions"
        auth = {"Authorization": "Bearer sesame"}
        response = httpx.post(url, json={"prompt": "x"}, timeout=30)
        assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"
        assert httpx.post(url, json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{server.base_url}/v1/models", timeout=30).status_code == 401
        response = httpx.post(url, json={"prompt": "x" * 5000}, headers=auth, timeout=30)
        assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"
        # Queued prompt tokens over the bound: refused before it runs.
        response = httpx.post(url, json={"prompt": " ".join(["value"] * 60), "max_tokens": 4}, headers=auth)
        assert response.status_code == 503 and response.headers["retry-after"] == "1"

        # One running request and one waiting fill the queue; the third is refused at once. The first two are
        # long (the model's context is 2048) so that they are surely still there when the third arrives.
        long_body = {"prompt": "def", "max_tokens": 2000, "ignore_eos": True, "stream": True}

        async def fill_then_refuse() -> httpx.Response:
            async with httpx.AsyncClient(base_url=server.base_url, headers=auth, timeout=30) as http:

                async def hold() -> None:
                    async with http.stream("POST", "/v1/completions", json=long_body) as response:
                        async for _ in response.aiter_lines():
                            pass

                holders = [asyncio.create_task(hold()) for _ in range(2)]
                for _ in range(500):
                    if len(server.engine.scheduler.requests) == 2:
                        break
                    await asyncio.sleep(0.01)
                refused = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
                for holder in holders:
                    holder.cancel()
                await asyncio.gather(*holders, return_exceptions=True)
                return refused

        refused = asyncio.run(fill_then_refuse())
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1" and error_of(refused)["code"] == "queue_full"
        wait_until_idle(server)
        assert httpx.post(url, json={"prompt": "x", "max_tokens": 2}, headers=auth, timeout=30).status_code == 200
        metrics = httpx.get(f"{server.base_url}/metrics", timeout=30).text
        assert 'aiinfra_serve_requests_rejected_total{reason="queue_full_requests"} 1.0' in metrics
        assert 'aiinfra_serve_requests_rejected_total{reason="queue_full_tokens"} 1.0' in metrics
        assert 'aiinfra_serve_requests_rejected_total{reason="unauthorized"} 3.0' in metrics

    with running_server(served, server_config=ServerConfig(request_timeout_s=0.001)) as server:
        response = httpx.post(f"{server.base_url}/v1/completions", timeout=30,
                              json={"prompt": "x", "max_tokens": 200, "ignore_eos": True})
        assert response.status_code == 504 and error_of(response)["code"] == "timeout"
        wait_until_idle(server)


def test_metrics_and_health(server) -> None:
    httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "def", "max_tokens": 4, "ignore_eos": True},
               timeout=30)
    assert httpx.get(f"{server.base_url}/health", timeout=30).json()["status"] == "ok"
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    for name in (
        "aiinfra_serve_requests_running", "aiinfra_serve_requests_waiting", "aiinfra_serve_kv_cache_usage_ratio",
        "aiinfra_serve_time_to_first_token_seconds_bucket", "aiinfra_serve_inter_token_latency_seconds_bucket",
        "aiinfra_serve_e2e_request_latency_seconds_bucket", "aiinfra_serve_prompt_tokens_total",
        "aiinfra_serve_generation_tokens_total", "aiinfra_serve_preemptions_total",
    ):
        assert name in text
    generated = next(line for line in text.splitlines() if line.startswith("aiinfra_serve_generation_tokens_total"))
    assert float(generated.split()[-1]) >= 4


def test_non_streaming_client_disconnect_frees_its_blocks() -> None:
    # A 2000-token request takes seconds here: the client surely leaves while it runs.
    with running_server(tiny_served_model(max_seq_len=2048)) as server:
        body = {"prompt": "def", "max_tokens": 2000, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=0.3)
        wait_until_idle(server)
        metrics = httpx.get(f"{server.base_url}/metrics", timeout=30).text
        assert 'aiinfra_serve_requests_finished_total{finish_reason="abort"} 1.0' in metrics


def test_200_streaming_clients_with_random_disconnects_leak_no_blocks(served) -> None:
    engine_config = EngineConfig(block_size=8, num_blocks=400, max_num_seqs=64)
    with running_server(served, engine_config) as server:
        rng = random.Random(0)
        plans = [(rng.randint(2, 12), rng.random() < 0.5, rng.randint(1, 4)) for _ in range(200)]

        async def client(index: int, http: httpx.AsyncClient) -> str:
            max_tokens, disconnects, after_chunks = plans[index]
            body = {"prompt": f"def function_{index}(value):", "max_tokens": max_tokens, "ignore_eos": True,
                    "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    return f"status {response.status_code}"
                seen = 0
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        seen += 1
                        if disconnects and seen >= after_chunks:
                            return "disconnected"
                        if line == "data: [DONE]":
                            return "done"
            return "ended without [DONE]"

        async def main() -> list[str]:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as http:
                return await asyncio.gather(*(client(i, http) for i in range(200)))

        outcomes = asyncio.run(main())
        assert set(outcomes) <= {"done", "disconnected"}
        assert outcomes.count("done") > 50 and outcomes.count("disconnected") > 50
        wait_until_idle(server)
        assert server.engine.block_manager.num_free_blocks == server.engine.num_blocks
        # Still serving.
        after = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "def", "max_tokens": 3}, timeout=30)
        assert after.status_code == 200
