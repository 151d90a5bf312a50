"""The semantic cache of one gateway process: look up, store, invalidate; the index in memory, the entries on
disk and in the shared tier written off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from aiinfra.observe.route_metrics import RouteMetrics
from aiinfra.route.cache.calibration import threshold_for
from aiinfra.route.cache.embed import BatchingEmbedder, Encoder
from aiinfra.route.cache.keys import Plan
from aiinfra.route.cache.persist import DiskLog
from aiinfra.route.cache.store import Entry, Store
from aiinfra.route.fleet import CacheConfig

log = logging.getLogger("aiinfra.route.cache")


class SemanticCache:
    """Lookups and stores for the gateway's request path."""

    def __init__(self, config: CacheConfig, metrics: RouteMetrics, encoder: Encoder | None = None):
        self.config, self.metrics = config, metrics
        self.threshold = threshold_for(config.target_false_hit_rate)
        self.store = Store(config.max_bytes, self.threshold, on_evict=self._evicted)
        self.encoder = encoder
        self.embedder: BatchingEmbedder | None = None
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="aiinfra-cache-disk")
        self.disk: DiskLog | None = None
        self.shared = None
        self.tasks: set[asyncio.Task] = set()
        self.sweeper: asyncio.Task | None = None
        metrics.cache_entries.set_function(lambda: len(self.store))
        metrics.cache_bytes.set_function(lambda: self.store.bytes)

    async def start(self) -> None:
        """Load the model, the entries on disk and those in the shared tier (before the gateway serves)."""
        loop = asyncio.get_running_loop()
        if self.encoder is None:
            self.encoder = await loop.run_in_executor(self.writer, Encoder)
        self.embedder = BatchingEmbedder(self.encoder)
        now = time.time()
        if self.config.path:
            self.disk = await loop.run_in_executor(self.writer, DiskLog, Path(self.config.path))
            for entry in await loop.run_in_executor(self.writer, self.disk.load, now):
                self.store.put(entry)
        if self.config.redis_url:
            from aiinfra.route.cache.shared import SharedTier

            self.shared = SharedTier(self.config.redis_url, self.config.redis_prefix, self.store.put,
                                     self._remote_delete, self._remote_prefix)
            await self.shared.start(now)
        self.sweeper = loop.create_task(self._sweep())

    async def close(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.sweeper
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.shared is not None:
            await self.shared.close()
        if self.embedder is not None:
            self.embedder.close()
        if self.disk is not None:
            await asyncio.get_running_loop().run_in_executor(self.writer, self.disk.close)
        self.writer.shutdown(wait=True)

    # -- the request path ---------------------------------------------------------------------------------------

    async def lookup(self, plan: Plan) -> tuple[Entry | None, np.ndarray | None]:
        """The entry that answers the request (an exact repeat first, then the nearest that passes the guard),
        and the request's vector for storing its answer (None after an exact hit, which needs no embedding)."""
        started = time.perf_counter()
        exact = self.exact(plan)
        if exact is not None:
            return exact, None
        return await self.semantic(plan, started)

    def exact(self, plan: Plan) -> Entry | None:
        """The entry for this very question, if there is one (no embedding: microseconds)."""
        started = time.perf_counter()
        metrics = self.metrics
        metrics.cache_lookups.inc()
        exact = self.store.get(plan.key)
        if exact is not None:
            metrics.child(metrics.cache_hits, "exact").inc()
            metrics.cache_lookup_seconds.observe(time.perf_counter() - started)
        return exact

    async def semantic(self, plan: Plan, started: float) -> tuple[Entry | None, np.ndarray]:
        """After `exact` found nothing: the nearest entry that passes the guard, and the request's vector."""
        assert self.embedder is not None
        metrics = self.metrics
        vector = await self.embedder.embed(plan.text)
        found = self.store.search(plan.partition, plan.text, vector)
        if found.rejected:
            metrics.cache_guard_rejections.inc(found.rejected)
        if found.entry is not None:
            metrics.child(metrics.cache_hits, "semantic").inc()
        else:
            metrics.cache_misses.inc()
        metrics.cache_lookup_seconds.observe(time.perf_counter() - started)
        return found.entry, vector

    async def vector(self, text: str) -> np.ndarray:
        assert self.embedder is not None
        return await self.embedder.embed(text)

    def save(self, plan: Plan, vector: np.ndarray, record: bytes) -> Entry:
        """Store an answer now (in memory) and on disk and in the shared tier in the background."""
        now = time.time()
        entry = Entry(plan.partition, plan.text, vector, record, now, now + self.config.ttl_s)
        self.store.put(entry)
        self.metrics.cache_stores.inc()
        if self.disk is not None:
            self.writer.submit(self.disk.put, [entry])
        if self.shared is not None:
            self._background(self.shared.put(entry, self.config.ttl_s))
        return entry

    # -- invalidation and expiry --------------------------------------------------------------------------------

    async def invalidate(self, key: str | None = None, prefix: str | None = None) -> int:
        """Drop the entry with this key, or every entry whose question starts with `prefix`, here and in the
        shared tier; the number dropped here."""
        dropped = [self.store.remove(key)] if key else [self.store.remove(e.id) for e in self.store.matching(prefix)]
        keys = [entry.id for entry in dropped if entry is not None]
        if key and not keys:
            keys = [key]  # another gateway may hold it
        self._forget_on_disk(keys)
        if self.shared is not None:
            if prefix is not None and not key:
                await self.shared.invalidate_prefix(prefix, keys)
            else:
                await self.shared.delete(keys)
        return sum(entry is not None for entry in dropped)

    def _remote_delete(self, keys: list[str]) -> None:
        for key in keys:
            self.store.remove(key)
        self._forget_on_disk(keys)

    def _remote_prefix(self, prefix: str) -> None:
        self._remote_delete([entry.id for entry in self.store.matching(prefix)])

    def _evicted(self, entries: list[Entry]) -> None:
        self.metrics.cache_evictions.inc(len(entries))
        self._forget_on_disk([entry.id for entry in entries])

    def _forget_on_disk(self, keys: list[str]) -> None:
        if self.disk is not None and keys:
            self.writer.submit(self.disk.delete, keys)

    async def _sweep(self) -> None:
        interval = min(60.0, max(0.05, self.config.ttl_s / 4))
        while True:
            await asyncio.sleep(interval)
            expired = self.store.expired()
            for entry in expired:
                self.store.remove(entry.id)
            if expired:
                self._evicted(expired)

    def _background(self, coroutine: object) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("shared cache write failed: %s", task.exception())
