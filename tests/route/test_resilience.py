"""The gateway's failure paths against scriptable servers that are not ours: retries and ejection on 5xx, Retry-After
on 429, every backend overloaded, hedging a stalled backend, mid-stream continuation from text, a clean error event
when nothing can continue, and a client that leaves cancelling its backend request."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from aiinfra.route.fleet import parse_fleet

from .conftest import gateway_in_thread
from .fake_backend import Behaviour, FakeBackend

FULL = "".join(f"w{i} " for i in range(8))


@pytest.fixture
def fakes() -> Iterator[list[FakeBackend]]:
    started = [FakeBackend().start(), FakeBackend().start()]
    yield started
    for fake in started:
        fake.stop()


def fleet(fakes: list[FakeBackend], **gateway: object):
    return parse_fleet({
        "gateway": {"health_interval_s": 0.2, **gateway},
        "backend": [{"name": f"f{i}", "url": fake.url, "model": "m"} for i, fake in enumerate(fakes)],
    })


def complete(url: str, stream: bool = False, chat: bool = False, timeout: float = 30, **extra: object):
    body = {"model": "m", "max_tokens": 16, "stream": stream}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    body |= extra
    path = "/v1/chat/completions" if chat else "/v1/completions"
    return httpx.post(url + path, json=body, timeout=timeout)


def streamed_text(response: httpx.Response, chat: bool = False) -> tuple[str, list[dict]]:
    events = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert response.text.rstrip().endswith("data: [DONE]")
    key = (lambda c: c["choices"][0]["delta"].get("content", "")) if chat else (lambda c: c["choices"][0]["text"])
    return "".join(key(event) for event in events if event.get("choices")), events


def test_5xx_is_retried_elsewhere_and_the_failing_backend_is_ejected(fakes) -> None:
    fakes[0].behaviour = Behaviour(status=500)
    with gateway_in_thread(fleet(fakes, outlier={"consecutive_failures": 3, "base_ejection_s": 60})) as (url, gw):
        for _ in range(20):
            response = complete(url)
            assert response.status_code == 200 and response.json()["choices"][0]["text"] == FULL
        failing = gw.pools["m"][0]
        assert failing.outlier.ejections == 1 and failing.outlier.ejected(time.monotonic())
        assert len(fakes[0].requests) == 3  # ejected after three failures, never tried again
        assert failing.outstanding == 0 and gw.pools["m"][1].outstanding == 0


def test_a_pool_never_ejects_more_than_its_share(fakes) -> None:
    for fake in fakes:
        fake.behaviour = Behaviour(status=500)
    with gateway_in_thread(fleet(fakes, outlier={"consecutive_failures": 1, "max_ejected_fraction": 0.5})) as (url, gw):
        for _ in range(6):
            response = complete(url)
            assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_failed"
        now = time.monotonic()
        assert sum(b.outlier.ejected(now) for b in gw.pools["m"]) == 1


def test_429_retry_after_cools_the_backend_down_without_ejecting_it(fakes) -> None:
    fakes[0].behaviour = Behaviour(status=429, retry_after="30")
    with gateway_in_thread(fleet(fakes)) as (url, gw):
        for _ in range(10):
            assert complete(url).status_code == 200
        assert len(fakes[0].requests) == 1  # cooling down for 30 s after its 429
        assert gw.pools["m"][0].outlier.ejections == 0


def test_every_backend_overloaded_gives_the_client_503_with_retry_after(fakes) -> None:
    for fake in fakes:
        fake.behaviour = Behaviour(status=503, retry_after="2")
    with gateway_in_thread(fleet(fakes)) as (url, _):
        response = complete(url)
        assert response.status_code == 503 and response.headers["retry-after"] == "2"
        assert response.json()["error"]["code"] == "backend_overloaded"
        response = complete(url)  # both cooling down now: nothing to try
        assert response.status_code == 503 and response.json()["error"]["code"] == "no_backend_available"


def test_hedging_answers_from_another_backend_when_one_stalls(fakes) -> None:
    with gateway_in_thread(fleet(fakes, hedge=True, hedge_min_delay_ms=20, policy="round_robin")) as (url, gw):
        for _ in range(30):  # both fast: the pool learns its first-byte quantile
            assert complete(url, stream=True).status_code == 200
        fakes[0].behaviour = Behaviour(first_delay_s=5.0)
        started = time.monotonic()
        for _ in range(4):
            text, _ = streamed_text(complete(url, stream=True))
            assert text == FULL
        assert time.monotonic() - started < 5.0  # no request waited for the stalled backend
        hedges = sum(s.value for m in gw.metrics.hedges.collect() for s in m.samples if s.name.endswith("_total"))
        assert hedges >= 1
        deadline = time.monotonic() + 5
        while fakes[0].cancelled < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fakes[0].cancelled >= 1  # the losing copy was cancelled at the stalled backend


@pytest.mark.parametrize("chat", [False, True])
def test_a_stream_cut_mid_answer_continues_from_its_text_on_another_server(fakes, chat) -> None:
    fakes[0].behaviour = Behaviour(cut_after=3)
    with gateway_in_thread(fleet(fakes, policy="round_robin")) as (url, gw):
        for _ in range(4):
            response = complete(url, stream=True, chat=chat)
            assert response.status_code == 200
            text, events = streamed_text(response, chat)
            assert text == FULL
            assert {event["id"] for event in events} == {"fake"}
        cut = [body for body in fakes[1].requests if (body.get("prompt") or "").startswith("hiw0 ")
               or body.get("continue_final_message")]
        assert cut, "no continuation reached the second backend"
        failovers = gw.metrics.failovers.labels("mid_stream")._value.get()
        assert failovers >= 1


def test_a_stream_nothing_can_continue_ends_with_an_error_event_and_done(fakes) -> None:
    fakes[0].behaviour = fakes[1].behaviour = Behaviour(cut_after=2)
    with gateway_in_thread(fleet(fakes, max_retries=1)) as (url, _):
        response = complete(url, stream=True, timeout=10)
        lines = [line for line in response.text.splitlines() if line]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["code"] == "upstream_failed"


def test_a_client_that_leaves_cancels_its_backend_request(fakes) -> None:
    fakes[0].behaviour = fakes[1].behaviour = Behaviour(first_delay_s=10.0)
    with gateway_in_thread(fleet(fakes)) as (url, gw):
        with pytest.raises(httpx.ReadTimeout):
            complete(url, timeout=0.5)
        deadline = time.monotonic() + 5
        while sum(fake.cancelled for fake in fakes) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sum(fake.cancelled for fake in fakes) == 1
        assert all(b.outstanding == 0 for b in gw.pools["m"])


def test_a_large_body_in_many_packets_is_read_whole_and_an_oversized_one_refused(fakes) -> None:
    with gateway_in_thread(fleet(fakes, max_body_bytes=200_000)) as (url, _):
        prompt = "x " * 60_000  # 120 kB: many TCP packets
        response = complete(url, prompt=prompt)
        assert response.status_code == 200 and fakes[0].requests + fakes[1].requests
        assert (fakes[0].requests + fakes[1].requests)[-1]["prompt"] == prompt
        response = complete(url, prompt="x " * 150_000)
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
