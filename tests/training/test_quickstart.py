"""The quickstart's gallery space: GeM + PCA-whitening at the configured power, learned on the fit images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.embed import embed_images
from training.photos import package_photos
from training.quickstart import QuickstartConfig, _gallery


@pytest.mark.parametrize("power", [0.5, 0.25])
def test_gallery_whitening_power(tmp_path, power):
    """0.5 whitens the fit images' pooled features to unit variance; 0.25 (the default, rank distillation's
    square-rooted whitening) leaves each principal direction the square root of its variance."""
    photos = package_photos()
    cfg = QuickstartConfig(out=tmp_path, gallery_backbone="efficientnet_lite0", image_size=64, embedding_dim=6,
                           whitening_power=power, progress=False)
    gallery, space = _gallery(cfg, photos, log=lambda *_: None)
    assert space.startswith("quickstart-") and gallery.embedding_dim == 6
    pooled = embed_images(gallery.pooled, photos, gallery.spec, progress=False).astype(np.float64)
    whitened = gallery.whiten(torch.from_numpy(pooled.astype(np.float32))).detach().numpy()
    variances = whitened.var(axis=0)  # population variance, as the whitening is learned
    eigen = np.sort(np.linalg.eigvalsh(np.cov(pooled, rowvar=False, bias=True)))[::-1][:6]
    expected = np.ones(6) if power == 0.5 else np.sqrt(eigen)
    np.testing.assert_allclose(variances, expected, rtol=1e-2)


def test_quickstart_default_is_square_rooted_whitening():
    assert QuickstartConfig().whitening_power == 0.25


def test_query_model_inherits_the_gallery_at_a_smaller_input(tmp_path):
    """The gallery's backbone as the query backbone: a copy of the gallery model (weights and whitening) at
    QUERY_SCALE of its side, which at the gallery's own side embeds exactly as the gallery does. Another
    backbone, or `inherit` off, gets its pretrained weights + GeM + an FC to fit, at the gallery's side."""
    from dataclasses import replace

    from training.models import EmbeddingModel, ModelConfig
    from training.quickstart import QUERY_SCALE, _query

    torch.manual_seed(0)
    gallery = EmbeddingModel(ModelConfig("efficientnet_lite0", "gem", embedding_dim=6, input_size=64),
                             pretrained=True).eval()
    with torch.no_grad():
        gallery.whiten.fc.weight.normal_()  # a whitening of its own, not an FC's fresh init
    cfg = QuickstartConfig(out=tmp_path, gallery_backbone="efficientnet_lite0", query_backbone="efficientnet_lite0",
                           image_size=64)
    query, inherits = _query(cfg, gallery)
    assert inherits and query.spec.input_size == (round(QUERY_SCALE * 64),) * 2 == (54, 54)
    assert all(torch.equal(v, gallery.state_dict()[k]) for k, v in query.state_dict().items())
    full = _query(replace(cfg, query_size=64), gallery)[0].eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(full(x), gallery(x))
    for other in (replace(cfg, inherit=False), replace(cfg, query_backbone="mobilenetv2_100")):
        query, inherits = _query(other, gallery)
        assert not inherits and query.spec.input_size == (64, 64) and query.config.backbone == other.query_backbone
        assert not torch.equal(query.whiten.fc.weight, gallery.whiten.fc.weight)


def test_photo_check_counts_itself_then_the_same_object_per_folder(tmp_path):
    """A gallery model as its own query model finds every distinct photo itself. An exact copy in the same
    class ties with the original, which comes first: same object. A copy filed in another folder's class of
    the same name is another object (labels are per folder)."""
    import shutil

    from training.data import make_instance_set
    from training.models import EmbeddingModel, ModelConfig
    from training.quickstart import photo_check

    src = make_instance_set(tmp_path / "proc", n_objects=4, n_views=1, image_size=48, seed=3).paths
    layout = {"f1/a/p0.png": 0, "f1/a/p1.png": 0, "f1/b/p2.png": 1, "f2/a/p3.png": 0, "f2/c/p4.png": 2,
              "f2/c/p5.png": 3}
    for rel, i in layout.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src[i], tmp_path / rel)
    model = EmbeddingModel(ModelConfig("tiny_resnet", "gem", embedding_dim=8)).eval()
    own = photo_check(model, model, [tmp_path / "f1", tmp_path / "f2"], log=lambda *_: None)["self_retrieval"]
    assert (own["found_itself_first"], own["found_same_object_first"], own["images"]) == (4, 1, 6)
    assert own["mean_cosine_to_own"] == pytest.approx(1.0, abs=1e-5)
