"""`aiinfra dashboard`: a local page with live plots of training runs, servers and the gateway.

FastAPI serves the page, its script and the vendored chart library (uPlot, MIT, in observe/static: nothing is
fetched from a CDN); a background thread polls every source each `interval_s` and `/api/data` hands the page the
latest series. The page draws what users would scrape themselves: run directories' JSONL and /metrics endpoints.
"""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from aiinfra.observe.dashboard_data import RunSource, ScrapeSource

STATIC = Path(__file__).with_name("static")


class Collector:
    """Polls every source on a thread of its own; `snapshot()` is what the page gets."""

    def __init__(self, run_dirs: list[Path], scrape_urls: list[str], interval_s: float):
        self.runs = [RunSource(Path(run_dir)) for run_dir in run_dirs]
        self.scrapes = [ScrapeSource(url) for url in scrape_urls]
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dashboard-poll", daemon=True)

    def poll(self, client: httpx.Client) -> None:
        """Read every source once."""
        with self._lock:
            for source in (*self.runs, *self.scrapes):
                source.poll(client) if isinstance(source, ScrapeSource) else source.poll()

    def _loop(self) -> None:
        with httpx.Client(timeout=max(self.interval_s, 2.0)) as client:
            while not self._stop.is_set():
                self.poll(client)
                self._stop.wait(self.interval_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "runs": [run.snapshot() for run in self.runs],
                "scrapes": [scrape.snapshot() for scrape in self.scrapes],
                "interval_s": self.interval_s,
            }


def create_app(collector: Collector) -> FastAPI:
    """The dashboard's FastAPI app over `collector` (started and stopped with the app)."""

    async def lifespan(app: FastAPI):  # noqa: ANN202 - FastAPI's lifespan protocol
        collector.start()
        yield
        collector.stop()

    app = FastAPI(title="aiinfra dashboard", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(STATIC / "dashboard.html")

    @app.get("/api/data")
    def data() -> JSONResponse:
        return JSONResponse(collector.snapshot())

    return app


def check_sources(run_dirs: list[Path], scrape_urls: list[str]) -> None:
    """A ValueError naming the first source that cannot be one."""
    for run_dir in run_dirs:
        if not Path(run_dir).is_dir():
            raise ValueError(f"RUN_DIR {str(run_dir)!r} is not a directory")
    for url in scrape_urls:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--scrape {url!r}: expected an http:// or https:// URL of a /metrics endpoint")
    if not run_dirs and not scrape_urls:
        raise ValueError("nothing to show: give RUN_DIR arguments and/or --scrape URL")


def serve_dashboard(run_dirs: list[Path], scrape_urls: list[str], host: str, port: int, interval_s: float) -> None:
    """Run the dashboard until interrupted; port 0 picks a free one. Prints its URL once it listens."""
    check_sources(run_dirs, scrape_urls)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    app = create_app(Collector(run_dirs, scrape_urls, interval_s))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    print(f"dashboard at http://{host}:{sock.getsockname()[1]}/", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
