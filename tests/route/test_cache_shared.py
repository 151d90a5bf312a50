"""Two `aiinfra route` processes sharing their cache through Redis, and one restarted on its SQLite file: an
answer cached through one gateway is a hit through the other, and after the restart."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("hnswlib", reason="the cache extra is not installed (pip install 'aiinfra[cache]')")
pytest.importorskip("redis", reason="the cache extra is not installed (pip install 'aiinfra[cache]')")

from .conftest import MODEL, Process, free_ports, gateway_process  # noqa: E402
from .fake_backend import FakeBackend  # noqa: E402


@pytest.fixture
def fake() -> Iterator[FakeBackend]:
    backend = FakeBackend().start()
    yield backend
    backend.stop()


def write_fleet(path: Path, fake: FakeBackend, cache: str) -> Path:
    path.write_text(f"""
[gateway]
health_interval_s = 5

[cache]
enabled = true
speculative = false
{cache}

[[backend]]
name = "fake"
url = "{fake.url}"
model = "{MODEL}"
""")
    return path


def ask(url: str, content: str, stream: bool = False) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 5,
            "stream": stream}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


def eventually_hit(url: str, content: str, timeout_s: float = 10.0) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        response = ask(url, content)
        if response.headers["x-aiinfra-cache"] == "hit" or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def test_two_gateways_share_entries_through_redis(fake: FakeBackend, redis_url: str, tmp_path: Path,
                                                  processes: list[Process]) -> None:
    fleet = write_fleet(tmp_path / "fleet.toml", fake, f'redis_url = "{redis_url}"')
    ports = free_ports(2)
    first, second = (gateway_process(fleet, port, tmp_path / f"g{port}.log") for port in ports)
    processes += [first.start(), second.start()]
    first.wait_healthy(path="/health")
    second.wait_healthy(path="/health")
    assert ask(first.url, "How do I create a virtual environment in Python?").headers["x-aiinfra-cache"] == "miss"
    hit = eventually_hit(second.url, "How can I set up a Python virtual environment?")
    assert hit.headers["x-aiinfra-cache"] == "hit"
    assert hit.json()["choices"][0]["message"]["content"] == "w0 w1 w2 w3 w4 "
    assert len(fake.requests) == 1
    invalidated = httpx.post(f"{second.url}/admin/cache/invalidate", json={"prefix": "How do I create"}).json()
    assert invalidated == {"invalidated": 1}
    deadline = time.monotonic() + 10
    while ask(first.url, "How do I create a virtual environment in Python?").headers["x-aiinfra-cache"] == "hit":
        assert time.monotonic() < deadline, "the invalidation did not reach the other gateway"
        time.sleep(0.05)


def test_entries_survive_a_gateway_restart(fake: FakeBackend, tmp_path: Path, processes: list[Process]) -> None:
    fleet = write_fleet(tmp_path / "fleet.toml", fake, f'path = "{tmp_path / "cache.sqlite"}"')
    port = free_ports(1)[0]
    gateway = gateway_process(fleet, port, tmp_path / "gateway.log")
    processes.append(gateway.start())
    gateway.wait_healthy(path="/health")
    original = ask(gateway.url, "Why do cats purr?", stream=True)
    assert original.headers["x-aiinfra-cache"] == "miss"
    time.sleep(0.3)  # the disk write runs behind the answer
    gateway.stop()
    processes.append(gateway.start())
    gateway.wait_healthy(path="/health")
    replay = ask(gateway.url, "What is the reason cats purr?", stream=True)
    assert replay.headers["x-aiinfra-cache"] == "hit"
    assert "w0 " in replay.text and replay.text.endswith("data: [DONE]\n\n")
    assert len(fake.requests) == 1
