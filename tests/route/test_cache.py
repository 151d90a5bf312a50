"""The semantic cache through the gateway (a scriptable backend behind it): hits and misses, replayed streams,
partitions, bypasses, what is never cached, invalidation, metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

pytest.importorskip("hnswlib", reason="the cache extra is not installed (pip install 'aiinfra[cache]')")
pytest.importorskip("onnxruntime", reason="the cache extra is not installed (pip install 'aiinfra[cache]')")

from aiinfra.route.cache.embed import Encoder  # noqa: E402
from aiinfra.route.cache.semantic import SemanticCache  # noqa: E402
from aiinfra.route.fleet import parse_fleet  # noqa: E402

from .conftest import MODEL, gateway_in_thread  # noqa: E402
from .fake_backend import FakeBackend  # noqa: E402


@pytest.fixture(scope="session")
def encoder() -> Encoder:
    return Encoder()


@pytest.fixture
def fake() -> Iterator[FakeBackend]:
    backend = FakeBackend().start()
    yield backend
    backend.stop()


def fleet_for(fake: FakeBackend, **cache: object):
    table = {"enabled": True, "speculative": False} | cache  # requests counted at the backend are real misses
    return parse_fleet({"gateway": {"health_interval_s": 5}, "cache": table,
                        "backend": [{"name": "fake", "url": fake.url, "model": MODEL}]})


def cached_gateway(fleet, encoder: Encoder):
    from aiinfra.route.gateway import Gateway

    gateway = Gateway(fleet, seed=0)
    gateway.cache = SemanticCache(fleet.cache, gateway.metrics, encoder)
    return gateway_in_thread(fleet, gateway)


def ask(url: str, content: str, *, stream: bool = False, system: str | None = None, headers: dict | None = None,
        **params: object) -> httpx.Response:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 6, "stream": stream} | params
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30)


def streamed_text(response: httpx.Response) -> str:
    text = ""
    for line in response.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or ():
                text += (choice.get("delta") or {}).get("content") or ""
    return text


def test_miss_then_hit_for_a_paraphrase_and_never_for_an_opposite(fake: FakeBackend, encoder: Encoder) -> None:
    with cached_gateway(fleet_for(fake), encoder) as (url, _):
        first = ask(url, "How do I enable two-factor authentication on GitHub?")
        assert first.status_code == 200 and first.headers["x-aiinfra-cache"] == "miss"
        again = ask(url, "How do I enable two-factor authentication on GitHub?")
        assert again.headers["x-aiinfra-cache"] == "hit"
        assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
        paraphrase = ask(url, "How can I turn on two-factor authentication on GitHub?")
        assert paraphrase.headers["x-aiinfra-cache"] == "hit"
        opposite = ask(url, "How do I disable two-factor authentication on GitHub?")
        assert opposite.headers["x-aiinfra-cache"] == "miss"
        assert len(fake.requests) == 2
        metrics = httpx.get(f"{url}/metrics").text
        assert "aiinfra_route_cache_hits_total{match=\"exact\"} 1.0" in metrics
        assert "aiinfra_route_cache_guard_rejections_total" in metrics
        assert "aiinfra_route_cache_lookup_seconds_bucket" in metrics


def test_streamed_hit_replays_the_original_stream(fake: FakeBackend, encoder: Encoder) -> None:
    with cached_gateway(fleet_for(fake), encoder) as (url, _):
        original = ask(url, "What is the capital of France?", stream=True, stream_options={"include_usage": True})
        assert original.headers["x-aiinfra-cache"] == "miss"
        replay = ask(url, "Which city is the capital of France?", stream=True)
        assert replay.headers["x-aiinfra-cache"] == "hit"
        assert replay.headers["content-type"].startswith("text/event-stream")
        assert streamed_text(replay) == streamed_text(original) == "w0 w1 w2 w3 w4 w5 "
        assert replay.text.endswith("data: [DONE]\n\n")
        as_json = ask(url, "What is the capital of France?")  # a streamed answer also serves a plain request
        assert as_json.headers["x-aiinfra-cache"] == "hit"
        assert as_json.json()["choices"][0]["message"]["content"] == "w0 w1 w2 w3 w4 w5 "
        assert len(fake.requests) == 1


def test_partitions_by_system_prompt_sampling_and_conversation(fake: FakeBackend, encoder: Encoder) -> None:
    with cached_gateway(fleet_for(fake), encoder) as (url, _):
        assert ask(url, "Why is the sky blue?", system="Answer briefly.").headers["x-aiinfra-cache"] == "miss"
        assert ask(url, "Why is the sky blue?", system="Answer briefly.").headers["x-aiinfra-cache"] == "hit"
        assert ask(url, "Why is the sky blue?", system="Answer at length.").headers["x-aiinfra-cache"] == "miss"
        assert ask(url, "Why is the sky blue?", system="Answer briefly.", max_tokens=5).headers[
            "x-aiinfra-cache"] == "miss"
        assert ask(url, "Why is the sky blue?", system="Answer briefly.", top_p=0.5).headers[
            "x-aiinfra-cache"] == "miss"
        history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                   {"role": "user", "content": "Why is the sky blue?"}]
        body = {"model": MODEL, "messages": history, "temperature": 0, "max_tokens": 6}
        turn = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert turn.headers["x-aiinfra-cache"] == "miss"
        assert len(fake.requests) == 5


def test_bypasses_and_cache_control(fake: FakeBackend, encoder: Encoder) -> None:
    with cached_gateway(fleet_for(fake), encoder) as (url, _):
        assert ask(url, "Tell me a joke", temperature=0.7).headers["x-aiinfra-cache"] == "bypass"
        assert ask(url, "Tell me a joke", temperature=0.7).headers["x-aiinfra-cache"] == "bypass"
        assert ask(url, "Tell me a joke", temperature=0.7, headers={"x-aiinfra-cache": "use"}).headers[
            "x-aiinfra-cache"] == "miss"
        assert ask(url, "Tell me a joke", temperature=0.7, headers={"x-aiinfra-cache": "use"}).headers[
            "x-aiinfra-cache"] == "hit"
        assert ask(url, "How do I boil an egg?", headers={"cache-control": "no-store"}).headers[
            "x-aiinfra-cache"] == "miss"
        assert ask(url, "How do I boil an egg?").headers["x-aiinfra-cache"] == "miss"  # not stored before
        assert ask(url, "How do I boil an egg?", headers={"cache-control": "no-cache"}).headers[
            "x-aiinfra-cache"] == "bypass"
        assert ask(url, "How do I boil an egg?").headers["x-aiinfra-cache"] == "hit"
        assert len(fake.requests) == 6


def test_errors_and_cut_streams_are_never_cached(fake: FakeBackend, encoder: Encoder) -> None:
    with cached_gateway(fleet_for(fake), encoder) as (url, gateway):
        fake.behaviour.status = 400
        assert ask(url, "What is inflation?").status_code == 400
        fake.behaviour.status = 200
        fake.behaviour.cut_after = 2
        cut = ask(url, "What is inflation?", stream=True)
        assert '"error"' in cut.text
        fake.behaviour.cut_after = None
        assert len(gateway.cache.store) == 0
        assert ask(url, "What is inflation?").headers["x-aiinfra-cache"] == "miss"
        assert len(gateway.cache.store) == 1


def test_admin_invalidation_by_key_and_prefix(fake: FakeBackend, encoder: Encoder) -> None:
    with cached_gateway(fleet_for(fake), encoder) as (url, _):
        key = ask(url, "What is the price of gold?").headers["x-aiinfra-cache-key"]
        ask(url, "What is the price of silver?")
        ask(url, "Who painted the Mona Lisa?")
        invalidate = f"{url}/admin/cache/invalidate"
        assert httpx.post(invalidate, json={"key": key}).json() == {"invalidated": 1}
        assert ask(url, "What is the price of gold?").headers["x-aiinfra-cache"] == "miss"
        assert httpx.post(invalidate, json={"prefix": "What is the price of"}).json() == {"invalidated": 2}
        assert ask(url, "What is the price of silver?").headers["x-aiinfra-cache"] == "miss"
        assert ask(url, "Who painted the Mona Lisa?").headers["x-aiinfra-cache"] == "hit"
        assert httpx.post(invalidate, json={}).status_code == 400


def test_a_speculative_request_is_cancelled_by_a_hit(fake: FakeBackend, encoder: Encoder) -> None:
    with cached_gateway(fleet_for(fake, speculative=True, speculative_after_ms=0), encoder) as (url, _):
        assert ask(url, "How do I exit vim?").headers["x-aiinfra-cache"] == "miss"
        fake.behaviour.first_delay_s = 5.0
        started = time.monotonic()
        assert ask(url, "How can I quit the vim editor?").headers["x-aiinfra-cache"] == "hit"
        assert time.monotonic() - started < 2.0
        deadline = time.monotonic() + 5
        while fake.cancelled < 1:  # the copy sent while the lookup ran was cancelled at the backend
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_a_speculative_lookup_that_answers_within_its_delay_sends_nothing(fake: FakeBackend,
                                                                           encoder: Encoder) -> None:
    # A delay no lookup reaches: a hit never dispatches, a miss waits for its lookup and then goes out once.
    with cached_gateway(fleet_for(fake, speculative=True, speculative_after_ms=1000), encoder) as (url, _):
        assert ask(url, "How do I exit vim?").headers["x-aiinfra-cache"] == "miss"
        assert len(fake.requests) == 1
        assert ask(url, "How can I quit the vim editor?").headers["x-aiinfra-cache"] == "hit"
        assert ask(url, "How do I exit vim?").headers["x-aiinfra-cache"] == "hit"
        assert len(fake.requests) == 1 and fake.cancelled == 0
