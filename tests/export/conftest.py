"""Fixtures for the export tests: tiny random-init checkpoints (fast conversions) and the real photos
resized for them. The bundle with every format and precision (`bundle`, `ckpts`, `real_photos`) is in
tests/conftest.py: `retrieval-sdk evaluate`'s tests run every file of it too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SPACE = "export-test-space"
DIM = 48  # a multiple of 3: the gallery model's CGD head has 3 branches


def make_checkpoint(path: Path, backbone: str = "tiny_resnet", pooling: str = "gem", dim: int | None = DIM,
                    role: str = "query", seed: int = 0, space: str = SPACE, pretrained: bool = False,
                    input_size: int | None = None) -> Path:
    import torch

    from training.models import CheckpointMeta, EmbeddingModel, ModelConfig, save_checkpoint

    torch.manual_seed(seed)
    model = EmbeddingModel(ModelConfig(backbone, pooling, embedding_dim=dim, input_size=input_size),
                           pretrained=pretrained)
    return save_checkpoint(model.eval(), path, CheckpointMeta(embedding_space=space, role=role,
                                                               name=f"{backbone}-{pooling}"))


def rename_backbone(path: Path, name: str) -> None:
    """Rewrite a saved module file so that its config names backbone `name` (one this version lacks)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        header = dict(f.metadata())
    header["config"] = json.dumps({**json.loads(header["config"]), "backbone": name})
    save_file(load_file(str(path)), str(path), metadata=header)


def load(path: Path):
    from training.models import load_checkpoint

    return load_checkpoint(path)[0]


def torch_embed(model, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    from sdk.vectors import compare_embeddings

    return compare_embeddings(a, b)[1]


@pytest.fixture(scope="session")
def query_model(ckpts):
    return load(ckpts["query"])


@pytest.fixture(scope="session")
def photos(real_photos, query_model):
    """All real photos (UKBench + PhotoTourism), resized for the tiny query model (an ImageSet)."""
    from export.images import load_image_set

    return load_image_set(real_photos, query_model.spec)


@pytest.fixture(scope="session")
def photos_nchw(photos, query_model) -> np.ndarray:
    return photos.batch(query_model.spec)
