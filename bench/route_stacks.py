"""Why the gateway is built on aiohttp: the same pass-through streaming proxy on several Python HTTP stacks, and the
gateway itself, in front of bench/route.py's canned backend.

Stacks: aiohttp's server with aiohttp's client; FastAPI (on uvicorn, httptools, uvloop) with aiohttp's client;
FastAPI with httpx; a raw ASGI app on uvicorn with aiohttp's client; and `aiinfra route` (which also parses,
routes, counts and can fail over). Each serves streamed completions at --rate requests/s, open loop, for --seconds,
the stacks interleaved over --rounds; reported: the proxy process's CPU time per request (user + system, from
/proc) and the request p50/p99 at the client (medians over rounds).

    python bench/route_stacks.py [--rate 500] [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from route import free_port, offered_load, start_gateway, wait_listening

STACKS = {
    "aiohttp": """
import aiohttp, sys, uvloop
from aiohttp import web
UP = f"http://127.0.0.1:{sys.argv[1]}/v1/completions"
async def proxy(request):
    body = await request.read()
    async with request.app["client"].post(UP, data=body, headers={"content-type": "application/json"}) as up:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        while chunk := await up.content.readany():
            await response.write(chunk)
        await response.write_eof()
        return response
async def client(app):
    app["client"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await app["client"].close()
app = web.Application()
app.cleanup_ctx.append(client)
app.router.add_post("/v1/completions", proxy)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), print=None, access_log=None, loop=uvloop.new_event_loop())
""",
    "fastapi+aiohttp": """
import aiohttp, sys, uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
UP = f"http://127.0.0.1:{sys.argv[1]}/v1/completions"
app, state = FastAPI(), {}
@app.post("/v1/completions")
async def proxy(request: Request):
    if "client" not in state:
        state["client"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    up = await state["client"].post(UP, data=await request.body(), headers={"content-type": "application/json"})
    async def relay():
        try:
            while chunk := await up.content.readany():
                yield chunk
        finally:
            up.release()
    return StreamingResponse(relay(), media_type="text/event-stream")
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", loop="uvloop", http="httptools")
""",
    "fastapi+httpx": """
import httpx, sys, uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
UP = f"http://127.0.0.1:{sys.argv[1]}/v1/completions"
app, state = FastAPI(), {}
@app.post("/v1/completions")
async def proxy(request: Request):
    if "client" not in state:
        state["client"] = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=512))
    up = await state["client"].send(state["client"].build_request(
        "POST", UP, content=await request.body(), headers={"content-type": "application/json"}), stream=True)
    async def relay():
        try:
            async for chunk in up.aiter_raw():
                yield chunk
        finally:
            await up.aclose()
    return StreamingResponse(relay(), media_type="text/event-stream")
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", loop="uvloop", http="httptools")
""",
    "asgi+aiohttp": """
import aiohttp, sys, uvicorn
UP = f"http://127.0.0.1:{sys.argv[1]}/v1/completions"
state = {}
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if "client" not in state:
        state["client"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    body, more = b"", True
    while more:
        message = await receive()
        body, more = body + message.get("body", b""), message.get("more_body", False)
    async with state["client"].post(UP, data=body, headers={"content-type": "application/json"}) as up:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        while chunk := await up.content.readany():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", loop="uvloop", http="httptools")
""",
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="aiinfra-bench-stacks-"))
    backend_port = free_port()
    backend = subprocess.Popen([sys.executable, str(Path(__file__).with_name("route.py")), "--backend",
                                str(backend_port)])
    processes = {}
    try:
        wait_listening(backend_port, backend)
        for name, source in STACKS.items():
            script, port = workdir / f"stack_{name.replace('+', '_')}.py", free_port()
            script.write_text(source)
            processes[name] = (port, subprocess.Popen([sys.executable, str(script), str(backend_port), str(port)]))
        port = free_port()
        processes["aiinfra route"] = (port, start_gateway(workdir, port, backend_port))
        for port, process in processes.values():
            wait_listening(port, process)
        time.sleep(1.0)
        rows: dict[str, list[dict]] = {name: [] for name in processes}
        for round_index in range(args.rounds):
            for name, (port, process) in processes.items():
                before = cpu_seconds(process.pid)
                result = uvloop.run(offered_load(f"http://127.0.0.1:{port}/v1/completions", args.rate, args.seconds,
                                                 seed=round_index))
                used = cpu_seconds(process.pid) - before
                rows[name].append({"cpu_us": 1e6 * used / result["sent"], "p50": result["e2e_p50_ms"],
                                   "p99": result["e2e_p99_ms"], "errors": result["errors"]})
    finally:
        for _, process in processes.values():
            process.terminate()
        backend.terminate()
    print(f"\n| stack ({args.rate:.0f} req/s) | CPU per request (ms) | request p50 / p99 (ms) | errors |")
    print("|---|---|---|---|")
    summary = {}
    for name, results in rows.items():
        cpu = statistics.median(row["cpu_us"] for row in results) / 1000
        p50 = statistics.median(row["p50"] for row in results)
        p99 = statistics.median(row["p99"] for row in results)
        print(f"| {name} | {cpu:.3f} | {p50:.2f} / {p99:.2f} | {sum(row['errors'] for row in results)} |")
        summary[f"{name.replace(' ', '_').replace('+', '_')}_cpu_ms_per_request"] = round(cpu, 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
