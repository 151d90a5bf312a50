"""The gateway's semantic cache: lookup latency on hits and what a miss adds, at 10k and 100k entries; memory
per entry; hit ratio and backend tokens saved on a replayed Zipf workload with repeats.

Workloads:
- latency: a store filled with N entries (random unit vectors: the index's worst case) plus the questions of
  the evaluation set's paraphrase pairs; each paraphrase's other half is looked up (a hit), and unseen
  questions are looked up (a miss). Baseline: the same lookup without the cache is zero work, so a miss's
  whole lookup time is what it adds.
- through the gateway: an in-process backend answering after 20 ms, the gateway in front of it with the cache
  and without (the baseline, same run); a hit's end-to-end latency, and a miss's minus the uncached request's;
  with speculative dispatch after 4 ms of lookup (the default), speculative dispatch at once, and without.
- Zipf: requests drawn Zipf(1.1) over the evaluation set's questions, each paraphrase pair one intent asked in
  either phrasing, every other question its own intent (near-opposites are different intents); a hit on another
  intent counts as a wrong answer.

    PYTHONPATH=src python bench/cache.py [--entries 10000,100000] [--requests 3000]

The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from aiinfra.observe.route_metrics import RouteMetrics  # noqa: E402
from aiinfra.route.cache.embed import Encoder  # noqa: E402
from aiinfra.route.cache.keys import Plan  # noqa: E402
from aiinfra.route.cache.semantic import SemanticCache  # noqa: E402
from aiinfra.route.cache.store import Entry  # noqa: E402
from aiinfra.route.fleet import CacheConfig, parse_fleet  # noqa: E402
from cache_eval import load_pairs  # noqa: E402

ANSWER = orjson.dumps({"chat": True, "model": "m", "choices": [{"pieces": ["x" * 800], "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 20, "completion_tokens": 200}})


def quantiles_ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": round(1000 * ordered[len(ordered) // 2], 3),
            "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3)}


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def fill(cache: SemanticCache, count: int, seed: int = 0) -> float:
    """Add `count` filler entries to one partition; their bytes of resident memory each."""
    rng = np.random.default_rng(seed)
    before = rss_bytes()
    now = time.time()
    for start in range(0, count, 1000):
        vectors = rng.standard_normal((min(1000, count - start), 384)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        for i, vector in enumerate(vectors):
            text = f"filler question number {start + i} about some topic or other?"
            cache.store.put(Entry("p", text, vector, ANSWER, now, now + 3600))
    return (rss_bytes() - before) / max(count, 1)


async def latency(encoder: Encoder, entries: int) -> dict:
    cache = SemanticCache(CacheConfig(enabled=True, max_bytes=1 << 40), RouteMetrics(), encoder)
    await cache.start()
    memory = fill(cache, entries)
    pairs = [p for p in load_pairs() if p["kind"] == "paraphrase"]
    for pair in pairs:
        plan = Plan("p", pair["a"], True, True)
        cache.save(plan, await cache.vector(pair["a"]), ANSWER)
    hits, misses, exact = [], [], []
    hit_count = 0
    for pair in pairs:
        started = time.perf_counter()
        found, _ = await cache.lookup(Plan("p", pair["b"], True, True))
        hits.append(time.perf_counter() - started)
        hit_count += found is not None
        started = time.perf_counter()
        await cache.lookup(Plan("p", pair["a"], True, True))
        exact.append(time.perf_counter() - started)
        started = time.perf_counter()
        await cache.lookup(Plan("p", f"Unseen question {len(misses)}: how do I tune {pair['b'].lower()}", True, True))
        misses.append(time.perf_counter() - started)
    await cache.close()
    return {"entries": entries, "semantic_hit": quantiles_ms(hits), "exact_hit": quantiles_ms(exact),
            "miss_lookup": quantiles_ms(misses), "hit_share_of_paraphrase_lookups": round(hit_count / len(pairs), 3),
            "memory_bytes_per_entry": round(memory)}


def zipf_workload(encoder: Encoder, requests: int, seed: int = 0) -> dict:
    """Hit ratio, tokens saved and wrong answers on a replayed Zipf workload."""
    pairs = load_pairs()
    intent: dict[str, int] = {}
    phrasings: list[list[str]] = []
    for pair in pairs:
        if pair["kind"] == "paraphrase":
            known = intent.get(pair["a"], intent.get(pair["b"]))
            if known is None:
                known = len(phrasings)
                phrasings.append([])
            for text in (pair["a"], pair["b"]):
                if text not in intent:
                    intent[text] = known
                    phrasings[known].append(text)
    for pair in pairs:
        for text in (pair["a"], pair["b"]):
            if text not in intent:
                intent[text] = len(phrasings)
                phrasings.append([text])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(phrasings))
    weights = 1.0 / np.arange(1, len(phrasings) + 1) ** 1.1
    draws = rng.choice(len(phrasings), size=requests, p=weights / weights.sum())

    async def replay() -> dict:
        cache = SemanticCache(CacheConfig(enabled=True), RouteMetrics(), encoder)
        await cache.start()
        hits = wrong = saved = spent = 0
        confused: set[tuple[str, str]] = set()
        for draw in draws:
            wanted = int(order[draw])
            text = phrasings[wanted][int(rng.integers(len(phrasings[wanted])))]
            prompt_tokens = len(text) // 4 + 8
            record = orjson.dumps({"chat": True, "model": "m", "choices": [{"pieces": [str(wanted)],
                                                                            "finish_reason": "stop"}],
                                   "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 150}})
            plan = Plan("p", text, True, True)
            found, vector = await cache.lookup(plan)
            if found is not None:
                hits += 1
                saved += prompt_tokens + 150
                if orjson.loads(found.answer)["choices"][0]["pieces"][0] != str(wanted):
                    wrong += 1
                    confused.add((text, found.text))
            else:
                spent += prompt_tokens + 150
                cache.save(plan, vector, record)
        await cache.close()
        for asked, answered in sorted(confused):
            print(f"  wrong answer: {asked!r} answered as {answered!r}", file=sys.stderr)
        distinct = len({int(order[d]) for d in draws})
        return {"requests": requests, "intents_asked": distinct, "hit_ratio": round(hits / requests, 4),
                "best_possible_hit_ratio": round(1 - distinct / requests, 4), "wrong_answers": wrong,
                "confused_pairs": len(confused),
                "backend_tokens_saved": saved, "backend_tokens_spent": spent,
                "tokens_saved_share": round(saved / (saved + spent), 4)}

    return asyncio.run(replay())


def _serve_in_thread(app) -> tuple[str, asyncio.AbstractEventLoop, object]:
    from aiohttp import web

    loop = asyncio.new_event_loop()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    runner = web.AppRunner(app)

    async def start() -> None:
        await runner.setup()
        await web.SockSite(runner, sock).start()

    threading.Thread(target=loop.run_forever, daemon=True).start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(60)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", loop, runner


def through_gateway(encoder: Encoder, rounds: int = 60, **options: object) -> dict:
    """End-to-end through the gateway: a hit, a miss, and the same request with the cache disabled."""
    from aiohttp import web

    from aiinfra.route.app import build_app
    from aiinfra.route.gateway import Gateway

    async def backend_answer(request: web.Request) -> web.Response:
        await asyncio.sleep(0.02)
        return web.json_response({"id": "b", "object": "chat.completion", "created": 1, "model": "m",
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "an answer"},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 10, "completion_tokens": 2}})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    backend = web.Application()
    backend.router.add_post("/v1/chat/completions", backend_answer)
    backend.router.add_get("/health", health)
    backend_url, _, _ = _serve_in_thread(backend)
    urls = {}
    for enabled in (True, False):
        cache = {"enabled": enabled} | options
        fleet = parse_fleet({"gateway": {"health_interval_s": 5}, "cache": cache,
                             "backend": [{"name": "b", "url": backend_url, "model": "m"}]})
        gateway = Gateway(fleet, seed=0)
        if enabled:
            gateway.cache = SemanticCache(fleet.cache, gateway.metrics, encoder)
        urls[enabled], _, _ = _serve_in_thread(build_app(fleet, gateway))
    client = httpx.Client(timeout=30)

    def ask(url: str, content: str) -> tuple[float, str]:
        body = {"model": "m", "messages": [{"role": "user", "content": content}], "temperature": 0}
        started = time.perf_counter()
        response = client.post(f"{url}/v1/chat/completions", json=body)
        return time.perf_counter() - started, response.headers.get("x-aiinfra-cache", "")

    pairs = [p for p in load_pairs() if p["kind"] == "paraphrase"][:rounds]
    hit, miss, plain = [], [], []
    for index, pair in enumerate(pairs):
        elapsed, status = ask(urls[True], pair["a"])
        assert status == "miss", status
        miss.append(elapsed)
        plain.append(ask(urls[False], f"{index} {pair['a']}")[0])
        elapsed, status = ask(urls[True], pair["a"])
        if status == "hit":
            hit.append(elapsed)
    semantic = [ask(urls[True], p["b"]) for p in pairs]
    semantic_hits = [elapsed for elapsed, status in semantic if status == "hit"]
    miss_added = statistics.median(miss) - statistics.median(plain)
    return {"exact_hit": quantiles_ms(hit), "semantic_hit": quantiles_ms(semantic_hits),
            "miss": quantiles_ms(miss), "uncached": quantiles_ms(plain),
            "miss_adds_p50_ms": round(1000 * miss_added, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", default="10000,100000", help="comma-separated store sizes")
    parser.add_argument("--requests", type=int, default=3000, help="requests of the Zipf workload")
    args = parser.parse_args()
    encoder = Encoder()
    sizes = [int(size) for size in args.entries.split(",")]
    result: dict = {"load_average_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(), "latency": [],
                    "gateway": None, "zipf": None}
    for size in sizes:
        row = asyncio.run(latency(encoder, size))
        result["latency"].append(row)
        print(f"{size:>7} entries: semantic hit p50 {row['semantic_hit']['p50_ms']} ms p99 "
              f"{row['semantic_hit']['p99_ms']} ms; exact hit p50 {row['exact_hit']['p50_ms']} ms; miss lookup "
              f"p50 {row['miss_lookup']['p50_ms']} ms p99 {row['miss_lookup']['p99_ms']} ms; "
              f"{row['memory_bytes_per_entry']} B/entry resident", flush=True)
    result["gateway"] = {}
    modes = {"speculative": {}, "speculative_at_once": {"speculative_after_ms": 0},
             "not_speculative": {"speculative": False}}
    for mode, options in modes.items():
        gateway = result["gateway"][mode] = through_gateway(encoder, **options)
        print(f"through the gateway ({mode}, {options or 'the defaults'}): exact hit p50 "
              f"{gateway['exact_hit']['p50_ms']} ms, semantic hit p50 {gateway['semantic_hit']['p50_ms']} ms p99 "
              f"{gateway['semantic_hit']['p99_ms']} ms; a miss adds {gateway['miss_adds_p50_ms']} ms p50 (miss "
              f"{gateway['miss']['p50_ms']} ms against {gateway['uncached']['p50_ms']} ms uncached)", flush=True)
    zipf = result["zipf"] = zipf_workload(encoder, args.requests)
    print(f"zipf: hit ratio {zipf['hit_ratio']:.1%} (at most {zipf['best_possible_hit_ratio']:.1%}), "
          f"{zipf['tokens_saved_share']:.1%} of backend tokens saved, {zipf['wrong_answers']} wrong answers")
    result["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    print(f"load average (1 min) {result['load_average_1m']} at the start, {result['load_average_1m_end']} at the "
          f"end, on {os.cpu_count()} CPUs: latencies scale with it on a shared machine")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
