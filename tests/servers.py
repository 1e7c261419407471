"""Real servers for the tests, on 127.0.0.1: `retrieval-sdk serve` in a subprocess (the real CLI with this
interpreter) or an ASGI app under uvicorn in a thread. Imported as `from ..servers import ...`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

CLI = [sys.executable, "-c", "from sdk.cli import app; app()"]  # `retrieval-sdk` with this interpreter
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 60.0, verify=True) -> None:
    """Until GET url/healthz answers 200; fails early with the server's output when it exits."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {out}")
        try:
            if httpx.get(url + "/healthz", timeout=1.0, verify=verify).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server at {url} did not come up in {timeout} s")


@contextmanager
def cli_server(args: list[str], stdout=subprocess.PIPE, env: dict | None = None, verify=True,
               timeout: float = 60.0):
    """`retrieval-sdk serve ARGS` on a free loopback port (HTTPS when ARGS pass --ssl-certfile; `verify`
    is then an ssl context trusting the certificate). Yields (url, process); SIGTERM (then kill) on exit."""
    port = free_port()
    cmd = [*CLI, "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=stdout, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    url = f"{'https' if '--ssl-certfile' in args else 'http'}://127.0.0.1:{port}"
    try:
        wait_http(url, proc, timeout=timeout, verify=verify)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout:
            proc.stdout.close()


@contextmanager
def app_in_thread(app):
    """uvicorn serving `app` on 127.0.0.1:<free port> in a thread; yields the url; always shut down."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
