"""A load generator for any OpenAI-compatible server, in the manner of vLLM's `benchmark_serving`.

Requests arrive by a gamma process at `request_rate` per second (shape `burstiness`; 1 is Poisson), or all at
once, optionally capped at `max_concurrency` in flight. Each streams /v1/completions with `ignore_eos` so that
it produces exactly `max_tokens` tokens. Definitions (vLLM's): TTFT is the time from sending to the first
streamed text; TPOT is (latency - TTFT) / (output tokens - 1) per request; ITL is every gap between streamed
chunks; goodput counts the requests per second that meet every SLO given.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they you "
    "were her she there one all we their been has when who will more no if out so said what up its about into than "
    "them can only other new some could time these two may then do first any my now such like our over man me even "
    "most made after also did many before must through back years where much your way well down should because each "
    "just those people how too little state good very make world still own see men work long get here between both "
    "life being under never day same another know while last might us great old year off come since against go came"
).split()


@dataclass
class LoadSpec:
    """The workload: how many requests, how they arrive, and their prompt and output lengths."""

    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None
    num_prompts: int = 64
    request_rate: float = float("inf")
    burstiness: float = 1.0
    max_concurrency: int | None = None
    input_len: int = 64
    output_len: int = 64
    range_ratio: float = 0.0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    api_key: str | None = None
    seed: int = 0
    timeout_s: float = 600.0


@dataclass
class RequestResult:
    """One request as the client saw it."""

    ok: bool
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float:
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def make_workload(spec: LoadSpec) -> list[tuple[str, int]]:
    """(prompt text, max_tokens) per request: random words, so that prompts share no prefix."""
    rng = random.Random(spec.seed)

    def length(mean: int) -> int:
        low, high = max(1, int(mean * (1 - spec.range_ratio))), max(1, int(mean * (1 + spec.range_ratio)))
        return rng.randint(low, high)

    return [(" ".join(rng.choice(WORDS) for _ in range(length(spec.input_len))), length(spec.output_len))
            for _ in range(spec.num_prompts)]


def arrival_gaps_s(spec: LoadSpec) -> list[float]:
    """Seconds between successive request starts (all zero for an infinite rate)."""
    if spec.request_rate == float("inf"):
        return [0.0] * spec.num_prompts
    rng = random.Random(spec.seed + 1)
    theta = 1.0 / (spec.request_rate * spec.burstiness)
    return [rng.gammavariate(spec.burstiness, theta) for _ in range(spec.num_prompts)]


async def send_one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> RequestResult:
    """Stream one completion and time every chunk."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    result = RequestResult(ok=False)
    chunks = 0
    last = start
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                payload = json.loads(data)
                if "error" in payload:
                    result.error = str(payload["error"])
                    return result
                now = time.perf_counter()
                if payload.get("usage"):
                    result.prompt_tokens = payload["usage"].get("prompt_tokens", 0)
                    result.output_tokens = payload["usage"].get("completion_tokens", 0)
                if any(choice.get("text") for choice in payload.get("choices", [])):
                    if chunks == 0:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    chunks += 1
                    last = now
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        result.error = f"{type(error).__name__}: {error}"
        return result
    result.latency_s = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = chunks > 0
    if not result.ok:
        result.error = "no text streamed"
    return result


def _percentiles_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def at(q: float) -> float:
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return {"mean": 1000 * statistics.fmean(ordered), "p50": 1000 * at(0.5), "p99": 1000 * at(0.99)}


async def run_load(spec: LoadSpec) -> dict[str, Any]:
    """Run the workload against `spec.base_url` and return the summary figures."""
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=spec.base_url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(spec.timeout_s)) as client:
        model = spec.model
        if model is None:
            try:
                response = await client.get("/v1/models")
                response.raise_for_status()
                model = response.json()["data"][0]["id"]
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as error:
                raise ConnectionError(f"--base-url {spec.base_url}: cannot list models ({error})") from None
        workload = make_workload(spec)
        gaps = arrival_gaps_s(spec)
        limit = asyncio.Semaphore(spec.max_concurrency or spec.num_prompts)

        async def limited(prompt: str, max_tokens: int) -> RequestResult:
            async with limit:
                return await send_one(client, model, prompt, max_tokens)

        start = time.perf_counter()
        tasks = []
        for (prompt, max_tokens), gap in zip(workload, gaps):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(limited(prompt, max_tokens)))
        results = await asyncio.gather(*tasks)
        duration_s = time.perf_counter() - start
    return summarize(spec, model, results, duration_s)


def summarize(spec: LoadSpec, model: str, results: list[RequestResult], duration_s: float) -> dict[str, Any]:
    """The headline figures of one run, with units in the key names."""
    done = [r for r in results if r.ok]
    good = [
        r for r in done
        if (spec.slo_ttft_ms is None or 1000 * r.ttft_s <= spec.slo_ttft_ms)
        and (spec.slo_tpot_ms is None or 1000 * r.tpot_s <= spec.slo_tpot_ms)
    ]
    output_tokens = sum(r.output_tokens for r in done)
    report: dict[str, Any] = {
        "model": model,
        "num_prompts": spec.num_prompts,
        "max_concurrency": spec.max_concurrency,
        "request_rate": None if spec.request_rate == float("inf") else spec.request_rate,
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration_s,
        "total_input_tokens": sum(r.prompt_tokens for r in done),
        "total_output_tokens": output_tokens,
        "request_throughput_per_s": len(done) / duration_s,
        "output_tokens_per_s": output_tokens / duration_s,
        "goodput_requests_per_s": len(good) / duration_s,
    }
    for name, values in (
        ("ttft", [r.ttft_s for r in done]),
        ("tpot", [r.tpot_s for r in done if r.output_tokens > 1]),
        ("itl", [gap for r in done for gap in r.itl_s]),
        ("e2e", [r.latency_s for r in done]),
    ):
        for stat, value in _percentiles_ms(values).items():
            report[f"{stat}_{name}_ms"] = value
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        report["errors"] = errors[:5]
    return report


def format_report(report: dict[str, Any]) -> str:
    """A human-readable table of a `run_load` summary."""
    lines = [
        f"{'completed / failed':<28}{report['completed']} / {report['failed']}",
        f"{'duration':<28}{report['duration_s']:.2f} s",
        f"{'request throughput':<28}{report['request_throughput_per_s']:.2f} req/s",
        f"{'output token throughput':<28}{report['output_tokens_per_s']:.1f} tok/s",
        f"{'goodput':<28}{report['goodput_requests_per_s']:.2f} req/s",
    ]
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E latency")):
        lines.append(
            f"{label + ' (ms)':<28}mean {report[f'mean_{name}_ms']:.1f}  p50 {report[f'p50_{name}_ms']:.1f}  "
            f"p99 {report[f'p99_{name}_ms']:.1f}"
        )
    for error in report.get("errors", []):
        lines.append(f"error: {error}")
    return "\n".join(lines)
