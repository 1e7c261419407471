"""Re-ranking: AQE, alphaQE and offline diffusion with late truncation.

The mAP measurements use the quickstart's gallery model (EfficientNet-Lite2 + GeM, ImageNet weights)
through the SDK's own ONNX embedder. The defaults of sdk.rerank were chosen on a separate
validation set (procedural objects with seed 1); here they are only measured, on real photos and on
a procedural set of other objects (seed 0), leave-one-out.
"""

from __future__ import annotations

import numpy as np
import pytest

from sdk import rerank as R
from sdk.index import GalleryIndex
from training.data import make_instance_set
from training.evaluate import class_map

from .conftest import unit


def map_from_scores(scores: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out mAP from a (n, n) score matrix (the query itself left out), stable ties."""
    aps = []
    for i in range(len(labels)):
        order = np.argsort(-scores[i], kind="stable")
        order = order[order != i]
        rel = labels[order] == labels[i]
        if rel.any():
            precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
            aps.append((precision * rel).sum() / rel.sum())
    return float(np.mean(aps))


def measure(g: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    cfg = R.RerankConfig()
    out = {
        "base": class_map(g, labels, g, labels, exclude_self=True),
        "aqe": class_map(R.aqe(g, g, cfg.qe_k, exclude_self=True), labels, g, labels, exclude_self=True),
        "alpha_qe": class_map(R.alpha_qe(g, g, cfg.alpha_qe_k, cfg.alpha, exclude_self=True), labels, g, labels,
                              exclude_self=True),
        "diffusion": map_from_scores(R.Diffusion(g, cfg.diffusion).rank_scores(g, exclude_self=True), labels),
    }
    assert abs(map_from_scores(g @ g.T, labels) - out["base"]) < 1e-6  # the two mAPs agree
    return out


@pytest.fixture(scope="module")
def gallery_embedder(pretrained_gallery_bundle):
    from sdk.embedder import Embedder

    return Embedder.from_bundle(pretrained_gallery_bundle, role="query")  # the gallery model, see conftest


@pytest.mark.slow
def test_rerank_raises_map_on_real_photos(gallery_embedder, ukbench_dir, phototourism_dir):
    uk = sorted(ukbench_dir.glob("*.jpg"))
    pt = sorted(phototourism_dir.glob("*.jpg"))
    landmarks = sorted({p.name.rsplit("_", 2)[0] for p in pt})
    labels = np.array([i // 4 for i in range(len(uk))] + [100 + landmarks.index(p.name.rsplit("_", 2)[0]) for p in pt])
    g = gallery_embedder.embed(uk + pt)
    m = measure(g, labels)
    print("real photos (UKBench-56 + PhotoTourism-13) mAP:", {k: round(v, 4) for k, v in m.items()})
    for method in ("aqe", "alpha_qe", "diffusion"):
        assert m[method] > m["base"] + 0.003, (method, m)
    uk_only = measure(g[: len(uk)], labels[: len(uk)])  # saturated: nothing to gain, nothing may be lost
    assert min(uk_only.values()) >= uk_only["base"] - 1e-9


@pytest.mark.slow
def test_rerank_raises_map_on_procedural_objects(gallery_embedder, tmp_path):
    data = make_instance_set(tmp_path / "objects", n_objects=30, n_views=5, seed=0)
    g = gallery_embedder.embed(data.paths)
    m = measure(g, np.asarray(data.labels))
    print("procedural objects (seed 0) mAP:", {k: round(v, 4) for k, v in m.items()})
    for method in ("aqe", "alpha_qe", "diffusion"):
        assert m[method] > m["base"] + 0.01, (method, m)


def test_expansion_math():
    q = np.array([[1.0, 0.0]], np.float32)
    nb = np.array([[[0.0, 1.0], [0.6, 0.8]]], np.float32)
    sims = np.array([[0.0, 0.6]], np.float32)
    aqe = R.expand(q, nb, sims, alpha=0)
    np.testing.assert_allclose(aqe[0], np.array([1.6, 1.8]) / np.hypot(1.6, 1.8), rtol=1e-6)
    aq = R.expand(q, nb, sims, alpha=3)  # the orthogonal neighbour weighs 0**3 = 0
    np.testing.assert_allclose(aq[0], np.array([1 + 0.6 ** 4, 0.6 ** 3 * 0.8]) / np.hypot(1 + 0.6 ** 4, 0.6 ** 3 * 0.8),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="k >= 1"):
        R.query_expansion(q, q, k=0)


def test_diffusion_follows_the_manifold():
    """Points along two arcs: the far end of the query's arc is reached through its neighbours even
    though the other arc is closer in cosine."""
    t = np.linspace(0, 1.2, 25)
    arc_a = np.stack([np.cos(t), np.sin(t), np.zeros_like(t)], 1)
    arc_b = np.stack([np.cos(t) * 0.8, np.sin(t) * 0.8 + 0.1, np.full_like(t, 0.6)], 1)
    g = np.concatenate([arc_a, arc_b]).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    labels = np.array([0] * 25 + [1] * 25)
    diff = R.Diffusion(g, R.DiffusionConfig(kd=4, kq=2, alpha=0.9))
    assert map_from_scores(diff.rank_scores(g, exclude_self=True), labels) > map_from_scores(g @ g.T, labels)
    # the truncated (scipy) path agrees in ranking quality with the exact small-gallery path
    trunc = R.Diffusion(g, R.DiffusionConfig(kd=4, kq=2, alpha=0.9, truncation=20))
    assert map_from_scores(trunc.rank_scores(g, exclude_self=True), labels) > map_from_scores(g @ g.T, labels)


def test_rerank_search_through_the_index():
    g = unit(200, 16, seed=3)
    q = unit(3, 16, seed=4)
    idx = GalleryIndex.create(None, 16, "s")
    ids = [f"g{i}" for i in range(200)]
    idx.add(ids, g, space="s")
    cfg = R.RerankConfig()
    for method, new_q in (("aqe", R.aqe(q, g, cfg.qe_k)), ("alpha_qe", R.alpha_qe(q, g, cfg.alpha_qe_k, cfg.alpha))):
        got = [[h.id for h in row] for row in R.rerank_search(idx, q, 5, method, space="s", config=cfg)]
        want = [[ids[j] for j in np.argsort(-(new_q[i] @ g.T))[:5]] for i in range(3)]
        assert got == want
    cache = R.DiffusionCache()
    hits = R.rerank_search(idx, q, 5, "diffusion", space="s", cache=cache)
    want = R.Diffusion(g, cfg.diffusion).search(q, 5)[1]
    assert [[h.id for h in row] for row in hits] == [[ids[j] for j in row] for row in want]
    idx.remove(["g0"])  # the cache notices the change
    assert all(h.id != "g0" for row in R.rerank_search(idx, g[:1], 5, "diffusion", space="s", cache=cache) for h in row)
    with pytest.raises(ValueError, match="rerank must be"):
        R.rerank_search(idx, q, 5, "magic", space="s")
    with pytest.raises(ValueError, match="limited to galleries"):
        R.rerank_search(idx, q, 5, "diffusion", space="s", config=R.RerankConfig(diffusion_max_items=10))


def test_diffusion_self_ids_in_blocks_equal_exclude_self():
    """Leave-one-out diffusion scores computed in query blocks (self_ids) equal the whole-gallery ones."""
    g = unit(60, 16, seed=3)
    model = R.Diffusion(g)
    whole = model.rank_scores(g, exclude_self=True)
    blocks = np.concatenate([model.rank_scores(g[s:s + 25], self_ids=np.arange(s, min(s + 25, 60)))
                             for s in range(0, 60, 25)])
    np.testing.assert_allclose(whole, blocks, rtol=0, atol=1e-6)  # BLAS sums a 25-row block in another order
    assert (np.argsort(-whole, axis=1)[:, :10] == np.argsort(-blocks, axis=1)[:, :10]).all()
