"""Heads: L2Norm, PCA whitening (learned and as a trainable FC), and the CGD head."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import training  # noqa: F401  (installs the torchvision shim before anything else)
from training.heads import CGDHead, L2Norm, Whitening, apply_pca_whitening, learn_pca_whitening
from training.pooling import gem, mac, spoc


# ------------------------------------------------------------------------------------------ L2Norm


def test_l2norm_gives_unit_rows_and_survives_zero_vector():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    out = L2Norm()(x)
    torch.testing.assert_close(out[0], torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(out[1], torch.zeros(2))


# --------------------------------------------------------------------------------------- whitening


@pytest.fixture(scope="module")
def correlated_features() -> np.ndarray:
    """600 samples in 8-D: a random linear mix of independent Gaussians with distinct variances + offset."""
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((600, 8)) * np.array([5.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.3, 0.1])
    mix = rng.standard_normal((8, 8))
    return (latent @ mix + rng.standard_normal(8) * 4).astype(np.float32)


def _covariance(x: np.ndarray) -> np.ndarray:
    centred = x - x.mean(axis=0)
    return centred.T @ centred / len(x)


def test_pca_whitening_gives_identity_covariance(correlated_features):
    mean, projection = learn_pca_whitening(correlated_features)
    assert mean.shape == (8,) and projection.shape == (8, 8)
    assert mean.dtype == np.float32 and projection.dtype == np.float32
    white = (correlated_features.astype(np.float64) - mean) @ projection.T.astype(np.float64)
    np.testing.assert_allclose(white.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(_covariance(white), np.eye(8), atol=1e-3)


def test_pca_whitening_components_match_svd(correlated_features):
    """Independent check: principal directions and variances from the SVD of the centred data."""
    x = correlated_features.astype(np.float64)
    centred = x - x.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    variances = singular**2 / len(x)  # descending
    mean, projection = learn_pca_whitening(correlated_features)
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-5)
    # row k of the projection is +-vt[k] / sqrt(variance_k): fix the sign, then compare
    expected = vt / np.sqrt(variances)[:, None]
    signs = np.sign(np.sum(projection * expected, axis=1))
    np.testing.assert_allclose(projection * signs[:, None], expected, rtol=1e-3, atol=1e-5)


def test_reduced_whitening_keeps_the_top_components(correlated_features):
    x = correlated_features.astype(np.float64)
    _, full = learn_pca_whitening(correlated_features)
    mean, reduced = learn_pca_whitening(correlated_features, out_dim=3)
    assert reduced.shape == (3, 8)
    np.testing.assert_allclose(np.abs(reduced), np.abs(full[:3]), rtol=1e-4, atol=1e-6)
    # the kept directions are orthogonal to the 5 smallest principal directions
    _, _, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    np.testing.assert_allclose(reduced @ vt[3:].T, 0.0, atol=1e-4)
    white = apply_pca_whitening(correlated_features, mean, reduced)
    assert white.shape == (600, 3)
    np.testing.assert_allclose(_covariance(white.astype(np.float64)), np.eye(3), atol=1e-3)


def test_learn_pca_whitening_rejects_bad_input():
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match=r"2-D array"):
        learn_pca_whitening(rng.standard_normal(10))
    with pytest.raises(ValueError, match=r"out_dim must be in \[1, 4\]"):
        learn_pca_whitening(rng.standard_normal((50, 4)), out_dim=5)
    # 5 samples in 16-D span only 4 directions: whitening more would amplify noise by 1/sqrt(eps)
    with pytest.raises(ValueError, match=r"at most 4 directions"):
        learn_pca_whitening(rng.standard_normal((5, 16)))
    assert learn_pca_whitening(rng.standard_normal((5, 16)), out_dim=4)[1].shape == (4, 16)


def test_whitening_from_pca_equals_numpy(correlated_features):
    mean, projection = learn_pca_whitening(correlated_features, out_dim=5)
    module = Whitening.from_pca(mean, projection)
    assert (module.fc.in_features, module.fc.out_features) == (8, 5)
    x = correlated_features[:20]
    want = np.stack([projection @ (row - mean) for row in x])  # P (x - mean), row by row
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_whitening_is_trainable():
    module = Whitening(6, 4)
    assert module.fc.bias is not None and Whitening(6, 4, bias=False).fc.bias is None
    module(torch.randn(3, 6)).pow(2).sum().backward()
    assert module.fc.weight.grad is not None and module.fc.weight.grad.abs().sum() > 0


def test_whitening_from_pca_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"mean \(D,\) and projection \(out_dim, D\)"):
        Whitening.from_pca(np.zeros(5), np.zeros((3, 4)))


# --------------------------------------------------------------------------------------------- CGD


def _feature_map(b: int = 4, c: int = 16, h: int = 5, w: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(b, c, h, w, generator=g)) + 0.01


@pytest.mark.parametrize("config", ["SMG", "MG", "G", "GS"])
def test_cgd_embedding_shape_and_norms(config):
    torch.manual_seed(0)
    head = CGDHead(16, gd_config=config, feature_dim=48)
    emb = head(_feature_map())
    assert emb.shape == (4, 48) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    n = len(config)
    for slice_ in emb.split(48 // n, dim=1):  # each branch is unit-norm before the final L2
        torch.testing.assert_close(slice_.norm(dim=1), torch.full((4,), 1 / math.sqrt(n)))


def test_cgd_branches_are_spoc_mac_gem_in_config_order():
    torch.manual_seed(0)
    head = CGDHead(16, gd_config="SMG", feature_dim=30, gem_p=3.0)
    x = _feature_map()
    emb = head(x)
    for i, pooled in enumerate([spoc(x), mac(x), gem(x, p=3.0)]):
        branch = F.normalize(pooled @ head.projections[i].weight.T, dim=1) / math.sqrt(3)
        torch.testing.assert_close(emb[:, 10 * i : 10 * (i + 1)], branch)


def test_cgd_auxiliary_logits_come_from_first_branch_pooling():
    torch.manual_seed(0)
    x = _feature_map()
    for config, first_pool in [("SMG", spoc), ("MG", mac)]:
        head = CGDHead(16, gd_config=config, feature_dim=24, num_classes=7).eval()
        emb, logits = head.forward_train(x)
        assert logits.shape == (4, 7)
        torch.testing.assert_close(emb, head(x))
        torch.testing.assert_close(logits, head.auxiliary(first_pool(x)))


def test_cgd_without_classes_has_no_auxiliary_logits():
    head = CGDHead(16, feature_dim=24)
    emb, logits = head.forward_train(_feature_map())
    assert logits is None and emb.shape == (4, 24)
    assert head.auxiliary is None


def test_cgd_trains_end_to_end():
    head = CGDHead(16, gd_config="SMG", feature_dim=24, num_classes=3)
    x = _feature_map().requires_grad_(True)
    emb, logits = head.forward_train(x)
    (emb[:, 0].sum() + logits.logsumexp(dim=1).sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(fc.weight.grad is not None for fc in head.projections)
    assert head.auxiliary[1].weight.grad is not None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gd_config="SXG"), r"letters S \(SPoC\), M \(MAC\), G \(GeM\)"),
        (dict(gd_config=""), r"non-empty string"),
        (dict(gd_config="smg"), r"letters S"),
        (dict(gd_config="SGS"), r"repeats a letter"),
        (dict(gd_config="SMG", feature_dim=1000), r"multiple of the 3 branches"),
        (dict(num_classes=1), r"num_classes must be >= 2"),
    ],
)
def test_cgd_rejects_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CGDHead(16, **kwargs)


def test_cgd_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match=r"\(B, 16, H, W\)"):
        CGDHead(16, feature_dim=24)(_feature_map(c=8))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cgd_head_exports_to_onnx_with_dynamic_spatial_size():
    import onnxruntime as ort

    torch.manual_seed(0)
    head = CGDHead(16, gd_config="SMG", feature_dim=24, num_classes=5).eval()
    buf = io.BytesIO()
    torch.onnx.export(
        head,
        (_feature_map(b=1, h=7, w=7),),
        buf,
        dynamo=False,  # the dynamo exporter needs onnxscript, which the train extra does not install
        opset_version=17,
        input_names=["features"],
        output_names=["embedding"],
        dynamic_axes={"features": {0: "batch", 2: "height", 3: "width"}},
    )
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    for x in (_feature_map(b=2, h=7, w=7, seed=1), _feature_map(b=3, h=9, w=4, seed=2)):
        (got,) = session.run(None, {"features": x.numpy()})
        with torch.no_grad():
            want = head(x).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_square_rooted_whitening_keeps_the_root_of_each_variance(correlated_features):
    """power 0.25: along each principal direction the whitened variance is sqrt(eigenvalue)."""
    mean, full = learn_pca_whitening(correlated_features)
    _, rooted = learn_pca_whitening(correlated_features, power=0.25)
    x = correlated_features.astype(np.float64)
    centred = x - x.mean(axis=0)
    eigval = np.sort(np.linalg.eigvalsh(centred.T @ centred / len(x)))[::-1]
    var = (apply_pca_whitening(correlated_features, mean, rooted).astype(np.float64) ** 2).mean(axis=0)
    np.testing.assert_allclose(var, np.sqrt(eigval), rtol=1e-3)
    full_var = (apply_pca_whitening(correlated_features, mean, full).astype(np.float64) ** 2).mean(axis=0)
    np.testing.assert_allclose(full_var, 1.0, rtol=1e-3)
    with pytest.raises(ValueError, match="power must be in"):
        learn_pca_whitening(correlated_features, power=1.0)
