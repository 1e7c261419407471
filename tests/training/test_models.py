"""Embedding models and checkpoints: config -> model -> file -> the same model."""

from __future__ import annotations

import pytest
import torch

from training.models import (CheckpointError, CheckpointMeta, EmbeddingModel, ModelConfig, load_checkpoint,
                             save_checkpoint)


@pytest.mark.parametrize("pooling,dim", [("gem", None), ("gem", 32), ("spoc", 16), ("mac", None), ("cgd", 48)])
def test_embeddings_are_unit_norm_float32_at_any_size(pooling, dim):
    model = EmbeddingModel(ModelConfig("tiny_resnet", pooling, embedding_dim=dim)).eval()
    for hw in [(64, 64), (80, 112)]:
        with torch.no_grad():
            e = model(torch.randn(3, 3, *hw))
        assert e.shape == (3, model.embedding_dim) and e.dtype == torch.float32
        assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)


def test_checkpoint_roundtrip(tmp_path):
    model = EmbeddingModel(ModelConfig("tiny_vit", "gem", embedding_dim=24, input_size=48)).eval()
    path = save_checkpoint(model, tmp_path / "m.pt", CheckpointMeta(embedding_space="space-x", role="query"))
    loaded, meta = load_checkpoint(path)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta.embedding_space == "space-x" and loaded.spec == model.spec and loaded.spec.input_size == (48, 48)


def test_not_a_checkpoint(tmp_path):
    torch.save({"weights": 1}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a retrieval-sdk checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_of_unknown_architecture(tmp_path):
    model = EmbeddingModel(ModelConfig("tiny_resnet"))
    path = save_checkpoint(model, tmp_path / "m.pt", CheckpointMeta(embedding_space="s"))
    payload = torch.load(path, weights_only=True)
    payload["config"]["backbone"] = "mystery_net"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="cannot build.*mystery_net"):
        load_checkpoint(path)


def test_unknown_pooling():
    with pytest.raises(ValueError, match="pooling must be one of"):
        ModelConfig("tiny_resnet", pooling="avg")
