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
