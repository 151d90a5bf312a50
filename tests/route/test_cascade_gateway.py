"""The cascade through the gateway against two fake pools whose logprobs the test sets per prompt: requests for
"auto" answered by the small pool when it is confident and by the large one otherwise, in both modes, streamed and
not, completions and chat; the small pool down; and `aiinfra route calibrate` end to end, its threshold then holding
its target on held-out prompts sent through the gateway."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from typer.testing import CliRunner

from aiinfra.cli import app
from aiinfra.route.fleet import parse_fleet

from .conftest import gateway_in_thread
from .fake_backend import FakeBackend


def _probability(text: str) -> float:
    """Confident on prompts that say 'easy', unsure otherwise."""
    return 0.9 if "easy" in text else 0.1


@pytest.fixture
def pools() -> Iterator[tuple[FakeBackend, FakeBackend]]:
    small, large = FakeBackend().start(), FakeBackend().start()
    small.behaviour.word, small.behaviour.probability = "s", _probability
    try:
        yield small, large
    finally:
        small.stop()
        large.stop()


def fleet_tree(small: FakeBackend, large: FakeBackend, threshold: float = 0.5) -> dict:
    return {"gateway": {"health_interval_s": 60, "max_retries": 0},
            "backend": [{"name": "edge-0", "url": small.url, "model": "edge", "served_model": "tiny-2l"},
                        {"name": "cloud-0", "url": large.url, "model": "cloud"}],
            "cascade": [{"model": "auto", "small": "edge", "large": "cloud", "threshold": threshold},
                        {"model": "auto-prompt", "small": "edge", "large": "cloud", "mode": "prompt",
                         "threshold": threshold, "statistic": "mean"}]}


def _sse_text(body: str, chat: bool) -> str:
    text = ""
    for block in body.split("\n\n"):
        if not block.startswith("data: ") or block == "data: [DONE]":
            continue
        for choice in orjson.loads(block[6:])["choices"]:  # none in the usage chunk
            text += ((choice.get("delta") or {}).get("content") or "") if chat else (choice.get("text") or "")
    assert body.rstrip().endswith("data: [DONE]")
    return text


def test_generate_mode_keeps_confident_answers_and_escalates_the_rest(pools: tuple[FakeBackend, FakeBackend]) -> None:
    small, large = pools
    with gateway_in_thread(parse_fleet(fleet_tree(small, large))) as (url, _):
        easy = httpx.post(f"{url}/v1/completions", json={"model": "auto", "prompt": "an easy one", "max_tokens": 3})
        assert easy.status_code == 200
        assert easy.headers["x-aiinfra-cascade"] == "small" and easy.headers["x-aiinfra-cascade-model"] == "edge"
        assert easy.headers["x-aiinfra-cascade-reason"] == "confident"
        assert float(easy.headers["x-aiinfra-cascade-score"]) == pytest.approx(0.9)
        assert easy.headers["x-aiinfra-cascade-threshold"] == "0.5"
        assert easy.headers["x-aiinfra-backend"] == "edge-0"
        assert easy.json()["choices"][0]["text"] == "s0 s1 s2 "
        assert easy.json()["choices"][0]["logprobs"] is None  # asked for by the gateway, not by the client
        assert small.requests[-1]["logprobs"] == 0 and small.requests[-1]["model"] == "tiny-2l"
        assert not large.requests

        hard = httpx.post(f"{url}/v1/completions", json={"model": "auto", "prompt": "a hard one", "max_tokens": 3})
        assert hard.headers["x-aiinfra-cascade"] == "large" and hard.headers["x-aiinfra-cascade-model"] == "cloud"
        assert hard.headers["x-aiinfra-cascade-reason"] == "unconfident"
        assert float(hard.headers["x-aiinfra-cascade-score"]) == pytest.approx(0.1)
        assert hard.json()["choices"][0]["text"] == "w0 w1 w2 "
        assert len(small.requests) == 2 and len(large.requests) == 1  # the escalated request paid twice
        assert "logprobs" not in large.requests[0]  # the large pool gets the client's own request

        asked = httpx.post(f"{url}/v1/completions", json={"model": "auto", "prompt": "easy", "max_tokens": 2,
                                                          "logprobs": 1})
        assert asked.json()["choices"][0]["logprobs"]["tokens"] == ["s0 ", "s1 "]  # the client asked: kept

        chat = httpx.post(f"{url}/v1/chat/completions", json={
            "model": "auto", "messages": [{"role": "user", "content": "easy?"}], "max_tokens": 2})
        assert chat.headers["x-aiinfra-cascade"] == "small"
        assert chat.json()["choices"][0]["message"]["content"] == "s0 s1 "
        assert small.requests[-1]["logprobs"] is True and small.requests[-1]["top_logprobs"] == 0

        models = {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert models == {"edge", "cloud", "auto", "auto-prompt"}
        metrics = httpx.get(f"{url}/metrics").text
        assert 'aiinfra_route_cascade_decisions_total{model="auto",pool="large",reason="unconfident"} 1.0' in metrics


def test_generate_mode_streams_after_the_decision(pools: tuple[FakeBackend, FakeBackend]) -> None:
    small, large = pools
    with gateway_in_thread(parse_fleet(fleet_tree(small, large))) as (url, _):
        for prompt, pool, text in (("easy does it", "small", "s0 s1 s2 s3 "), ("hard", "large", "w0 w1 w2 w3 ")):
            body = {"model": "auto", "prompt": prompt, "max_tokens": 4, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
                streamed = response.read().decode()
                assert response.headers["x-aiinfra-cascade"] == pool
                assert response.headers["content-type"].startswith("text/event-stream")
            assert _sse_text(streamed, chat=False) == text
            assert small.requests[-1].get("stream") is None  # the small pool answered whole, then the decision
        assert large.requests[-1]["stream"] is True  # the escalated answer is relayed as the large pool streams it
        chat = {"model": "auto", "messages": [{"role": "user", "content": "easy"}], "max_tokens": 2, "stream": True,
                "stream_options": {"include_usage": True}}
        replayed = httpx.post(f"{url}/v1/chat/completions", json=chat).text
        assert _sse_text(replayed, chat=True) == "s0 s1 "
        assert '"usage"' in replayed


def test_prompt_mode_sends_each_request_to_exactly_one_pool(pools: tuple[FakeBackend, FakeBackend]) -> None:
    small, large = pools
    with gateway_in_thread(parse_fleet(fleet_tree(small, large))) as (url, _):
        easy = httpx.post(f"{url}/v1/completions", json={"model": "auto-prompt", "prompt": "easy words here",
                                                         "max_tokens": 3})
        assert easy.headers["x-aiinfra-cascade"] == "small" and easy.json()["choices"][0]["text"] == "s0 s1 s2 "
        scoring, answering = small.requests
        assert scoring["echo"] is True and scoring["max_tokens"] == 1 and scoring["logprobs"] == 0
        assert answering == {"model": "tiny-2l", "prompt": "easy words here", "max_tokens": 3}
        assert float(easy.headers["x-aiinfra-cascade-score"]) == pytest.approx(0.9)

        hard = httpx.post(f"{url}/v1/completions", json={"model": "auto-prompt", "prompt": "hard words",
                                                         "max_tokens": 3, "stream": True})
        assert hard.headers["x-aiinfra-cascade"] == "large" and _sse_text(hard.text, False) == "w0 w1 w2 "
        assert len(small.requests) == 3 and small.requests[-1]["echo"] is True  # only scored, never answered
        assert len(large.requests) == 1

        chat = httpx.post(f"{url}/v1/chat/completions", json={
            "model": "auto-prompt", "messages": [{"role": "user", "content": "hard"}], "max_tokens": 2})
        assert chat.headers["x-aiinfra-cascade"] == "large"
        assert small.requests[-1]["prompt"] == "hard"  # a chat is scored as its messages' text


def test_small_pool_down_escalates_and_client_errors_pass(pools: tuple[FakeBackend, FakeBackend]) -> None:
    small, large = pools
    with gateway_in_thread(parse_fleet(fleet_tree(small, large))) as (url, _):
        bad = httpx.post(f"{url}/v1/completions", json={"model": "auto", "prompt": "easy", "max_tokens": -1})
        assert bad.status_code == 400 and "max_tokens" in bad.json()["error"]["message"]
        small.behaviour.status = 503
        for model in ("auto", "auto-prompt"):
            response = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "easy", "max_tokens": 2})
            assert response.status_code == 200
            assert response.headers["x-aiinfra-cascade"] == "large"
            assert response.headers["x-aiinfra-cascade-reason"] == "small_unavailable"
            assert "x-aiinfra-cascade-score" not in response.headers
        small.behaviour.status = 400
        refused = httpx.post(f"{url}/v1/completions", json={"model": "auto", "prompt": "easy", "max_tokens": 2})
        assert refused.status_code == 400 and refused.headers["x-aiinfra-cascade-reason"] == "small_rejected"


def _spread(text: str) -> float:
    """A probability per prompt, spread over (0, 1) by a hash of its text."""
    return 0.02 + 0.96 * (zlib.crc32(text.encode()) % 10_000) / 10_000


def test_calibrate_command_hits_its_target_on_held_out_prompts(pools: tuple[FakeBackend, FakeBackend],
                                                               tmp_path: Path) -> None:
    small, large = pools
    small.behaviour.probability = _spread
    tree = fleet_tree(small, large)
    fleet = tmp_path / "FLEET.toml"
    lines = ["[gateway]", "health_interval_s = 60"]
    for backend in tree["backend"]:
        lines += ["[[backend]]", *(f"{key} = {json.dumps(value)}" for key, value in backend.items())]
    lines += ["[[cascade]]", *(f"{key} = {json.dumps(value)}" for key, value in tree["cascade"][0].items())]
    fleet.write_text("\n".join(lines) + "\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"calibration prompt {i}"}) + "\n" for i in range(300)))
    output = tmp_path / "cascade.toml"
    result = CliRunner().invoke(app, ["route", "calibrate", str(fleet), "--prompts", str(prompts),
                                      "--target-large-fraction", "0.3", "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert "held out (90 prompts): large fraction" in result.output
    threshold = float(output.read_text().split("threshold = ")[1].split()[0])
    assert output.read_text() in result.output and 'model = "auto"' in output.read_text()

    # New prompts through the gateway with that threshold: within 0.1 of the target (300 draws: 2.4 standard
    # errors of the held-out fraction).
    with gateway_in_thread(parse_fleet(fleet_tree(small, large, threshold))) as (url, _), httpx.Client() as client:
        pools_used = [client.post(f"{url}/v1/completions", json={"model": "auto", "prompt": f"new prompt {i}",
                                                                 "max_tokens": 2}).headers["x-aiinfra-cascade"]
                      for i in range(300)]
    assert abs(pools_used.count("large") / 300 - 0.3) <= 0.1

    missing = CliRunner().invoke(app, ["route", "calibrate", str(fleet), "--prompts", str(prompts),
                                       "--target-quality", "0.9"])
    assert missing.exit_code == 2 and 'needs a "reference"' in missing.output
    both = CliRunner().invoke(app, ["route", "calibrate", str(fleet), "--prompts", str(prompts)])
    assert both.exit_code == 2 and "exactly one of" in both.output
