"""Real processes on 127.0.0.1 for the gateway tests: a tiny Llama folder, `aiinfra serve` backends on it, and
`aiinfra route` in front of them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch

from aiinfra.checkpoint.export import write_hf_folder
from aiinfra.data.tokenizer import train_tokenizer
from aiinfra.models.llama import Transformer
from aiinfra.route.app import build_app
from aiinfra.route.fleet import FleetConfig
from aiinfra.route.gateway import Gateway
from aiinfra.spec import ModelSpec

MODEL = "tiny"


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight dim-64 Llama folder that `aiinfra serve` loads (the serve tests' tiny model)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    texts = [f"def function_{i}(value):\n    return value * {i} + {i * 7}  # the answer\n" for i in range(200)]
    torch.manual_seed(0)
    spec = ModelSpec(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=512)
    write_hf_folder(Transformer(spec), train_tokenizer(texts, 300), folder)
    return folder


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@dataclass
class Process:
    """A server process, its port and its log."""

    args: list[str]
    port: int
    log: Path
    process: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Process:
        self.process = subprocess.Popen(self.args, stdout=self.log.open("a"), stderr=subprocess.STDOUT,
                                        env=os.environ | self.env, start_new_session=True)
        return self

    def wait_healthy(self, timeout_s: float = 120.0, path: str = "/health") -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process is not None and self.process.poll() is None, self.log.read_text()
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{self.args} did not start: {self.log.read_text()}"
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the server and everything it started (an aiinfra server's engine process too)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def backend_process(folder: Path, port: int, log: Path, *extra: str) -> Process:
    args = [sys.executable, "-m", "aiinfra.serve", str(folder), "--port", str(port), "--threads", "1",
            "--served-model-name", MODEL, "--kv-cache-memory-mb", "16", *extra]
    return Process(args, port, log)


def gateway_process(fleet: Path, port: int, log: Path, *extra: str) -> Process:
    return Process([sys.executable, "-m", "aiinfra", "route", str(fleet), "--port", str(port), *extra], port, log)


def write_fleet(path: Path, backends: list[Process], gateway: str = "", **backend_keys: str) -> Path:
    """A FLEET.toml over the given backends (named b0, b1, ...)."""
    lines = ["[gateway]", gateway]
    for index, backend in enumerate(backends):
        lines += ["[[backend]]", f'name = "b{index}"', f'url = "{backend.url}"', f'model = "{MODEL}"',
                  *(f"{key} = {value}" for key, value in backend_keys.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Processes a test starts; all stopped at its end, whatever happens."""
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


@contextmanager
def gateway_in_thread(fleet: FleetConfig, gateway: Gateway | None = None) -> Iterator[tuple[str, Gateway]]:
    """`aiinfra route`'s application on a thread of its own (its own event loop), for tests that look inside."""
    from aiohttp import web

    gateway = gateway or Gateway(fleet, seed=0)
    app = build_app(fleet, gateway)
    loop = asyncio.new_event_loop()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    runner = web.AppRunner(app, handler_cancellation=True)

    async def start() -> None:
        await runner.setup()
        await web.SockSite(runner, sock).start()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", gateway
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A redis-server of its own on a free port (Debian's package; `.ci/run` installs it under CI)."""
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed (apt-get install -y redis-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    port = free_ports(1)[0]
    server = Process([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                      "--dir", str(tmp_path)], port, tmp_path / "redis.log").start()
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "redis.log").read_text()
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.stop()
