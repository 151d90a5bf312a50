"""Routing policies on real `aiinfra serve` backends: prefix affinity against round-robin and least outstanding, and
hedging against a backend slowed on purpose, each compared in the same run.

Prefix (`--scenario prefix`): two backends of a random-weight Llama model (hidden 256, 4 layers, vocabulary 4096,
a tokenizer trained on this interpreter's standard library), each with a 64 MiB KV cache (about 8k tokens: half of
the 16 system prompts of each run, about 650 tokens each), 48 conversations of 3 turns (each turn resends the
whole conversation, 16 new tokens per answer), 8 at a time, through the gateway under each policy; the policies
alternate over --rounds, each run with system prompts of its own (no run finds another's in a cache). Reported:
the backends' prefix-cache hit ratio (cached prompt tokens / prompt tokens, from their /metrics), TTFT p50/p99 at
the client, each backend's share of requests (medians over rounds).

Hedging (`--scenario hedge`): two backends of the small test model; one is slowed on purpose by stopping its engine
process (SIGSTOP) for 100 ms out of every 2 s (as a collector's pause or a noisy neighbour would). 400 streamed
requests (8 tokens each) at 20 per second, open loop, with hedging off and on (budget 10% of requests), alternated
over --rounds; p50/p99 of whole requests and the extra requests hedging cost (hedges / client requests, from the
gateway's metrics).

    python bench/route_policies.py [--scenario prefix|hedge|both] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import httpx
import torch

from aiinfra.checkpoint.export import write_hf_folder
from aiinfra.data.tokenizer import train_tokenizer
from aiinfra.models.llama import Transformer
from aiinfra.spec import ModelSpec
from servers import free_port, wait_healthy

MODEL = "bench"


def build_model(folder: Path, dim: int, layers: int, vocab: int) -> Path:
    """A random-weight Llama folder that `aiinfra serve` loads; the tokenizer is trained on stdlib sources."""
    folder.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [path.read_text(errors="ignore") for path in sorted(stdlib.glob("*.py"))[:80]]
    tokenizer = train_tokenizer(texts, vocab)
    torch.manual_seed(0)
    spec = ModelSpec(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=max(4, dim // 64),
                     n_kv_heads=max(4, dim // 64), ffn_dim=dim * 3, max_seq_len=4096)
    write_hf_folder(Transformer(spec), tokenizer, folder)
    return folder


class Fleet:
    """Backends and a gateway as processes; `stop()` ends them all."""

    def __init__(self, folder: Path, workdir: Path, backends: int, kv_mb: int = 64):
        self.folder, self.workdir, self.kv_mb = folder, workdir, kv_mb
        self.ports = [free_port() for _ in range(backends)]
        self.backends: list[subprocess.Popen] = []
        self.gateway: subprocess.Popen | None = None
        self.gateway_port = free_port()

    def start_backends(self) -> None:
        for index, port in enumerate(self.ports):
            args = [sys.executable, "-m", "aiinfra.serve", str(self.folder), "--port", str(port), "--threads", "1",
                    "--served-model-name", MODEL, "--kv-cache-memory-mb", str(self.kv_mb),
                    "--max-num-batched-tokens", "2048"]
            log = (self.workdir / f"backend{index}.log").open("a")
            self.backends.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT))
        for port, process in zip(self.ports, self.backends):
            wait_healthy(f"http://127.0.0.1:{port}", process)

    def start_gateway(self, gateway_toml: str) -> None:
        fleet = self.workdir / "fleet.toml"
        lines = ["[gateway]", gateway_toml]
        for index, port in enumerate(self.ports):
            lines += ["[[backend]]", f'name = "b{index}"', f'url = "http://127.0.0.1:{port}"', f'model = "{MODEL}"']
        fleet.write_text("\n".join(lines) + "\n")
        log = (self.workdir / "gateway.log").open("a")
        self.gateway = subprocess.Popen([sys.executable, "-m", "aiinfra", "route", str(fleet), "--port",
                                         str(self.gateway_port)], stdout=log, stderr=subprocess.STDOUT)
        wait_healthy(self.url, self.gateway)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def stop_gateway(self) -> None:
        if self.gateway is not None:
            self.gateway.terminate()
            self.gateway.wait(timeout=30)
            self.gateway = None

    def stop(self) -> None:
        self.stop_gateway()
        for process in self.backends:
            process.terminate()
        for process in self.backends:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        self.backends = []


def scrape(url: str) -> dict[str, float]:
    """Every sample of a /metrics page, by its full name with labels."""
    samples = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def stream_chat(session: aiohttp.ClientSession, url: str, messages: list[dict], max_tokens: int,
                      extra: dict | None = None) -> tuple[str, float, float]:
    """One streamed chat answer: its text, TTFT and whole latency in seconds."""
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, **(extra or {})}
    start = time.perf_counter()
    first, text = None, []
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"status {response.status}: {await response.text()}")
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            content = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if content:
                first = first or time.perf_counter()
                text.append(content)
    end = time.perf_counter()
    return "".join(text), (first or end) - start, end - start


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- prefix affinity ------------------------------------------------------------------------------------------------

def system_prompts(count: int, chars: int, offset: int) -> list[str]:
    """`count` system prompts of stdlib source, a different set for each `offset` (so no run reuses another's)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [text for path in sorted(stdlib.glob("*.py")) if len(text := path.read_text(errors="ignore")) > chars]
    chosen = sources[offset * count : (offset + 1) * count]
    if len(chosen) < count:
        raise SystemExit(f"this Python's standard library has too few files for {offset + 1} prompt sets")
    return [f"You are assistant #{i}. Reference material follows.\n{source[:chars]}" for i, source in
            enumerate(chosen)]


async def conversations(url: str, prompts: list[str], count: int, turns: int, concurrency: int,
                        seed: int) -> list[float]:
    """Multi-turn chats, `concurrency` at a time; the TTFT of every turn."""
    rng = random.Random(seed)
    assigned = [rng.randrange(len(prompts)) for _ in range(count)]
    ttfts: list[float] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int, session: aiohttp.ClientSession) -> None:
        async with gate:
            messages = [{"role": "system", "content": prompts[assigned[index]]}]
            for turn in range(turns):
                messages.append({"role": "user", "content": f"Question {turn} of conversation {index}: explain."})
                text, ttft, _ = await stream_chat(session, url, messages, 16)
                messages.append({"role": "assistant", "content": text})
                ttfts.append(ttft)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(one(i, session) for i in range(count)))
    return ttfts


def prefix_scenario(workdir: Path, rounds: int) -> dict:
    folder = build_model(workdir / "model-256", dim=256, layers=4, vocab=4096)
    policies = ("round_robin", "least_outstanding", "prefix")
    runs: dict[str, list[dict]] = {policy: [] for policy in policies}
    fleet = Fleet(folder, workdir, backends=2, kv_mb=64)
    try:
        fleet.start_backends()
        for round_index in range(rounds):
            for policy_index, policy in enumerate(policies):
                prompts = system_prompts(16, 2000, offset=round_index * len(policies) + policy_index)
                fleet.start_gateway(f'policy = "{policy}"\nhealth_interval_s = 0.5')
                before = [scrape(f"http://127.0.0.1:{port}") for port in fleet.ports]
                ttfts = asyncio.run(conversations(fleet.url, prompts, count=48, turns=3, concurrency=8,
                                                  seed=round_index))
                after = [scrape(f"http://127.0.0.1:{port}") for port in fleet.ports]
                fleet.stop_gateway()
                runs[policy].append(prefix_row(before, after, ttfts))
    finally:
        fleet.stop()
    rows = {policy: {key: statistics.median(row[key] for row in rows) if not isinstance(rows[0][key], list) else
                     [statistics.median(row[key][i] for row in rows) for i in range(2)] for key in rows[0]}
            for policy, rows in runs.items()}
    print("\n| policy | prefix-cache hit ratio (b0 / b1 / all) | TTFT p50 / p99 (ms) | share of requests (b0 / b1) |")
    print("|---|---|---|---|")
    for policy, row in rows.items():
        per, share = row["hit_ratio_per_backend"], row["share_per_backend"]
        print(f"| {policy} | {per[0]:.2f} / {per[1]:.2f} / {row['hit_ratio']:.2f} | {row['ttft_p50_ms']:.0f} / "
              f"{row['ttft_p99_ms']:.0f} | {share[0]:.2f} / {share[1]:.2f} |")
    return rows


def prefix_row(before: list[dict], after: list[dict], ttfts: list[float]) -> dict:
    """One run's figures from the backends' counters before and after it, and the client's TTFTs."""

    def delta(index: int, name: str) -> float:
        return after[index].get(name, 0.0) - before[index].get(name, 0.0)

    prompt_tokens = [delta(i, "aiinfra_serve_prompt_tokens_total") for i in range(2)]
    hits = [delta(i, "aiinfra_serve_prefix_cache_hit_tokens_total") for i in range(2)]
    requests = [sum(delta(i, f'aiinfra_serve_requests_finished_total{{finish_reason="{reason}"}}')
                    for reason in ("length", "stop")) for i in range(2)]
    return {"hit_ratio": sum(hits) / max(sum(prompt_tokens), 1),
            "hit_ratio_per_backend": [h / max(p, 1) for h, p in zip(hits, prompt_tokens)],
            "share_per_backend": [r / max(sum(requests), 1) for r in requests],
            "ttft_p50_ms": 1000 * pct(ttfts, 0.5), "ttft_p99_ms": 1000 * pct(ttfts, 0.99)}


# -- hedging --------------------------------------------------------------------------------------------------------

def stall(pid: int, stop: threading.Event, paused_s: float = 0.1, period_s: float = 2.0) -> None:
    """Stop the process for `paused_s` out of every `period_s` until `stop` is set."""
    while not stop.is_set():
        os.kill(pid, signal.SIGSTOP)
        time.sleep(paused_s)
        os.kill(pid, signal.SIGCONT)
        stop.wait(period_s - paused_s)
    os.kill(pid, signal.SIGCONT)


async def open_loop(url: str, rate: float, count: int, seed: int) -> tuple[list[float], int]:
    rng = random.Random(seed)
    latencies: list[float] = []
    errors = 0

    async def one(session: aiohttp.ClientSession, index: int) -> None:
        nonlocal errors
        try:
            _, _, latency = await stream_chat(session, url, [{"role": "user", "content": f"hello {index}"}], 8)
            latencies.append(latency)
        except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError):
            errors += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        tasks, start, at = [], time.perf_counter(), 0.0
        for index in range(count):
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(session, index)))
            at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    return latencies, errors


def hedge_scenario(workdir: Path, rounds: int) -> dict:
    folder = build_model(workdir / "model-64", dim=64, layers=2, vocab=512)
    fleet = Fleet(folder, workdir, backends=2, kv_mb=16)
    results: dict[str, list[dict]] = {"off": [], "on": []}
    try:
        fleet.start_backends()
        engine_pid = httpx.get(f"http://127.0.0.1:{fleet.ports[1]}/health").json()["engine_pid"]
        for round_index in range(rounds):
            for mode in ("off", "on"):
                hedge = "true" if mode == "on" else "false"
                fleet.start_gateway(f'policy = "least_outstanding"\nhealth_interval_s = 0.5\nhedge = {hedge}\n'
                                    "hedge_budget_ratio = 0.1")
                asyncio.run(open_loop(fleet.url, 20, 40, seed=99))  # warm-up: the pool learns its p95
                before = scrape(fleet.url)
                stop = threading.Event()
                staller = threading.Thread(target=stall, args=(engine_pid, stop))
                staller.start()
                try:
                    latencies, errors = asyncio.run(open_loop(fleet.url, 20, 400, seed=round_index))
                finally:
                    stop.set()
                    staller.join()
                after = scrape(fleet.url)
                fleet.stop_gateway()
                hedges = sum(v for k, v in after.items() if k.startswith("aiinfra_route_hedges_total")) - sum(
                    v for k, v in before.items() if k.startswith("aiinfra_route_hedges_total"))
                results[mode].append({"p50_ms": 1000 * pct(latencies, 0.5), "p99_ms": 1000 * pct(latencies, 0.99),
                                      "errors": errors, "extra_request_ratio": hedges / 400})
    finally:
        fleet.stop()
    summary = {mode: {key: statistics.median(row[key] for row in rows) for key in rows[0]}
               for mode, rows in results.items()}
    print("\n| hedging | request p50 (ms) | request p99 (ms) | extra requests | errors |")
    print("|---|---|---|---|---|")
    for mode, row in summary.items():
        print(f"| {mode} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {100 * row['extra_request_ratio']:.1f}% | "
              f"{row['errors']:.0f} |")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=["prefix", "hedge", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="aiinfra-bench-policies-"))
    headline: dict = {}
    if args.scenario in ("prefix", "both"):
        rows = prefix_scenario(workdir, args.rounds)
        headline |= {"prefix_hit_ratio": round(rows["prefix"]["hit_ratio"], 3),
                     "round_robin_hit_ratio": round(rows["round_robin"]["hit_ratio"], 3),
                     "least_outstanding_hit_ratio": round(rows["least_outstanding"]["hit_ratio"], 3),
                     "prefix_ttft_p99_ms": round(rows["prefix"]["ttft_p99_ms"], 1),
                     "round_robin_ttft_p99_ms": round(rows["round_robin"]["ttft_p99_ms"], 1),
                     "least_outstanding_ttft_p99_ms": round(rows["least_outstanding"]["ttft_p99_ms"], 1),
                     "prefix_max_share": round(max(rows["prefix"]["share_per_backend"]), 3)}
    if args.scenario in ("hedge", "both"):
        summary = hedge_scenario(workdir, args.rounds)
        headline |= {"hedge_off_p99_ms": round(summary["off"]["p99_ms"], 1),
                     "hedge_on_p99_ms": round(summary["on"]["p99_ms"], 1),
                     "hedge_p99_ratio": round(summary["on"]["p99_ms"] / summary["off"]["p99_ms"], 3),
                     "hedge_extra_request_ratio": round(summary["on"]["extra_request_ratio"], 3)}
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
