"""One observed stack for the module: a tiny served model, a short 2-rank training run serving /metrics, a short
load test, and (where installed) a real Prometheus scraping both every second.

Services missing on the machine (Debian's `prometheus`, `chromium`, `chromium-driver`) fail the tests under CI=true
(`.ci/run` installs them) and skip them elsewhere, with the reason.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from aiinfra.serve.loadgen import LoadSpec, run_load
from serve.server import running_server, tiny_served_model  # tests/serve/server.py

PROMETHEUS = "/usr/bin/prometheus"
STEPS = 40
SLOW_FROM_STEP = 25


def require(path: str, package: str) -> str | None:
    """`path` if it exists; else fail under CI (the service must be there) or return None (the caller skips)."""
    found = path if Path(path).exists() else shutil.which(Path(path).name)
    if found is None and os.environ.get("CI") == "true":
        pytest.fail(f"{path} is missing: apt-get install -y {package} (.ci/run installs it)")
    return found


def missing(package: str) -> str:
    return f"{package} is not installed (apt-get install -y {package}); CI installs it"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def responds(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen
    log: Path

    def query(self, expression: str) -> list[dict]:
        """The result vector of an instant query through Prometheus' HTTP API."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expression}, timeout=10)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]["result"]


def start_prometheus(workdir: Path, targets: list[str]) -> Prometheus:
    """Debian's prometheus binary on a free port, scraping `targets` (host:port) every second."""
    config = workdir / "prometheus.yml"
    quoted = ", ".join(f"'{target}'" for target in targets)
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: aiinfra\n    static_configs:\n      - targets: [{quoted}]\n"
    )
    port = free_port()
    log = workdir / "prometheus.log"
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT,
    )
    prometheus = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_for(lambda: responds(f"{prometheus.url}/-/ready"), 60, "Prometheus to be ready")
    except AssertionError:
        process.kill()
        raise AssertionError(log.read_text()[-3000:]) from None
    return prometheus


@dataclass
class Stack:
    server_url: str
    run_dir: Path
    train_port: int
    prometheus: Prometheus | None
    load_report: dict


def train_overrides(corpus: Path, cache_dir: Path, run_dir: Path, port: int) -> list[str]:
    """A tiny fp32 model on 2 gloo ranks, long enough (a few seconds) for several 1 s scrapes."""
    return [
        f"data.corpus={corpus}", f"data.cache_dir={cache_dir}", "data.val_fraction=0.2", "model.vocab_size=512",
        "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
        "model.max_seq_len=64", "train.seq_len=64", "train.micro_batch=8", f"train.steps={STEPS}",
        "train.warmup_steps=2", "train.eval_every=20", "train.eval_batches=1", "train.dtype=fp32", "train.device=cpu",
        "run.progress=false", "run.sample_tokens=0", "checkpoint.every_steps=20", "parallel.measure_comm_every=10",
        f"observe.metrics_port={port}", f"run.dir={run_dir}",
        # Rank 1 turns straggler at step 25, so the heatmap and the page name one.
        "fault.slow_rank=1", "fault.slow_ms=60", f"fault.slow_from_step={SLOW_FROM_STEP}",
    ]


@pytest.fixture(scope="module")
def stack(small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("observed")
    train_port = free_port()
    with running_server(tiny_served_model()) as server:
        server_target = server.base_url.removeprefix("http://")
        prometheus = None
        if require(PROMETHEUS, "prometheus"):
            prometheus = start_prometheus(workdir, [f"127.0.0.1:{train_port}", server_target])
        try:
            run_dir = workdir / "run"
            command = [sys.executable, "-m", "aiinfra", "train", "--nproc", "2"]
            for item in train_overrides(small_corpus, workdir / "cache", run_dir, train_port):
                command += ["--set", item]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            training = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
            assert training.returncode == 0, training.stderr[-4000:]
            spec = LoadSpec(base_url=server.base_url, num_prompts=16, max_concurrency=4, input_len=8, output_len=8)
            report = asyncio.run(run_load(spec))
            assert report["completed"] == 16, report
            if prometheus is not None:
                time.sleep(2.5)  # two more scrapes of the server, after the load
            yield Stack(server.base_url, run_dir, train_port, prometheus, report)
        finally:
            if prometheus is not None:
                prometheus.process.terminate()
                prometheus.process.wait(timeout=30)
