"""What the gateway adds: latency (p50 and p99 of TTFT and of whole requests) against calling the backend directly,
with nginx proxying the same backend in the same run as the floor, and the highest rate one gateway process holds.

Workload: streamed completions (4 chunks each) from a canned-answer backend (raw asyncio on uvloop, far faster than
any model server, so that the proxy is what is measured), open-loop Poisson arrivals at each --rates value for
--seconds, the three paths measured one after the other in each of --rounds rounds; "added" is the median over
rounds of (proxy percentile - direct percentile) in the same round. nginx (Debian's package): one worker, HTTP/1.1
keep-alive to the backend, proxy_buffering off (what a streaming proxy needs). nginx and the gateway are pinned to
one CPU (--proxy-cpu), the backend and the load generator to the others. Max rate: the offered rate is raised
until a round has an error, delivers under 97% of the offered rate, or its p99 passes 50 ms.

    python bench/route.py [--rates 100 250 500 1000] [--seconds 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import uvloop

from servers import free_port

ROOT = Path(__file__).resolve().parent.parent
BODY = json.dumps({"model": "tiny", "prompt": "hello there", "max_tokens": 4, "stream": True}).encode()


def canned_answer() -> bytes:
    chunks = [json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "tiny",
                          "choices": [{"index": 0, "text": f" word{i}", "logprobs": None,
                                       "finish_reason": "length" if i == 3 else None}]}) for i in range(4)]
    body = b"".join(f"data: {chunk}\n\n".encode() for chunk in chunks) + b"data: [DONE]\n\n"
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    return head + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"


def run_backend(port: int) -> None:
    """The canned backend: every POST gets the same 4-chunk stream; GETs get a small JSON answer."""
    stream = canned_answer()
    small = b'{"status": "ok", "data": [{"id": "tiny", "owned_by": "bench"}]}'
    get = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(small), small)

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport, self.buffer = transport, b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
                head = self.buffer[:end].decode("latin-1")
                length = next((int(line.split(":", 1)[1]) for line in head.split("\r\n")[1:]
                               if line.lower().startswith("content-length:")), 0)
                if len(self.buffer) < end + 4 + length:
                    return
                self.buffer = self.buffer[end + 4 + length :]
                self.transport.write(stream if head.startswith("POST") else get)  # type: ignore[attr-defined]

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Protocol, "127.0.0.1", port, backlog=4096)
        await server.serve_forever()

    uvloop.run(main())


PROXY_CPUS: set[int] = set()  # where nginx and the gateway run (the backend and the load elsewhere): --proxy-cpu


def pin(cpus: set[int]):  # noqa: ANN201 - a preexec_fn
    """A preexec_fn that pins the child to `cpus` (no pinning when empty)."""
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def wait_listening(port: int, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process {process.args} exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def start_nginx(workdir: Path, port: int, backend_port: int) -> subprocess.Popen:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise SystemExit("nginx is not installed: apt-get install -y nginx")
    temp = workdir / "nginx-temp"
    temp.mkdir(parents=True, exist_ok=True)
    config = workdir / "nginx.conf"
    config.write_text(f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {temp}; proxy_temp_path {temp}; fastcgi_temp_path {temp};
    uwsgi_temp_path {temp}; scgi_temp_path {temp};
    upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
""")
    return subprocess.Popen([nginx, "-c", str(config), "-p", str(workdir)], stderr=subprocess.DEVNULL,
                            preexec_fn=pin(PROXY_CPUS))


def start_gateway(workdir: Path, port: int, backend_port: int) -> subprocess.Popen:
    fleet = workdir / "fleet.toml"
    fleet.write_text(f'[gateway]\npolicy = "least_outstanding"\nhealth_interval_s = 0.5\n\n[[backend]]\n'
                     f'name = "canned"\nurl = "http://127.0.0.1:{backend_port}"\nmodel = "tiny"\n')
    return subprocess.Popen([sys.executable, "-m", "aiinfra", "route", str(fleet), "--port", str(port)],
                            stdout=subprocess.DEVNULL, preexec_fn=pin(PROXY_CPUS))


async def one_request(session: aiohttp.ClientSession, url: str, results: dict) -> None:
    start = time.perf_counter()
    try:
        async with session.post(url, data=BODY, headers={"content-type": "application/json"}) as response:
            if response.status != 200:
                results["errors"] += 1
                return
            first, done = None, False
            async for line in response.content:  # to the end of the body, as clients do: the connection is reused
                if first is None and line.startswith(b"data:"):
                    first = time.perf_counter()
                done = done or line.startswith(b"data: [DONE]")
            if not done:
                results["errors"] += 1
                return
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        results["errors"] += 1
        return
    end = time.perf_counter()
    results["ttft"].append((first or end) - start)
    results["e2e"].append(end - start)


async def offered_load(url: str, rate: float, seconds: float, seed: int) -> dict:
    """Open-loop Poisson arrivals at `rate` for `seconds`; latencies in ms and the delivered rate."""
    rng = random.Random(seed)
    results: dict = {"ttft": [], "e2e": [], "errors": 0}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        await one_request(session, url, {"ttft": [], "e2e": [], "errors": 0})  # open a connection first
        tasks, start = [], time.perf_counter()
        next_at = 0.0
        while next_at < seconds:
            delay = start + next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(session, url, results)))
            next_at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    ms = {key: sorted(1000 * value for value in results[key]) for key in ("ttft", "e2e")}

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("inf")

    return {"rate": rate, "sent": len(tasks), "errors": results["errors"], "delivered_rps": len(ms["e2e"]) / elapsed,
            "ttft_p50_ms": pct(ms["ttft"], 0.5), "ttft_p99_ms": pct(ms["ttft"], 0.99),
            "e2e_p50_ms": pct(ms["e2e"], 0.5), "e2e_p99_ms": pct(ms["e2e"], 0.99)}


def measure(urls: dict[str, str], rates: list[float], seconds: float, rounds: int) -> dict:
    """Per rate and path, the rounds' results; paths alternate within each round."""
    table: dict = {rate: {path: [] for path in urls} for rate in rates}
    for round_index in range(rounds):
        for rate in rates:
            for path, url in urls.items():
                table[rate][path].append(uvloop.run(offered_load(url, rate, seconds, seed=round_index)))
    return table


def added(rows: list[dict], direct: list[dict], key: str) -> float:
    return statistics.median(row[key] - base[key] for row, base in zip(rows, direct))


def max_rate(url: str, seconds: float) -> float:
    """The highest offered rate delivered without errors, at >= 97% of the offer and with p99 under 50 ms."""
    best = 0.0
    for rate in (500, 1000, 1500, 2000, 2500, 3000, 4000, 5000):
        result = uvloop.run(offered_load(url, rate, seconds, seed=rate))
        ok = result["errors"] == 0 and result["delivered_rps"] >= 0.97 * rate and result["e2e_p99_ms"] < 50
        print(f"  gateway at {rate} req/s offered: delivered {result['delivered_rps']:.0f}, errors "
              f"{result['errors']}, p99 {result['e2e_p99_ms']:.1f} ms -> {'holds' if ok else 'does not hold'}")
        if not ok:
            break
        best = rate
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[100, 250, 500, 1000])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--proxy-cpu", type=int, default=1 if len(os.sched_getaffinity(0)) > 1 else -1,
                        help="pin nginx and the gateway to this CPU, the backend and the load to the others (-1: off)")
    parser.add_argument("--backend", type=int, help=argparse.SUPPRESS)  # internal: run the canned backend
    args = parser.parse_args()
    if args.backend:
        run_backend(args.backend)
        return
    if args.proxy_cpu >= 0:
        PROXY_CPUS.add(args.proxy_cpu)
        os.sched_setaffinity(0, os.sched_getaffinity(0) - PROXY_CPUS)  # the load; the backend inherits it
    workdir = Path(tempfile.mkdtemp(prefix="aiinfra-bench-route-"))
    ports = {"backend": free_port(), "nginx": free_port(), "gateway": free_port()}
    processes = [subprocess.Popen([sys.executable, __file__, "--backend", str(ports["backend"])])]
    try:
        wait_listening(ports["backend"], processes[0])
        processes.append(start_nginx(workdir, ports["nginx"], ports["backend"]))
        processes.append(start_gateway(workdir, ports["gateway"], ports["backend"]))
        for name in ("nginx", "gateway"):
            wait_listening(ports[name], processes[-1 if name == "gateway" else 1])
        time.sleep(1.0)  # the gateway's first health check
        urls = {path: f"http://127.0.0.1:{ports[path]}/v1/completions" for path in ("backend", "nginx", "gateway")}
        table = measure(urls, args.rates, args.seconds, args.rounds)
        print("\n| rate (req/s) | path | TTFT p50 / p99 (ms) | request p50 / p99 (ms) | added TTFT p50 / p99 | "
              "added request p50 / p99 | errors |")
        print("|---|---|---|---|---|---|---|")
        summary = {}
        for rate in args.rates:
            direct = table[rate]["backend"]
            for path in urls:
                rows = table[rate][path]
                med = {key: statistics.median(row[key] for row in rows)
                       for key in ("ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms")}
                plus = {key: added(rows, direct, key) for key in med}
                errors = sum(row["errors"] for row in rows)
                print(f"| {rate:.0f} | {path} | {med['ttft_p50_ms']:.2f} / {med['ttft_p99_ms']:.2f} | "
                      f"{med['e2e_p50_ms']:.2f} / {med['e2e_p99_ms']:.2f} | "
                      + ("- | - |" if path == "backend" else
                         f"{plus['ttft_p50_ms']:+.2f} / {plus['ttft_p99_ms']:+.2f} | "
                         f"{plus['e2e_p50_ms']:+.2f} / {plus['e2e_p99_ms']:+.2f} |") + f" {errors} |")
                summary[(rate, path)] = plus
        print("\nmax rate, one gateway process:")
        best = max_rate(urls["gateway"], args.seconds)
        at = 500.0 if 500.0 in args.rates else args.rates[-1]
        print(json.dumps({
            "rate_rps": at,
            "gateway_added_p50_ms": round(summary[(at, "gateway")]["e2e_p50_ms"], 3),
            "gateway_added_p99_ms": round(summary[(at, "gateway")]["e2e_p99_ms"], 3),
            "gateway_added_ttft_p50_ms": round(summary[(at, "gateway")]["ttft_p50_ms"], 3),
            "gateway_added_ttft_p99_ms": round(summary[(at, "gateway")]["ttft_p99_ms"], 3),
            "nginx_added_p50_ms": round(summary[(at, "nginx")]["e2e_p50_ms"], 3),
            "nginx_added_p99_ms": round(summary[(at, "nginx")]["e2e_p99_ms"], 3),
            "max_rps_per_process": best,
        }))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
