"""Embedding models and checkpoints: config -> model -> file -> the same model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

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


def _rewrite(path, config: dict | None = None, drop: str | None = None, add: str | None = None) -> None:
    """Edit a saved module file in place: its config, or one tensor removed / one added."""
    with safe_open(str(path), "pt") as f:
        header = dict(f.metadata())
    tensors = load_file(str(path))
    if config is not None:
        header["config"] = json.dumps(config)
    if drop:
        del tensors[drop]
    if add:
        tensors[add] = torch.zeros(2)
    save_file(tensors, str(path), metadata=header)


def test_checkpoint_of_unknown_architecture(tmp_path):
    model = EmbeddingModel(ModelConfig("tiny_resnet"))
    path = save_checkpoint(model, tmp_path / "m.safetensors", CheckpointMeta(embedding_space="s"))
    _rewrite(path, config={**model.config.to_dict(), "backbone": "mystery_net"})
    with pytest.raises(CheckpointError, match="cannot build.*mystery_net"):
        load_checkpoint(path)


def test_strict_load_names_a_missing_or_an_extra_key(tmp_path):
    model = EmbeddingModel(ModelConfig("tiny_resnet", embedding_dim=8))
    path = save_checkpoint(model, tmp_path / "m.safetensors", CheckpointMeta(embedding_space="s"))
    _rewrite(path, drop="whiten.fc.weight")
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\) \(e.g. whiten.fc.weight\), 0 unexpected"):
        load_checkpoint(path)
    path = save_checkpoint(model, tmp_path / "m.safetensors", CheckpointMeta(embedding_space="s"))
    _rewrite(path, add="head.extra")
    with pytest.raises(CheckpointError, match=r"0 missing tensor\(s\), 1 unexpected \(e.g. head.extra\)"):
        load_checkpoint(path)


def _v1_payload(model: EmbeddingModel) -> dict:
    """A checkpoint as training.models.save_checkpoint wrote it before the module format (v1, torch pickle)."""
    return {"format": "retrieval-sdk/checkpoint", "version": 1, "config": model.config.to_dict(),
            "preprocess": model.spec.to_dict(), "embedding_dim": model.embedding_dim,
            "meta": {"embedding_space": "old-space", "role": "query", "name": "q", "extra": {}},
            "state_dict": model.state_dict()}


def test_a_checkpoint_from_before_the_module_format_loads(tmp_path):
    model = EmbeddingModel(ModelConfig("tiny_resnet", embedding_dim=8)).eval()
    torch.save(_v1_payload(model), tmp_path / "query.pt")
    loaded, meta = load_checkpoint(tmp_path / "query.pt")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta.embedding_space == "old-space" and loaded.spec == model.spec


def test_an_old_aff_gallery_or_extractor_names_what_to_re_run(tmp_path):
    for fmt in ("retrieval-sdk/aff-gallery", "retrieval-sdk/gallery-extractor"):
        torch.save({"format": fmt, "version": 1}, tmp_path / "old.pt")
        with pytest.raises(CheckpointError, match="of v1, which this version no longer reads; re-run "
                                                  "`retrieval-sdk train aff`") as e:
            load_checkpoint(tmp_path / "old.pt")
        assert "\n" not in str(e.value)


def test_unknown_pooling():
    with pytest.raises(ValueError, match="pooling must be one of"):
        ModelConfig("tiny_resnet", pooling="avg")
