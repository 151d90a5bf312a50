"""Tensor-parallel serving on CPU with gloo: two ranks give the greedy tokens of one process, with chunked prefill
and prefix caching on, each holding about half the weights and half the KV cache; and a two-node run over
loopback through the command line (node 1 runs its rank only, node 0 serves HTTP)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from aiinfra.serve.engine import EngineConfig, LLMEngine
from aiinfra.serve.engine_core import EngineRecipe, build_engine, start_tensor_parallel_workers
from aiinfra.serve.request import SamplingParams
from aiinfra.serve.tensor_parallel import TensorParallelConfig

ROOT = Path(__file__).resolve().parents[2]
# Small blocks and a small token budget: prompts are prefilled in chunks and share cached prefix blocks.
ENGINE_CONFIG = EngineConfig(block_size=4, num_blocks=96, max_num_batched_tokens=10, max_num_seqs=8,
                             pack_weights=False)
SHARED = [5, 17, 42, 99, 7, 250, 31, 8, 64, 12, 3, 77]
PROMPTS = [SHARED + [i, i + 1, i + 2] for i in range(20, 25)] + [SHARED[:6] + [200, 201], [9] * 19]
PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory_of(engine: LLMEngine) -> tuple[int, int]:
    """(weight bytes, KV cache bytes) this process holds."""
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    kv = sum(t.numel() * t.element_size() for t in engine.runner.k_cache + engine.runner.v_cache)
    return weights, kv


def _rank0_main(recipe: EngineRecipe, results: multiprocessing.Queue) -> None:
    torch.set_num_threads(1)
    engine = build_engine(recipe, 0)
    results.put(("outputs", engine.generate(PROMPTS, PARAMS)))
    results.put(("memory", memory_of(engine)))
    engine.close()


def test_tensor_parallel_two_ranks_equal_one_process_with_half_the_memory_each(hf_folder: Path) -> None:
    one = build_engine(EngineRecipe(hf_folder, ENGINE_CONFIG, threads=1))
    expected = one.generate(PROMPTS, PARAMS)
    one_weights, one_kv = memory_of(one)
    recipe = EngineRecipe(hf_folder, ENGINE_CONFIG, threads=1,
                          tensor_parallel=TensorParallelConfig(2, endpoint=f"127.0.0.1:{free_port()}"))
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    rank0 = context.Process(target=_rank0_main, args=(recipe, results), daemon=True)
    rank0.start()
    workers = start_tensor_parallel_workers(recipe, range(1, 2))
    try:
        outputs = dict(results.get(timeout=120) for _ in range(2))
        rank0.join(30)
        for worker in workers:
            worker.join(30)
    finally:
        for process in [rank0, *workers]:
            if process.is_alive():
                process.kill()
    assert outputs["outputs"] == expected
    assert one.scheduler.num_preemptions == 0 and one.block_manager.cached  # prefix blocks were shared
    weights, kv = outputs["memory"]
    assert kv == one_kv // 2
    assert 0.45 < weights / one_weights < 0.55  # the norms (a few hundred values) are held whole
    assert rank0.exitcode == 0 and all(worker.exitcode == 0 for worker in workers)


def test_tensor_parallel_over_two_nodes_on_loopback_through_the_command_line(hf_folder: Path) -> None:
    prompt = PROMPTS[0]
    expected = build_engine(EngineRecipe(hf_folder, ENGINE_CONFIG, threads=1)).generate([prompt], PARAMS)[0]
    endpoint, port = f"127.0.0.1:{free_port()}", free_port()
    common = [sys.executable, "-m", "aiinfra.serve", str(hf_folder), "--tp", "2", "--nnodes", "2",
              "--rdzv-endpoint", endpoint, "--threads", "1", "--block-size", "4", "--max-num-batched-tokens", "10"]
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    node1 = subprocess.Popen([*common, "--node-rank", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    node0 = subprocess.Popen([*common, "--node-rank", "0", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and node0.poll() is None:
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        response = httpx.post(f"{base_url}/v1/completions", timeout=60, json={
            "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "return_token_ids": True})
        assert response.json()["choices"][0]["token_ids"] == expected
        node0.send_signal(signal.SIGINT)
        assert node0.wait(60) == 0
        assert node1.wait(60) == 0  # rank 0 told node 1's rank to stop as it shut down
    finally:
        for node in (node0, node1):
            if node.poll() is None:
                node.kill()
                node.wait()
