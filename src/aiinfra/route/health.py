"""Active health checks: every backend's health endpoint each `health_interval_s`, apart from passive detection.

A check that fails (no answer within `health_timeout_s`, or any status but 200) marks the backend down at once;
the first one that passes marks it up again. An aiinfra server's /health also reports its waiting requests and
KV-cache use, which the queue and KV scorers read. A check never touches the load counters.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import orjson

from aiinfra.route.gateway import Gateway
from aiinfra.route.state import BackendState


async def detect_server(session: aiohttp.ClientSession, backend: BackendState, timeout_s: float) -> None:
    """An aiinfra server says so in /v1/models (`owned_by`); its streams can then be continued exactly."""
    if backend.config.server != "auto":
        return
    try:
        async with session.get(backend.config.url + "/v1/models", headers=_auth(backend),
                               timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            models = orjson.loads(await response.read()).get("data", [])
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, orjson.JSONDecodeError, AttributeError):
        return
    if isinstance(models, list):
        owners = {model.get("owned_by") for model in models if isinstance(model, dict)}
        backend.server = "aiinfra" if owners == {"aiinfra"} else "openai"


def _auth(backend: BackendState) -> dict[str, str]:
    key = backend.config.key()
    return {"authorization": f"Bearer {key}"} if key else {}


async def check(gateway: Gateway, backend: BackendState) -> None:
    """One health check of one backend."""
    assert gateway.session is not None
    timeout = aiohttp.ClientTimeout(total=gateway.config.health_timeout_s)
    was_up = backend.up
    try:
        async with gateway.session.get(backend.config.url + backend.config.health_path, headers=_auth(backend),
                                       timeout=timeout) as response:
            payload = await response.read()
            healthy = response.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        healthy, payload = False, b""
    if healthy:
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            status = orjson.loads(payload) if payload else {}
            backend.waiting = int(status["waiting"]) if "waiting" in status else None
            backend.kv_cache_usage = float(status["kv_cache_usage"]) if "kv_cache_usage" in status else None
        if not was_up or not backend.checked:  # a restarted backend may be another server
            await detect_server(gateway.session, backend, gateway.config.health_timeout_s)
        backend.checked = True
    backend.up = healthy


async def health_loop(gateway: Gateway) -> None:
    """Check every backend each interval, all at once, until cancelled."""
    interval = gateway.config.health_interval_s
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.gather(*(check(gateway, backend) for backend in gateway.backends))
        await asyncio.sleep(max(0.0, interval - (loop.time() - started)))
