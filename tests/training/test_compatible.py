"""Compatibility fine-tune: the closed-form head fit and end-to-end distillation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.compatible import CompatConfig, fit_linear_map, train_compatible
from training.data import make_instance_set
from training.embed import embed_images
from training.models import EmbeddingModel, ModelConfig


def test_fit_linear_map_recovers_a_known_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6)).astype(np.float32)
    w_true, b_true = rng.normal(size=(3, 6)), rng.normal(size=3)
    w, b = fit_linear_map(x, (x @ w_true.T + b_true).astype(np.float32), ridge=1e-8)
    np.testing.assert_allclose(w, w_true, atol=1e-4)
    np.testing.assert_allclose(b, b_true, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory):
    return make_instance_set(tmp_path_factory.mktemp("proc"), n_objects=6, n_views=3, image_size=64, seed=1).paths


def test_fit_brings_query_into_gallery_space(tiny_images):
    torch.manual_seed(0)
    gallery = EmbeddingModel(ModelConfig("tiny_efficientnet", "gem", embedding_dim=8)).eval()
    query = EmbeddingModel(ModelConfig("tiny_resnet", "gem", embedding_dim=8)).eval()

    def cosine_to_gallery() -> float:
        g = embed_images(gallery, tiny_images, gallery.spec, progress=False)
        q = embed_images(query, tiny_images, query.spec, progress=False)
        return float((g * q).sum(1).mean())

    before = cosine_to_gallery()
    history = train_compatible(query, gallery, gallery.spec, tiny_images, CompatConfig(views=2, ridge=1e-3),
                               progress=False)
    after = cosine_to_gallery()
    assert after > 0.9 and after > before + 0.3, (before, after)
    assert history["fit_cosine_loss"] < 0.1 and history["epoch_losses"] == []


def test_end_to_end_epochs_run_and_report_losses(tiny_images):
    gallery = EmbeddingModel(ModelConfig("tiny_efficientnet", "gem", embedding_dim=8)).eval()
    query = EmbeddingModel(ModelConfig("tiny_resnet", "gem", embedding_dim=8))
    before = {k: v.clone() for k, v in query.backbone.state_dict().items()}
    history = train_compatible(query, gallery, gallery.spec, tiny_images,
                               CompatConfig(views=1, epochs=2, batch_size=8), progress=False)
    assert len(history["epoch_losses"]) == 2 and all(np.isfinite(history["epoch_losses"]))
    changed = [k for k, v in query.backbone.state_dict().items() if "weight" in k and not torch.equal(v, before[k])]
    assert changed, "end-to-end epochs must update the backbone"
    # BatchNorm statistics stay frozen during fine-tuning
    assert all(torch.equal(v, before[k]) for k, v in query.backbone.state_dict().items() if "running_" in k)


def test_dimension_mismatch_is_explained(tiny_images):
    gallery = EmbeddingModel(ModelConfig("tiny_efficientnet", "gem", embedding_dim=8))
    query = EmbeddingModel(ModelConfig("tiny_resnet", "gem", embedding_dim=16))
    with pytest.raises(ValueError, match="query model dim 16 != gallery dim 8"):
        train_compatible(query, gallery, gallery.spec, tiny_images, CompatConfig(), progress=False)
