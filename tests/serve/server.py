"""A tiny model and an in-process server on 127.0.0.1 and a free port, for the HTTP tests."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import torch
import uvicorn

from aiinfra.data.tokenizer import END_OF_TEXT, train_tokenizer
from aiinfra.models.llama import Transformer
from aiinfra.serve.api import ServerConfig, build_app
from aiinfra.serve.async_engine import AsyncEngine
from aiinfra.serve.engine import EngineConfig, LLMEngine
from aiinfra.serve.loading import DEFAULT_CHAT_TEMPLATE, ServedModel
from aiinfra.spec import ModelSpec

TEXTS = [f"def function_{i}(value):\n    return value * {i} + {i * 7}  # the answer\n" for i in range(200)]


def tiny_served_model(max_seq_len: int = 256) -> ServedModel:
    """A random-weight dim-64 model with a 300-entry byte-level tokenizer."""
    tokenizer = train_tokenizer(TEXTS, 300)
    torch.manual_seed(0)
    spec = ModelSpec(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=max_seq_len)
    return ServedModel("tiny", Transformer(spec).eval(), tokenizer, tokenizer.token_to_id(END_OF_TEXT),
                       DEFAULT_CHAT_TEMPLATE)


@dataclass
class RunningServer:
    base_url: str
    engine: LLMEngine
    async_engine: AsyncEngine


@contextmanager
def running_server(served: ServedModel, engine_config: EngineConfig | None = None,
                   server_config: ServerConfig | None = None) -> Iterator[RunningServer]:
    """Serve `served` from a background thread until the block exits."""
    engine = LLMEngine(served.model, engine_config or EngineConfig(block_size=8, num_blocks=256),
                       served.eos_token_id)
    async_engine = AsyncEngine(engine, served.tokenizer)
    app = build_app(async_engine, served, server_config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the test server did not start"
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", engine, async_engine)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def stream_events(url: str, body: dict, timeout_s: float = 60) -> list[dict]:
    """The JSON chunks of a streamed answer, checked to end with `data: [DONE]`."""
    with httpx.stream("POST", url, json=body, timeout=timeout_s) as response:
        assert response.status_code == 200, response.read()
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]
