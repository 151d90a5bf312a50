"""The edge profile: the memory budget sizes the KV cache, bad budgets are refused by name, the edge server answers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from typer import Typer
from typer.testing import CliRunner

from aiinfra.checkpoint.run_dir import save_run
from aiinfra.config import load_config
from aiinfra.serve.commands import serve_command
from aiinfra.serve.edge import MIB, int8_weight_bytes, load_edge_engine, plan_memory, process_resident_bytes
from aiinfra.serve.engine import EngineConfig
from aiinfra.serve.quantize import Int8Linear, weight_bytes
from aiinfra.serve.runner import kv_bytes_per_token

from .server import tiny_served_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HTTP tests' tiny model saved as a finished run (max_seq_len 64)."""
    served = tiny_served_model(max_seq_len=64)
    spec = ["vocab_size=300", "dim=64", "n_layers=2", "n_heads=4", "n_kv_heads=2", "ffn_dim=128", "max_seq_len=64"]
    config = load_config(None, [*(f"model.{item}" for item in spec), "model.tie_embeddings=false", "train.seq_len=64"])
    assert config.model.num_params() == sum(p.numel() for p in served.model.parameters())
    path = tmp_path_factory.mktemp("edge") / "run"
    path.mkdir()
    save_run(path, served.model, config, served.tokenizer, {})
    return path


def test_the_budget_left_after_the_process_goes_to_the_kv_cache() -> None:
    plan = plan_memory(100 * MIB, 60 * MIB, 5 * MIB, 10 * MIB, MIB)
    assert plan.kv_cache_bytes == 30 * MIB
    with pytest.raises(ValueError, match=r"--memory-mb 100: the int8 weights alone take 120.0 MiB"):
        plan_memory(100 * MIB, 0, 120 * MIB, 10 * MIB, MIB)
    with pytest.raises(ValueError, match=r"--memory-mb 100: the server holds 95 MiB once loaded.*at least 106 MiB"):
        plan_memory(100 * MIB, 95 * MIB, 5 * MIB, 10 * MIB, MIB)


def test_edge_engine_sizes_its_kv_blocks_from_the_budget(run_dir: Path) -> None:
    threads = torch.get_num_threads()
    budget_mb = process_resident_bytes() / MIB + 64
    try:
        served, engine, plan = load_edge_engine(
            run_dir, budget_mb, EngineConfig(block_size=8, max_num_batched_tokens=64)
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert plan.budget_bytes == int(budget_mb * MIB)
    assert plan.kv_cache_bytes == plan.budget_bytes - plan.resident_bytes - plan.activation_bytes
    bytes_per_block = kv_bytes_per_token(served.model, torch.float32) * 8
    assert engine.num_blocks == plan.kv_cache_bytes // bytes_per_block > 0
    cache_bytes = sum(t.numel() * t.element_size() for t in [*engine.runner.k_cache, *engine.runner.v_cache])
    assert cache_bytes <= plan.kv_cache_bytes
    assert not any(isinstance(m, torch.nn.Linear) for m in served.model.modules())
    assert sum(isinstance(m, Int8Linear) for m in served.model.modules()) == 7 * served.model.spec.n_layers + 1
    assert plan.weight_bytes == weight_bytes(served.model)
    # The weights are counted before they are read, to refuse a model that cannot fit: the same count.
    assert int8_weight_bytes(run_dir, "auto")[1] == pytest.approx(plan.weight_bytes, rel=0.05)


def test_serve_refuses_bad_profiles_by_name(run_dir: Path) -> None:
    app = Typer()
    app.command("serve")(serve_command)
    app.command("other")(lambda: None)
    cases = {
        ("--profile", "phone"): "--profile 'phone': expected cloud or edge",
        ("--memory-mb", "512"): "--memory-mb is the edge profile's budget",
        ("--profile", "edge"): "--profile edge needs --memory-mb",
        ("--profile", "edge", "--memory-mb", "1"): "--memory-mb 1: the server holds",
    }
    threads = torch.get_num_threads()
    for args, message in cases.items():
        result = CliRunner().invoke(app, ["serve", str(run_dir), *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    torch.set_num_threads(threads)


def test_the_edge_server_answers(run_dir: Path, free_port: int) -> None:
    command = [
        sys.executable,
        "-m",
        "aiinfra",
        "serve",
        str(run_dir),
        "--profile",
        "edge",
        "--memory-mb",
        "2048",
        "--port",
        str(free_port),
        "--block-size",
        "8",
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    base = f"http://127.0.0.1:{free_port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert process.poll() is None, process.stdout.read()
        response = httpx.post(
            f"{base}/v1/completions",
            timeout=60,
            json={"model": "run", "prompt": "def ", "max_tokens": 8, "temperature": 0},
        )
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] >= 1
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "edge profile: int8 weights, 1 thread, 1 process; memory budget 2048 MiB" in output
