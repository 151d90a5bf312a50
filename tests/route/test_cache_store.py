"""The cache's entries without a network: TTL, eviction by bytes, persistence across a restart, a SIGKILL in the
middle of writes, request partitions and bypasses, and the guard on pairs outside the evaluation set."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("hnswlib", reason="the cache extra is not installed (pip install 'aiinfra[cache]')")

from aiinfra.route.cache.guard import mismatch  # noqa: E402
from aiinfra.route.cache.keys import plan  # noqa: E402
from aiinfra.route.cache.persist import DiskLog  # noqa: E402
from aiinfra.route.cache.store import Entry, Store  # noqa: E402
from aiinfra.route.fleet import CacheConfig  # noqa: E402


def unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
    return vector / np.linalg.norm(vector)


def entry(text: str, seed: int, partition: str = "p", ttl_s: float = 60.0, answer: bytes = b"{}") -> Entry:
    now = time.time()
    return Entry(partition, text, unit(seed), answer, now, now + ttl_s)


def test_ttl_expires_entries_and_a_hit_does_not_extend_them() -> None:
    store = Store(1 << 20, threshold=0.9)
    kept = entry("What is the capital of France?", 1, ttl_s=60)
    store.put(kept)
    assert store.search("p", kept.text, kept.vector).entry is kept
    assert store.search("p", kept.text, kept.vector, now=kept.expires + 1).entry is None
    assert len(store) == 0


def test_eviction_by_bytes_drops_the_least_recently_used() -> None:
    size = entry("q0", 0, answer=b"x" * 1000).nbytes
    store = Store(3 * size, threshold=0.9)
    entries = [entry(f"q{i}", i, answer=b"x" * 1000) for i in range(3)]
    for item in entries:
        store.put(item)
    assert store.get(entries[0].id) is entries[0]  # used: now the most recent
    store.put(entry("q3", 3, answer=b"x" * 1000))
    assert store.get(entries[1].id) is None and store.get(entries[0].id) is not None
    assert store.bytes <= 3 * size and len(store) == 3
    store.put(entry("big", 4, answer=b"x" * 2500))  # one large entry pushes out two
    assert len(store) == 2 and store.bytes <= 3 * size


def test_entries_survive_a_restart(tmp_path: Path) -> None:
    log = DiskLog(tmp_path / "cache.sqlite")
    items = [entry(f"question {i}", i) for i in range(5)] + [entry("old", 9, ttl_s=-1)]
    log.put(items)
    log.delete([items[0].id])
    log.close()
    loaded = DiskLog(tmp_path / "cache.sqlite").load(time.time())
    assert [e.text for e in loaded] == [f"question {i}" for i in range(1, 5)]
    assert np.array_equal(loaded[0].vector, items[1].vector) and loaded[0].answer == items[1].answer


WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from aiinfra.route.cache.persist import DiskLog
    from aiinfra.route.cache.store import Entry
    log = DiskLog(sys.argv[1])
    i = 0
    while True:
        now = time.time()
        batch = [Entry("p", f"q{i}-{j}", np.ones(384, np.float32), b"a" * 20000, now, now + 60) for j in range(20)]
        log.put(batch)
        i += 1
        print(i, flush=True)
""")


def test_sigkill_during_writes_leaves_a_cache_that_opens(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    for _ in range(5):  # a few committed batches, then kill it while it writes the next ones
        writer.stdout.readline()
    writer.kill()
    writer.wait(10)
    assert sqlite3.connect(str(path)).execute("PRAGMA integrity_check").fetchone() == ("ok",)
    loaded = DiskLog(path).load(time.time())
    assert len(loaded) >= 100 and len(loaded) % 20 == 0  # whole transactions only
    assert all(e.answer == b"a" * 20000 for e in loaded)


def test_partitions_and_bypasses() -> None:
    config = CacheConfig(enabled=True)

    def key(body: dict, headers: dict | None = None, chat: bool = True, tenant: str | None = None):
        planned = plan(body, chat, "m", headers or {}, config, tenant)
        return planned if isinstance(planned, str) else planned.partition

    user = {"role": "user", "content": "Why is the sky blue?"}
    base = {"messages": [user], "temperature": 0}
    assert key(base) == key(base | {"stream": True, "user": "someone"})
    assert key(base) != key(base | {"messages": [{"role": "system", "content": "Be brief."}, user]})
    assert key(base) != key(base | {"max_tokens": 5}) != key(base | {"seed": 1})
    assert key(base, tenant="a") != key(base, tenant="b")
    assert key(base) != key({"prompt": "Why is the sky blue?", "temperature": 0}, chat=False)
    assert key(base | {"temperature": 0.5}) == "temperature"
    assert key({"messages": [user]}) == "temperature"  # OpenAI's default temperature is 1
    assert key(base | {"temperature": 0.5}, {"x-aiinfra-cache": "use"}) != "temperature"
    assert key(base | {"tools": [{"type": "function"}]}) == "unsupported"
    assert key(base | {"stream": True, "n": 2}) == "unsupported"
    assert key(base, {"cache-control": "no-cache, no-store"}) == "cache-control"


@pytest.mark.parametrize(("a", "b", "reason"), [
    ("How do I switch on the VPN on my Mac?", "How do I switch off the VPN on my Mac?", "polarity"),
    ("Can I freeze cooked rice?", "Can't I freeze cooked rice?", "negation"),
    ("Show the orders placed after March", "Show the orders placed before March", "polarity"),
    ("What is 12 inches in cm?", "What is 12 cm in inches?", "units"),
    ("Give me 3 tips for public speaking", "Give me 5 tips for public speaking", "numbers"),
    ("How do I call a C function from Rust?", "How do I call a Rust function from C?", "order"),
    ("Does Kafka guarantee ordering?", "Does RabbitMQ guarantee ordering?", "names"),
    ("Why did my pod restart?", "When did my pod restart?", "question"),
])
def test_the_guard_rejects_near_opposites_it_never_saw(a: str, b: str, reason: str) -> None:
    assert mismatch(a, b) == reason


@pytest.mark.parametrize(("a", "b"), [
    ("How do I switch on the VPN on my Mac?", "How can I turn on the VPN on my Mac?"),
    ("Can I freeze cooked rice?", "Is it possible to freeze cooked rice?"),
    ("How do I call a C function from Rust?", "From Rust, how can I call a C function?"),
    ("Give me 3 tips for public speaking", "What are 3 tips for public speaking?"),
])
def test_the_guard_lets_paraphrases_through(a: str, b: str) -> None:
    assert mismatch(a, b) is None


def test_lookups_that_arrive_together_are_embedded_in_one_batch() -> None:
    import asyncio

    from aiinfra.route.cache.embed import BatchingEmbedder

    class Recorder:
        def __init__(self) -> None:
            self.batches: list[int] = []

        def encode(self, texts: list[str]) -> np.ndarray:
            time.sleep(0.01)
            self.batches.append(len(texts))
            return np.stack([unit(len(text)) for text in texts])

    recorder = Recorder()
    embedder = BatchingEmbedder(recorder)  # type: ignore[arg-type]

    async def together() -> list[np.ndarray]:
        return await asyncio.gather(*(embedder.embed("x" * i) for i in range(1, 9)))

    vectors = asyncio.run(together())
    embedder.close()
    assert sum(recorder.batches) == 8 and len(recorder.batches) <= 2
    assert np.array_equal(vectors[3], unit(4))


def test_bad_cache_config_names_the_key() -> None:
    from aiinfra.config import ConfigError
    from aiinfra.route.fleet import parse_fleet

    backend = [{"name": "b", "url": "http://127.0.0.1:1", "model": "m"}]
    with pytest.raises(ConfigError, match=r"cache\.target_false_hit_rate"):
        parse_fleet({"cache": {"enabled": True, "target_false_hit_rate": 2}, "backend": backend})
    with pytest.raises(ConfigError, match=r"cache\.redis_url"):
        parse_fleet({"cache": {"redis_url": "localhost:6379"}, "backend": backend})
    with pytest.raises(ConfigError, match=r"cache\.size: unknown key"):
        parse_fleet({"cache": {"size": 1}, "backend": backend})


def test_an_enabled_cache_without_its_packages_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from aiinfra.config import ConfigError
    from aiinfra.route.app import check_cache
    from aiinfra.route.fleet import parse_fleet

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hnswlib" else real(name, *a))
    backend = [{"name": "b", "url": "http://127.0.0.1:1", "model": "m"}]
    check_cache(parse_fleet({"backend": backend}))  # disabled: nothing is needed
    with pytest.raises(ConfigError, match=r"cache\.enabled: needs the cache extra.*missing: hnswlib"):
        check_cache(parse_fleet({"cache": {"enabled": True}, "backend": backend}))
