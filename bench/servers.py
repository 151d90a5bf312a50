"""What the benchmarks that start servers share: a free port, and waiting for a server to answer its health check.

The scripts in bench/ run as `python bench/NAME.py`, which puts this folder first on the import path.
"""

from __future__ import annotations

import socket
import subprocess
import time

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, path: str = "/health", timeout_s: float = 300) -> None:
    """Return once `url + path` answers 200; a RuntimeError if `process` exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({process.returncode}): {process.args}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url}: not healthy after {timeout_s:.0f} s")
