"""Gallery extractors: DELG, DOLG and CVNet as real architectures on tiny backbones, their training,
checkpoints, and the mapping of released checkpoints onto our key layout."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from training.data import make_instance_set
from training.config import ConfigError
from training.extractors import (ExtractorConfig, ExtractorError, ExtractorTrainConfig, Trunk, build_extractor,
                                 load_extractor, load_released, save_extractor, train_extractor)
from training.checkpoint import CheckpointError, read_header
from training.extractors.delg import top_k_locals
from training.extractors.dolg import orthogonal_fusion
from training.extractors.released import _PYCLS_PARTS, BACKBONE, CLASSIFIERS, RELEASED_LAYOUTS, pycls_to_timm
from training.backbones import create_backbone

TINY = dict(image_size=64, dim=24)
KINDS = {
    "delg": dict(local_dim=8, num_local=5, attention_hidden=16),
    "dolg": dict(local_dim=16, dilations=(1, 2)),
    "cvnet": dict(),
}


def tiny(kind: str, backbone: str = "tiny_resnet", **kw) -> ExtractorConfig:
    return ExtractorConfig(kind, backbone=backbone, **{**TINY, **KINDS[kind], **kw})


@pytest.mark.parametrize("backbone,c4,c5", [("tiny_resnet", 192, 96), ("tiny_efficientnet", 48, 256),
                                            ("mobilenetv2_100", 96, 1280)])
def test_trunk_gives_conv4_at_stride_16_and_conv5_at_stride_32(backbone, c4, c5):
    trunk = Trunk(create_backbone(backbone)).eval()
    with torch.no_grad():
        f4, f5 = trunk(torch.randn(2, 3, 128, 96))
    assert f4.shape == (2, c4, 8, 6) and f5.shape == (2, c5, 4, 3)
    assert (trunk.conv4_channels, trunk.conv5_channels) == (c4, c5)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # conv5 is exactly the backbone's usual output
        assert torch.allclose(trunk(x)[1], trunk.backbone(x), atol=1e-5)


def test_trunk_rejects_a_vit():
    with pytest.raises(ExtractorError, match="not a ResNet.*EfficientNet"):
        Trunk(create_backbone("tiny_vit"))


@pytest.mark.parametrize("kind", ["delg", "dolg", "cvnet"])
@pytest.mark.parametrize("backbone", ["tiny_resnet", "tiny_efficientnet"])
def test_extractors_train_and_extract(kind, backbone):
    torch.manual_seed(0)
    ex = build_extractor(tiny(kind, backbone), num_classes=4)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    losses = ex.train_losses(x, y)
    assert set(losses) == set(ex.loss_weights())
    total = sum(ex.loss_weights()[k] * v for k, v in losses.items())
    total.backward()
    assert torch.isfinite(total)
    grads = [p.grad for p in ex.trunk.backbone.parameters() if p.grad is not None]
    assert grads, "the ArcFace loss reaches the backbone"
    out = ex.eval().extract(x)
    assert out.global_.shape == (4, 24)
    assert torch.allclose(out.global_.norm(dim=1), torch.ones(4), atol=1e-5)
    if kind == "delg":
        assert out.local.shape == (4, 5, 8) and out.local_scores.shape == (4, 5)
        assert torch.allclose(out.local.norm(dim=-1), torch.ones(4, 5), atol=1e-5)
        assert torch.all(out.local_scores[:, :-1] >= out.local_scores[:, 1:])  # sorted by attention
        assert out.local_count.tolist() == [5] * 4
    else:
        assert out.local is None


def test_delg_local_heads_do_not_train_the_backbone():
    ex = build_extractor(tiny("delg"), num_classes=3)
    losses = ex.train_losses(torch.randn(3, 3, 64, 64), torch.tensor([0, 1, 2]))
    (losses["reconstruction"] + losses["attention"]).backward()
    assert all(p.grad is None for p in ex.trunk.backbone.parameters())  # stop-gradient at conv4
    assert ex.autoencoder.encoder.weight.grad is not None and ex.attention.conv1.weight.grad is not None


def test_top_k_locals_pads_when_there_are_fewer_locations():
    d = F.normalize(torch.randn(2, 3, 4), dim=-1)
    s = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]])
    picked, scores, count = top_k_locals(d, s, 5)
    assert picked.shape == (2, 5, 4) and count.tolist() == [3, 3]
    assert torch.equal(picked[0, 0], d[0, 1]) and scores[0, :3].tolist() == pytest.approx([0.9, 0.5, 0.1])
    assert torch.all(picked[:, 3:] == 0) and torch.all(scores[:, 3:] == 0)


def test_orthogonal_fusion_removes_the_global_direction():
    local, g = torch.randn(2, 6, 3, 3), torch.randn(2, 6)
    orth = orthogonal_fusion(local, g)
    assert torch.allclose((orth * g[:, :, None, None]).sum(1), torch.zeros(2, 3, 3), atol=1e-5)
    # what was removed is parallel to the global vector
    removed = (local - orth).permute(0, 2, 3, 1).reshape(2, -1, 6)
    cos = F.cosine_similarity(removed, g[:, None, :].expand_as(removed), dim=-1).abs()
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-4)


def test_cvnet_is_multiscale_by_default():
    ex = build_extractor(ExtractorConfig("cvnet", backbone="tiny_resnet", dim=16)).eval()
    assert ex.config.scales == (0.7071, 1.0, 1.4142)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = sum(F.normalize(ex.embed(ex._rescaled(x, s)), dim=-1) for s in ex.config.scales)
        assert torch.allclose(ex(x), F.normalize(expected, dim=-1), atol=1e-5)


def test_extractor_config_errors():
    with pytest.raises(ExtractorError, match="kind must be one of"):
        ExtractorConfig("netvlad")
    with pytest.raises(ExtractorError, match="only DELG produces local"):
        ExtractorConfig("dolg", num_local=10)
    with pytest.raises(ConfigError, match="extractor delg: unknown key 'dimension'"):
        ExtractorConfig.from_dict({"kind": "delg", "dimension": 3})
    with pytest.raises(ConfigError, match="extractor delg.train: unknown key 'epoch'"):
        ExtractorConfig.from_dict({"kind": "delg", "train": {"epoch": 3}})
    with pytest.raises(ExtractorError, match="without num_classes"):
        build_extractor(tiny("cvnet")).train_losses(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]))


def test_weak_features_rmac_head_and_pure_noise():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 64, 64)
    rmac = build_extractor(ExtractorConfig("rmac", backbone="tiny_resnet", dim=24),
                           num_classes=3)
    rmac.train_losses(x, torch.tensor([0, 1, 2]))["arcface"].backward()  # trainable like the others
    g = rmac.eval().extract(x).global_
    assert g.shape == (3, 24) and torch.allclose(g.norm(dim=1), torch.ones(3), atol=1e-5)
    noise_cfg = ExtractorConfig("noise", backbone="tiny_resnet", dim=10, train=ExtractorTrainConfig(epochs=0, seed=4))
    a, b = build_extractor(noise_cfg), build_extractor(noise_cfg)
    na, nb = a.extract(x).global_, b.extract(torch.zeros_like(x)).global_
    assert na.shape == (3, 10) and torch.allclose(na, nb)  # seeded, and independent of the pixels
    assert not torch.allclose(a.extract(x).global_, na)  # a fresh draw for every image
    with pytest.raises(ExtractorError, match="noise feature cannot be trained"):
        build_extractor(ExtractorConfig("noise", backbone="tiny_resnet", train=ExtractorTrainConfig(epochs=1)))


@pytest.fixture(scope="module")
def instances(tmp_path_factory):
    return make_instance_set(tmp_path_factory.mktemp("inst"), n_objects=4, n_views=4, image_size=48, seed=0)


def test_train_extractor_freeze_stem_keeps_stem_fixed(instances):
    cfg = tiny("dolg", train=ExtractorTrainConfig(epochs=2, batch_size=8, freeze_stem=True, lr=1e-2, seed=0))
    ex = build_extractor(cfg, num_classes=4)
    stem_before = {k: v.clone() for k, v in ex.trunk.backbone.model.layer1.state_dict().items()}
    tail_before = ex.trunk.backbone.model.layer4[0].conv1.weight.clone()
    logs = []
    history = train_extractor(ex, instances, progress=False, log=logs.append)
    assert len(history) == 2 and all("arcface" in h for h in history) and len(logs) == 2
    for k, v in ex.trunk.backbone.model.layer1.state_dict().items():
        assert torch.equal(v, stem_before[k]), f"stem tensor {k} changed (incl. BN statistics)"
    assert not torch.equal(ex.trunk.backbone.model.layer4[0].conv1.weight, tail_before)
    assert not ex.training


def test_train_extractor_checks_classes(instances):
    ex = build_extractor(tiny("cvnet"), num_classes=7)
    with pytest.raises(ExtractorError, match="7 classes but the training set has 4"):
        train_extractor(ex, instances, progress=False, log=lambda s: None)


def test_extractor_checkpoint_roundtrip(tmp_path):
    ex = build_extractor(tiny("delg"), num_classes=3).eval()
    path = save_extractor(ex, tmp_path / "delg.pt", fingerprint="abc")
    back = load_extractor(path)
    x = torch.randn(2, 3, 64, 64)
    a, b = ex.extract(x), back.extract(x)
    assert torch.equal(a.global_, b.global_) and torch.equal(a.local, b.local)
    assert back.config == ex.config and read_header(path)["meta"].extra["fingerprint"] == "abc"
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a retrieval-sdk checkpoint"):
        load_extractor(tmp_path / "other.pt")


# ------------------------------------------------------------------------------------------ released checkpoints

_TIMM_PARTS = {v: k for k, v in _PYCLS_PARTS.items()}
_TIMM_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(conv[123]|bn[123]|downsample\.0|downsample\.1)\.(\w+)$")


def timm_to_pycls(key: str) -> str | None:
    """Inverse of `pycls_to_timm` (the release layout of our ResNet keys, for round-trip tests)."""
    if key.count(".") == 1 and key.startswith(("conv1.", "bn1.")):
        return key.replace("conv1.", "stem.conv.", 1).replace("bn1.", "stem.bn.", 1)
    m = _TIMM_BLOCK.match(key)
    return None if m is None else "s{}.b{}.{}.{}".format(m[1], int(m[2]) + 1, _TIMM_PARTS[m[3]], m[4])


def released_state_dict(extractor: GalleryExtractor, layout: str) -> dict[str, torch.Tensor]:
    """The extractor's weights in a release's layout (the inverse mapping), e.g. for round-trip tests."""
    spec = RELEASED_LAYOUTS[layout]
    out: dict[str, torch.Tensor] = {}
    for key, value in extractor.state_dict().items():
        if key.startswith(spec.absent):
            continue
        for src, dst in spec.rules:
            if dst == BACKBONE and key.startswith(BACKBONE):
                pycls = timm_to_pycls(key[len(BACKBONE):])
                if pycls is None:
                    raise AssertionError(f"{key} has no place in the pycls ResNet layout")
                out[src + pycls] = value
                break
            if dst != BACKBONE and key.startswith(dst):
                out[src + key[len(dst):]] = value
                break
        else:
            if key.startswith(CLASSIFIERS):  # ArcFace scale/margin buffers: not stored by the releases
                continue
            raise AssertionError(f"{key} has no place in the {layout} layout")
    return out


def test_pycls_keys_map_to_timm_resnet_names():
    # key names as they appear in the released CVNet / DELG / DOLG PyTorch code (pycls ResNet)
    assert pycls_to_timm("stem.conv.weight") == "conv1.weight"
    assert pycls_to_timm("stem.bn.running_var") == "bn1.running_var"
    assert pycls_to_timm("s1.b1.proj.weight") == "layer1.0.downsample.0.weight"
    assert pycls_to_timm("s1.b1.bn.bias") == "layer1.0.downsample.1.bias"
    assert pycls_to_timm("s3.b23.f.c_bn.running_mean") == "layer3.22.bn3.running_mean"
    assert pycls_to_timm("s4.b3.f.b.weight") == "layer4.2.conv2.weight"
    assert pycls_to_timm("head.fc.weight") is None
    for k in ("conv1.weight", "layer2.3.bn1.num_batches_tracked", "layer1.0.downsample.0.weight"):
        assert pycls_to_timm(timm_to_pycls(k)) == k


@pytest.mark.slow
@pytest.mark.parametrize("layout,kind,kw", [
    ("cvnet", "cvnet", dict(dim=2048)),
    ("dolg-pytorch", "dolg", dict(local_dim=1024, dim=512, multi_atrous=False)),
    ("delg-pytorch", "delg", dict(dim=2048)),
])
def test_released_checkpoint_loads_into_resnet50(tmp_path, layout, kind, kw):
    torch.manual_seed(0)
    src = build_extractor(ExtractorConfig(kind, backbone="resnet50", **kw), num_classes=6).eval()
    state = released_state_dict(src, layout)
    prefix = {"cvnet": "encoder_q.", "dolg-pytorch": "globalmodel.", "delg-pytorch": "globalmodel."}[layout]
    assert f"{prefix}stem.conv.weight" in state and f"{prefix}s3.b6.f.c_bn.running_var" in state
    extra = {"cvnet": {"cv_learner.w": torch.zeros(3)}, "dolg-pytorch": {"desc_cls.t": torch.zeros(1)},
             "delg-pytorch": {"desc_cls.t": torch.zeros(1)}}[layout]
    torch.save({"epoch": 10, "model_state": {f"module.{k}": v for k, v in {**state, **extra}.items()}}, tmp_path / "r.pth")
    dst = build_extractor(ExtractorConfig(kind, backbone="resnet50", **kw))  # no classifier: it is skipped
    report = load_released(dst, tmp_path / "r.pth", layout)
    assert report.loaded > 300 and list(extra)[0] in report.ignored
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(src(x), dst.eval()(x), atol=1e-5)
    if kind == "delg":
        assert report.absent and all(k.startswith("autoencoder.") for k in report.absent)
        with pytest.raises(ExtractorError, match="no autoencoder.*num_local=0"):
            load_released(build_extractor(ExtractorConfig("delg", backbone="resnet50", num_local=10)),
                          tmp_path / "r.pth", layout)
    # a release of another depth / dims is refused with the reason
    wrong = build_extractor(ExtractorConfig(kind, backbone="resnet50", **{**kw, "dim": 64}))
    with pytest.raises(ExtractorError, match="shape.*set the extractor's dim"):
        load_released(wrong, tmp_path / "r.pth", layout)


def test_released_loader_refuses_other_layouts(tmp_path):
    ex = build_extractor(tiny("cvnet"))
    torch.save({"encoder_q.stem.conv.weight": torch.zeros(1)}, tmp_path / "r.pth")
    with pytest.raises(ExtractorError, match="ResNet backbone"):
        load_released(build_extractor(tiny("cvnet", "tiny_efficientnet")), tmp_path / "r.pth", "cvnet")
    with pytest.raises(ExtractorError, match="holds a dolg model"):
        load_released(ex, tmp_path / "r.pth", "dolg-pytorch")
    with pytest.raises(ExtractorError, match="unknown released layout"):
        load_released(ex, tmp_path / "r.pth", "netvlad")
    r50 = build_extractor(ExtractorConfig("cvnet", backbone="resnet50", dim=32))
    torch.save({"model_state": {"foo.bar": torch.zeros(1)}}, tmp_path / "x.pth")
    with pytest.raises(ExtractorError, match="not a cvnet checkpoint.*foo.bar"):
        load_released(r50, tmp_path / "x.pth", "cvnet")
