"""Hardening of the HTTP layer: admission counts every sequence, bounded stop lists, no exception text in a 500,
the API key from a file, O(1) aborts, and the Python floor that pyproject states."""

from __future__ import annotations

import ast
import logging
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from aiinfra.serve.api import ServerConfig
from aiinfra.serve.block_manager import BlockManager
from aiinfra.serve.commands import resolve_api_key
from aiinfra.serve.protocol import MAX_PROMPTS
from aiinfra.serve.request import Request, SamplingParams
from aiinfra.serve.scheduler import Scheduler

from .server import running_server, tiny_served_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server():
    with running_server(tiny_served_model(), server_config=ServerConfig(max_waiting_requests=8)) as running:
        yield running


def error_of(response: httpx.Response) -> dict:
    return response.json()["error"]


def test_a_request_with_10k_prompts_is_refused_and_prompts_times_n_are_counted(server) -> None:
    url = f"{server.base_url}/v1/completions"
    response = httpx.post(url, json={"prompt": [[5]] * 10_000, "max_tokens": 1}, timeout=30)
    assert response.status_code == 400 and error_of(response)["param"] == "prompt"
    assert str(MAX_PROMPTS) in error_of(response)["message"]
    # 64 running + 8 waiting: 40 prompts x n=2 = 80 sequences do not fit, though the request is one and n is 2.
    response = httpx.post(url, json={"prompt": ["def"] * 40, "n": 2, "max_tokens": 1}, timeout=30)
    assert response.status_code == 503 and error_of(response)["code"] == "queue_full"
    response = httpx.post(url, json={"prompt": ["def"] * 30, "n": 2, "max_tokens": 1}, timeout=60)
    assert response.status_code == 200 and len(response.json()["choices"]) == 60


@pytest.mark.parametrize("stop", [["x"] * 17, "y" * 257, ["ok", "z" * 300]])
def test_stop_strings_are_bounded_in_number_and_length(server, stop) -> None:
    response = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "x", "stop": stop}, timeout=30)
    assert response.status_code == 400 and error_of(response)["param"].startswith("stop")


def test_a_500_carries_a_request_id_and_no_exception_text(server, monkeypatch, caplog) -> None:
    async def broken(*args: object, **kwargs: object) -> AsyncIterator[None]:
        raise RuntimeError("secret internals /etc/passwd")
        yield

    monkeypatch.setattr(server.async_engine, "generate", broken)
    with caplog.at_level(logging.ERROR, logger="aiinfra.serve"):
        response = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "x"}, timeout=30)
        streamed = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "x", "stream": True}, timeout=30)
    assert response.status_code == 500 and error_of(response)["code"] == "internal_error"
    assert "secret" not in response.text and "RuntimeError" not in response.text
    request_id = response.headers["x-request-id"]
    assert request_id in error_of(response)["message"]
    assert "secret" not in streamed.text and '"internal_error"' in streamed.text
    assert any(request_id in record.getMessage() and record.exc_info for record in caplog.records)


def test_the_api_key_comes_from_a_file_or_the_option_never_both(tmp_path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sesame\n")
    assert resolve_api_key(None, key_file) == "sesame"
    assert resolve_api_key("open", None) == "open"
    assert resolve_api_key(None, None) is None
    with pytest.raises(ValueError, match="not both"):
        resolve_api_key("open", key_file)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        resolve_api_key(None, tmp_path / "empty")
    with pytest.raises(ValueError, match="cannot read"):
        resolve_api_key(None, tmp_path / "missing")


def test_aborting_many_waiting_requests_costs_o1_each() -> None:
    scheduler = Scheduler(BlockManager(64, 16, True), max_num_seqs=4, max_num_batched_tokens=64, max_seq_len=64)
    count = 50_000
    for index in range(count):
        scheduler.add(Request(f"r{index}", [1, 2, 3], SamplingParams(max_tokens=2)))
    for index in range(count - 1):  # a mass disconnect; with deque.remove this is quadratic (minutes)
        scheduler.finish(f"r{index}", "abort")
    # No abort searched the queue: every request is still in it, marked finished, until it reaches the front.
    assert len(scheduler.waiting) == count and scheduler.num_waiting == 1
    output = scheduler.schedule()
    assert [item.request_id for item in output.scheduled] == [f"r{count - 1}"]
    assert scheduler.num_waiting == 0 and not scheduler.waiting


PY311_ONLY = {("asyncio", "timeout"), ("asyncio", "TaskGroup"), ("asyncio", "Runner"), ("typing", "Self"),
              ("enum", "StrEnum"), ("datetime", "UTC")}


def test_the_sources_run_on_the_python_floor_pyproject_states() -> None:
    """requires-python says 3.10: the sources parse as 3.10 and use none of 3.11's library additions
    (tomllib only behind its tomli fallback)."""
    floor = re.search(r'requires-python = ">=3\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert floor is not None
    minor = int(floor.group(1))
    offenders = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        source = path.read_text()
        tree = ast.parse(source, feature_version=(3, minor))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if minor < 11 and (node.value.id, node.attr) in PY311_ONLY:
                    offenders.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module in {"asyncio", "typing", "enum", "datetime"}:
                offenders += [f"{path.name}:{node.lineno} {node.module}.{alias.name}" for alias in node.names
                              if minor < 11 and (node.module, alias.name) in PY311_ONLY]
            if isinstance(node, ast.Name) and node.id in {"ExceptionGroup", "BaseExceptionGroup"} and minor < 11:
                offenders.append(f"{path.name}:{node.lineno} {node.id}")
        if minor < 11 and "import tomllib" in source and "import tomli as tomllib" not in source:
            offenders.append(f"{path.name}: tomllib without the tomli fallback")
    assert not offenders, offenders


def test_a_stream_past_its_time_limit_ends_with_a_timeout_event() -> None:
    with running_server(tiny_served_model(max_seq_len=2048), server_config=ServerConfig(request_timeout_s=0.2)) as srv:
        body = {"prompt": "x", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{srv.base_url}/v1/completions", json=body, timeout=30) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and '"code": "timeout"' in lines[-2]
        deadline = time.monotonic() + 15
        while srv.engine.scheduler.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not srv.engine.scheduler.requests
