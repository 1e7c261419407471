"""The on-disk, memory-mapped feature cache and the aligned feature set the mixer reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.aff.features import (FeatureCacheError, FeatureSet, LabelError, check_labels, dataset_fingerprint,
                                   extract_features, open_cache, read_header)
from training.aff.mixer import local_key, mask_key
from training.data import make_instance_set
from training.extractors import ExtractorConfig, ExtractorTrainConfig, build_extractor


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_instance_set(tmp_path_factory.mktemp("inst"), n_objects=3, n_views=4, image_size=40, seed=1)


def delg():
    torch.manual_seed(0)
    return build_extractor(ExtractorConfig("delg", name="delg", backbone="tiny_resnet", image_size=64, dim=16,
                                           local_dim=8, num_local=4, attention_hidden=8)).eval()


def cvnet():
    torch.manual_seed(1)
    return build_extractor(ExtractorConfig("cvnet", backbone="tiny_efficientnet", image_size=64, dim=12)).eval()


def test_cache_is_written_once_memory_mapped_and_matches_direct_extraction(images, tmp_path):
    ex, logs = delg(), []
    cache = extract_features(ex, images.paths, images.labels, tmp_path / "c", batch_size=5, progress=False,
                             log=logs.append)
    assert cache.count == 12 and cache.global_dim == 16 and cache.has_local
    assert isinstance(cache.global_, np.memmap) and not cache.global_.flags.writeable
    header = read_header(tmp_path / "c")
    assert header["count"] == 12 and header["extractor"]["name"] == "delg"
    assert header["arrays"]["local"] == {"file": "local.npy", "shape": [12, 4, 8], "dtype": "float16"}
    assert header["dataset"] == dataset_fingerprint(images.paths, images.labels)
    from training.transforms import eval_transform
    x = torch.stack([eval_transform(ex.spec)(p) for p in images.paths[:3]])
    direct = ex.extract(x)
    assert np.allclose(cache.global_[:3], direct.global_.numpy(), atol=1e-5)
    assert np.allclose(cache.arrays["local"][:3], direct.local.numpy(), atol=1e-3)
    # a second call reuses the cache instead of extracting again
    again = extract_features(ex, images.paths, images.labels, tmp_path / "c", progress=False, log=logs.append)
    assert "cached features" in logs[-1] and np.array_equal(again.global_, cache.global_)


def test_changed_extractor_reextracts_and_another_dataset_is_an_error(images, tmp_path):
    ex, logs = delg(), []
    extract_features(ex, images.paths, images.labels, tmp_path / "c", progress=False, log=logs.append)
    with torch.no_grad():
        ex.whiten.fc.weight.mul_(-1)
    extract_features(ex, images.paths, images.labels, tmp_path / "c", progress=False, log=logs.append)
    assert "stale (extractor changed)" in logs[-2]
    other = images.subset(range(8))
    with pytest.raises(FeatureCacheError, match="extracted from another dataset.*12 images.*8 images.*--overwrite-cache"):
        extract_features(ex, other.paths, other.labels, tmp_path / "c", progress=False, log=logs.append)
    cache = extract_features(ex, other.paths, other.labels, tmp_path / "c", overwrite=True, progress=False,
                             log=logs.append)
    assert cache.count == 8
    relabelled = [(y + 1) % 3 for y in other.labels]  # same pixels, other labels: another dataset too
    with pytest.raises(FeatureCacheError, match="another dataset"):
        open_cache(tmp_path / "c", dataset=dataset_fingerprint(other.paths, relabelled))


def test_damaged_or_missing_cache_is_a_clear_error(images, tmp_path):
    extract_features(cvnet(), images.paths, images.labels, tmp_path / "c", progress=False, log=lambda s: None)
    with pytest.raises(FeatureCacheError, match="holds 'cvnet' features, not 'delg'"):
        open_cache(tmp_path / "c", extractor="delg")
    with pytest.raises(FeatureCacheError, match="holds 12 images, expected 10"):
        open_cache(tmp_path / "c", count=10)
    header = json.loads((tmp_path / "c" / "header.json").read_text())
    header["arrays"]["global"]["shape"] = [12, 13]
    (tmp_path / "c" / "header.json").write_text(json.dumps(header))
    with pytest.raises(FeatureCacheError, match="the cache is damaged"):
        open_cache(tmp_path / "c")
    with pytest.raises(FeatureCacheError, match="no feature cache at"):
        open_cache(tmp_path / "nothing")


def test_feature_set_lines_up_caches_and_checks_counts_and_labels(images, tmp_path):
    a = extract_features(delg(), images.paths, images.labels, tmp_path / "a", progress=False, log=lambda s: None)
    b = extract_features(cvnet(), images.paths, images.labels, tmp_path / "b", progress=False, log=lambda s: None)
    fs = FeatureSet([a, b], images.labels, num_classes=3)
    assert [(s.key, s.dim, s.tokens) for s in fs.specs()] == [("delg", 16, 1), ("delg:local", 8, 4), ("cvnet", 12, 1)]
    batch = fs.batch([0, 5])
    assert batch["delg"].shape == (2, 16) and batch[local_key("delg")].shape == (2, 4, 8)
    assert batch["cvnet"].dtype == torch.float32 and batch[mask_key("delg")].all()
    loaded = FeatureSet([a, b], images.labels).load().batch([0, 5])
    assert all(torch.equal(loaded[k], batch[k]) for k in batch)
    assert "delg:local" not in FeatureSet([a, b], images.labels, use_local=False).batch([1])

    fewer = extract_features(cvnet(), images.paths[:8], images.labels[:8], tmp_path / "c", progress=False,
                             log=lambda s: None)
    with pytest.raises(FeatureCacheError, match="mismatched counts.*'delg': 12.*'cvnet': 8"):
        FeatureSet([a, fewer], images.labels)
    with pytest.raises(FeatureCacheError, match="names repeat"):
        FeatureSet([a, a], images.labels)
    with pytest.raises(LabelError, match="12 images but 11 labels"):
        FeatureSet([a, b], images.labels[:11])
    missing = list(images.labels)
    missing[4] = None
    with pytest.raises(LabelError, match="image 4 .* has no class label"):
        FeatureSet([a, b], missing)
    with pytest.raises(LabelError, match="has label 2 but the classifier has 2 classes"):
        FeatureSet([a, b], images.labels, num_classes=2)


def test_redrawn_noise_rows_are_fresh_on_every_read_and_key_the_stage_apart(images, tmp_path):
    """A redrawn feature never repeats (it cannot be memorised); the others still read the cache."""
    a = extract_features(cvnet(), images.paths, images.labels, tmp_path / "a", progress=False, log=lambda s: None)
    ec = ExtractorConfig("noise", name="noise", backbone="tiny_resnet", dim=6, train=ExtractorTrainConfig(epochs=0))
    n = extract_features(build_extractor(ec), images.paths, images.labels, tmp_path / "n", progress=False,
                         log=lambda s: None)
    fixed = FeatureSet([a, n], images.labels).load()
    fresh = FeatureSet([a, n], images.labels, redraw=["noise"]).load()
    one, two = fresh.batch([0, 3]), fresh.batch([0, 3])
    assert torch.equal(one["cvnet"], fixed.batch([0, 3])["cvnet"])
    assert one["noise"].shape == (2, 6) and not torch.equal(one["noise"], two["noise"])
    assert torch.equal(fixed.batch([0, 3])["noise"], fixed.batch([0, 3])["noise"])
    assert fresh.fingerprint != fixed.fingerprint  # a resumable stage of one is never resumed as the other
    with pytest.raises(FeatureCacheError, match=r"features to redraw \['nois'\] are not among"):
        FeatureSet([a, n], images.labels, redraw=["nois"])


def test_check_labels():
    assert check_labels([0, 2, 1], 3, 3).tolist() == [0, 2, 1]
    with pytest.raises(LabelError, match="no class labels"):
        check_labels(None, 3)
    with pytest.raises(LabelError, match="image 1 .* label -1: a missing class label"):
        check_labels([0, -1, 1], 3)
    with pytest.raises(LabelError, match="must be integers"):
        check_labels(["a", "b"], 2)
