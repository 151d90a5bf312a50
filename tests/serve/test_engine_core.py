"""The engine in a process of its own: same outputs as in-process, clean errors, a dead child fails requests
instead of hanging them, and `aiinfra serve` (which uses it by default) answers over HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from aiinfra.serve.async_engine import AsyncEngine
from aiinfra.serve.commands import parse_cpu_list
from aiinfra.serve.engine import EngineConfig, LLMEngine
from aiinfra.serve.engine_core import EngineDeadError, EngineRecipe, ProcessEngineCore
from aiinfra.serve.loading import load_model
from aiinfra.serve.request import SamplingParams

ENGINE_CONFIG = EngineConfig(block_size=4, num_blocks=128, max_num_seqs=8)
PROMPTS = ["def function_3(value):", "    return value", "# the answer is"]


async def complete_all(engine: AsyncEngine, prompts: list[list[int]], max_tokens: int) -> list[tuple[str, int]]:
    """Run the prompts concurrently; (text, output tokens) of each."""

    async def one(index: int, prompt: list[int]) -> tuple[str, int]:
        text, count = "", 0
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        async for delta in engine.generate(f"r{index}", prompt, params):
            text, count = text + delta.text, delta.num_output_tokens
        return text, count

    engine.start()
    try:
        return await asyncio.gather(*(one(i, prompt) for i, prompt in enumerate(prompts)))
    finally:
        engine.stop()


def test_process_core_generates_what_the_in_process_engine_does(hf_folder: Path) -> None:
    served = load_model(hf_folder)
    prompts = [served.tokenizer.encode(text).ids for text in PROMPTS]
    in_process = AsyncEngine(LLMEngine(served.model, ENGINE_CONFIG, served.eos_token_id), served.tokenizer)
    want = asyncio.run(complete_all(in_process, prompts, 12))

    core = ProcessEngineCore(EngineRecipe(hf_folder, ENGINE_CONFIG, threads=1))
    assert (core.max_seq_len, core.max_num_seqs, core.num_blocks) == (128, 8, 128)
    got = asyncio.run(complete_all(AsyncEngine(core, served.tokenizer), prompts, 12))
    assert got == want and all(count == 12 for _, count in got)
    assert not core.process.is_alive()  # stop() ends the child


def test_an_error_while_loading_in_the_child_is_a_clean_value_error(hf_folder: Path) -> None:
    too_small = EngineConfig(block_size=4, num_blocks=2)
    with pytest.raises(ValueError, match="KV cache holds 2 blocks"):
        ProcessEngineCore(EngineRecipe(hf_folder, too_small, threads=1))


def test_a_dead_engine_process_fails_requests_instead_of_hanging_them(hf_folder: Path) -> None:
    served = load_model(hf_folder, weights=False)
    core = ProcessEngineCore(EngineRecipe(hf_folder, ENGINE_CONFIG, threads=1))
    engine = AsyncEngine(core, served.tokenizer)
    prompt = served.tokenizer.encode(PROMPTS[0]).ids

    async def scenario() -> None:
        engine.start()
        params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
        stream = engine.generate("doomed", prompt, params)
        await stream.__anext__()  # it is running
        os.kill(core.process.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="engine process exited"):
            async for _ in stream:
                pass
        assert not engine.is_running
        engine.stop()

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_aiinfra_serve_answers_through_its_engine_process(hf_folder: Path, tmp_path: Path, free_port: int) -> None:
    port = free_port
    log = tmp_path / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "aiinfra.serve", str(hf_folder), "--port", str(port), "--threads", "1",
         "--kv-cache-memory-mb", "4"],
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start: " + log.read_text()
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}"
        body = {"model": hf_folder.name, "prompt": PROMPTS[1], "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        response = httpx.post(f"{url}/v1/completions", timeout=30, json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 5
        # The engine process dies: the server stays up, says so, and refuses work at once instead of hanging it.
        engine_pid = httpx.get(f"{url}/health").json()["engine_pid"]
        assert engine_pid != server.pid
        os.kill(engine_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").status_code != 503:
            assert time.monotonic() < deadline, "/health still reports a running engine"
            time.sleep(0.1)
        refused = httpx.post(f"{url}/v1/completions", timeout=5, json=body)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_stopped"
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    # uvicorn shuts down gracefully (the lifespan stops the engine process), then re-raises the signal it caught.
    assert server.returncode in (0, -signal.SIGTERM) and "Traceback" not in log.read_text(), log.read_text()


def test_engine_cpus_parse_and_refuse_what_this_process_cannot_use() -> None:
    available = sorted(os.sched_getaffinity(0))
    assert parse_cpu_list("") == ()
    assert parse_cpu_list(f"{available[0]}") == (available[0],)
    assert parse_cpu_list(f" {available[0]}-{available[0]} ,{available[-1]}") == (available[0], available[-1])
    with pytest.raises(ValueError, match="expected CPU numbers"):
        parse_cpu_list("first")
    with pytest.raises(ValueError, match="not available"):
        parse_cpu_list(str(max(available) + 1))


def test_the_engine_process_runs_on_the_cpus_it_was_given(hf_folder: Path) -> None:
    cpu = sorted(os.sched_getaffinity(0))[-1]
    core = ProcessEngineCore(EngineRecipe(hf_folder, ENGINE_CONFIG, threads=1, cpus=(cpu,)))
    try:
        assert os.sched_getaffinity(core.process.pid) == {cpu}
        # Ctrl+C reaches the whole process group; the engine leaves the shutdown to the server.
        os.kill(core.process.pid, signal.SIGINT)
        time.sleep(0.5)
        assert core.is_alive
    finally:
        core.stop()
    assert core.process.exitcode == 0
