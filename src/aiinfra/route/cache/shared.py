"""The shared tier: entries in Redis, so that several gateway processes (on one machine or many) answer each
other's questions.

An entry is one Redis string with the entry's TTL; every change is also appended to a Redis stream that each
gateway follows, adding remote entries to its own index (so a lookup never waits on Redis) and applying remote
invalidations. On start a gateway reads every live entry first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Callable

import numpy as np
import orjson

from aiinfra.route.cache.store import Entry

log = logging.getLogger("aiinfra.route.cache")
STREAM_MAX = 100_000


def encode_entry(entry: Entry) -> bytes:
    """One Redis value: a JSON header line, then the vector's bytes, then the answer."""
    header = orjson.dumps({"id": entry.id, "partition": entry.partition, "text": entry.text,
                           "created": entry.created, "expires": entry.expires, "dim": int(entry.vector.size)})
    return header + b"\n" + entry.vector.astype(np.float32).tobytes() + entry.answer


def decode_entry(value: bytes) -> Entry:
    end = value.index(b"\n")
    header = orjson.loads(value[:end])
    vector_end = end + 1 + 4 * header["dim"]
    vector = np.frombuffer(value[end + 1 : vector_end], dtype=np.float32).copy()
    return Entry(header["partition"], header["text"], vector, value[vector_end:], header["created"],
                 header["expires"], header["id"])


class SharedTier:
    """A gateway's link to the shared Redis."""

    def __init__(self, url: str, prefix: str, apply_put: Callable[[Entry], None],
                 apply_delete: Callable[[list[str]], None], apply_prefix: Callable[[str], None]):
        import redis.asyncio

        self.client = redis.asyncio.Redis.from_url(url)
        self.prefix = prefix
        self.stream = f"{prefix}:log"
        self.origin = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.apply_put, self.apply_delete, self.apply_prefix = apply_put, apply_delete, apply_prefix
        self.follower: asyncio.Task | None = None

    def key(self, entry_id: str) -> str:
        return f"{self.prefix}:e:{entry_id}"

    async def start(self, now: float) -> None:
        """Read every live entry, then follow the changes from that moment on."""
        last = await self.client.xrevrange(self.stream, count=1)
        last_id = last[0][0] if last else b"0-0"
        async for key in self.client.scan_iter(match=f"{self.prefix}:e:*", count=1000):
            value = await self.client.get(key)
            if value is not None:
                entry = decode_entry(value)
                if entry.expires > now:
                    self.apply_put(entry)
        self.follower = asyncio.get_running_loop().create_task(self._follow(last_id))

    async def _follow(self, last_id: bytes) -> None:
        while True:
            try:
                replies = await self.client.xread({self.stream: last_id}, block=1000, count=256)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - Redis went away: retry, the gateway keeps serving
                log.warning("shared cache: reading %s failed: %s", self.stream, error)
                await asyncio.sleep(1.0)
                continue
            for _, messages in replies:
                for message_id, fields in messages:
                    last_id = message_id
                    if fields.get(b"origin", b"").decode() != self.origin:
                        await self._apply(fields)

    async def _apply(self, fields: dict[bytes, bytes]) -> None:
        op, arg = fields.get(b"op", b"").decode(), fields.get(b"arg", b"").decode()
        if op == "put":
            value = await self.client.get(self.key(arg))
            if value is not None:
                self.apply_put(decode_entry(value))
        elif op == "del":
            self.apply_delete(arg.split(","))
        elif op == "prefix":
            self.apply_prefix(arg)

    async def _publish(self, op: str, arg: str) -> None:
        await self.client.xadd(self.stream, {"op": op, "arg": arg, "origin": self.origin}, maxlen=STREAM_MAX,
                               approximate=True)

    async def put(self, entry: Entry, ttl_s: float) -> None:
        await self.client.set(self.key(entry.id), encode_entry(entry), px=max(1, int(ttl_s * 1000)))
        await self._publish("put", entry.id)

    async def delete(self, keys: list[str]) -> None:
        if keys:
            await self.client.delete(*(self.key(key) for key in keys))
            await self._publish("del", ",".join(keys))

    async def invalidate_prefix(self, prefix: str, keys: list[str]) -> None:
        if keys:
            await self.client.delete(*(self.key(key) for key in keys))
        await self._publish("prefix", prefix)

    async def close(self) -> None:
        if self.follower is not None:
            self.follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.follower
        await self.client.aclose()
