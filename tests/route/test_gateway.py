"""`aiinfra route` in front of two real `aiinfra serve` backends, through the real `openai` client: completions,
chat and streaming equal the backend's own answers; models, keys, errors, metrics; a client that leaves mid-stream
frees the backend's request; several gateway processes on one port."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from .conftest import MODEL, Process, backend_process, free_ports, gateway_process

BACKEND_KEY = "sk-backend-secret-4242"
CLIENT_KEY = "sk-client-1"


@pytest.fixture(scope="module")
def fleet_processes(model_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Process]]:
    tmp = tmp_path_factory.mktemp("gateway")
    ports = free_ports(4)
    backends = [backend_process(model_folder, ports[i], tmp / f"b{i}.log", "--api-key", BACKEND_KEY)
                for i in range(2)]
    for backend in backends:
        backend.start()
    fleet = tmp / "fleet.toml"
    fleet.write_text(f"""
[gateway]
policy = "prefix"
health_interval_s = 0.5
api_keys = ["{CLIENT_KEY}"]

[[backend]]
name = "eu-a"
url = "{backends[0].url}"
model = "{MODEL}"
region = "eu"
api_key = "{BACKEND_KEY}"

[[backend]]
name = "us-a"
url = "{backends[1].url}"
model = "{MODEL}"
region = "us"
api_key_env = "TEST_BACKEND_KEY"

[[backend]]
name = "nowhere"
url = "http://127.0.0.1:{ports[3]}"
model = "other-model"
""")
    gateway = gateway_process(fleet, ports[2], tmp / "gateway.log")
    gateway.env = {"TEST_BACKEND_KEY": BACKEND_KEY}
    try:
        for backend in backends:
            backend.wait_healthy(path="/health")
        gateway.start().wait_healthy(path="/metrics")  # /health is 503: "other-model" has no backend
        yield {"gateway": gateway, "b0": backends[0], "b1": backends[1]}
    finally:
        for process in (gateway, *backends):
            process.stop()


def direct(backend: Process) -> OpenAI:
    return OpenAI(base_url=f"{backend.url}/v1", api_key=BACKEND_KEY, max_retries=0)


def test_openai_client_through_the_gateway_gets_the_backends_answers(fleet_processes) -> None:
    gateway = fleet_processes["gateway"]
    client = OpenAI(base_url=f"{gateway.url}/v1", api_key=CLIENT_KEY, max_retries=0)
    assert sorted(model.id for model in client.models.list()) == ["other-model", MODEL]
    reference = direct(fleet_processes["b0"])
    prompt = "def function_3(value):"
    want = reference.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert got.choices[0].text == want.choices[0].text and got.usage == want.usage
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.choices[0].text
    assert chunks[-1].usage.completion_tokens == want.usage.completion_tokens
    assert all(not hasattr(c.choices[0], "token_ids") or c.choices[0].token_ids is None  # the gateway's own ask
               for c in chunks if c.choices)

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    want_chat = reference.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    got_chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert got_chat.choices[0].message.content == want_chat.choices[0].message.content
    streamed = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                   stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == want_chat.choices[0].message.content
    several = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, n=2, temperature=1.0, seed=3)
    assert sorted(choice.index for choice in several.choices) == [0, 1]


def test_keys_errors_and_what_the_gateway_never_shows(fleet_processes) -> None:
    gateway = fleet_processes["gateway"]
    url = gateway.url
    auth = {"authorization": f"Bearer {CLIENT_KEY}"}
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Bearer {BACKEND_KEY}"}):
        response = httpx.post(f"{url}/v1/completions", json=body, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    response = httpx.post(f"{url}/v1/completions", json=body | {"model": "nope"}, headers=auth)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    response = httpx.post(f"{url}/v1/completions", content=b"{not json", headers=auth)
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    response = httpx.post(f"{url}/v1/completions", json=body | {"temperature": -1}, headers=auth)
    assert response.status_code == 400 and response.json()["error"]["param"] == "temperature"  # the backend's
    response = httpx.post(f"{url}/v1/completions", json=body | {"model": "other-model"}, headers=auth)
    assert response.status_code in (502, 503) and set(response.json()["error"]) >= {"message", "code"}
    health = httpx.get(f"{url}/health")
    assert health.status_code == 503 and health.json()["backends"]["nowhere"]["up"] is False
    metrics = httpx.get(f"{url}/metrics").text
    assert 'aiinfra_route_backend_up{backend="eu-a"} 1.0' in metrics
    assert 'aiinfra_route_backend_up{backend="nowhere"} 0.0' in metrics
    for text in (health.text, metrics, gateway.log.read_text(), response.text):
        assert BACKEND_KEY not in text and CLIENT_KEY not in text


def test_a_client_that_leaves_mid_stream_frees_the_backend(fleet_processes) -> None:
    gateway, backends = fleet_processes["gateway"], [fleet_processes["b0"], fleet_processes["b1"]]
    body = {"model": MODEL, "prompt": "def f", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body,
                      headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=30) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.monotonic() + 15
    while True:
        running = [httpx.get(f"{b.url}/health").json()["running"] for b in backends]
        outstanding = [v["outstanding"] for v in httpx.get(f"{gateway.url}/health").json()["backends"].values()]
        if running == [0, 0] and outstanding == [0, 0, 0]:
            break
        assert time.monotonic() < deadline, f"still running {running}, outstanding {outstanding}"
        time.sleep(0.05)


def test_several_gateway_processes_share_one_port(fleet_processes, tmp_path: Path) -> None:
    backend = fleet_processes["b0"]
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'[[backend]]\nname = "a"\nurl = "{backend.url}"\nmodel = "{MODEL}"\napi_key = "{BACKEND_KEY}"\n')
    port = free_ports(1)[0]
    gateway = gateway_process(fleet, port, tmp_path / "gateway.log", "--workers", "2").start()
    try:
        gateway.wait_healthy()
        client = OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
        texts = {client.completions.create(model=MODEL, prompt="def ", max_tokens=4, temperature=0).choices[0].text
                 for _ in range(8)}
        assert len(texts) == 1
    finally:
        gateway.stop()
    assert gateway.process is not None and gateway.process.returncode == 0, gateway.log.read_text()
