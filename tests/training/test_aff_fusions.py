"""The fusion variants beside the mixer (LAFF-style, DOLG-style orthogonal) and what every token fusion
shares with it: unit embeddings, padding ignored, every feature used, batch independence, token dropout."""

from __future__ import annotations

import pytest
import torch

from training.aff.fusions import LAFFFusion, OrthogonalFusion
from training.aff.mixer import FUSION_KINDS, FeatureSpec, MixerArch, MixerInputError, build_mixer, local_key, mask_key

SPECS = (FeatureSpec("delg", 12), FeatureSpec("delg", 6, local=True, tokens=5), FeatureSpec("cvnet", 20))
TOKEN_KINDS = ("transformer", "laff", "orthogonal")


def inputs(b: int = 3, count: int = 5) -> dict[str, torch.Tensor]:
    return {"delg": torch.randn(b, 12), local_key("delg"): torch.randn(b, 5, 6),
            mask_key("delg"): torch.arange(5)[None].expand(b, 5) < count, "cvnet": torch.randn(b, 20)}


def fusion(kind: str, **kw):
    torch.manual_seed(0)
    return build_mixer(MixerArch(SPECS, kind=kind, dim=16, depth=1, heads=4, embedding_dim=8, **kw)).eval()


def test_build_mixer_knows_every_kind():
    assert isinstance(fusion("laff"), LAFFFusion) and isinstance(fusion("orthogonal"), OrthogonalFusion)
    assert len({type(fusion(k)) for k in FUSION_KINDS}) == len(FUSION_KINDS)


@pytest.mark.parametrize("kind", TOKEN_KINDS)
def test_unit_embeddings_padding_ignored_and_batch_independent(kind):
    m = fusion(kind)
    x = inputs(b=4, count=2)
    y = dict(x)
    y[local_key("delg")] = x[local_key("delg")].clone()
    y[local_key("delg")][:, 2:] = 100.0  # garbage in the padded slots
    with torch.no_grad():
        out = m(x)
        assert out.shape == (4, 8) and torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)
        assert torch.allclose(out, m(y), atol=1e-5)
        assert torch.allclose(out[1:2], m({k: v[1:2] for k, v in x.items()}), atol=1e-5)
        y[local_key("delg")][:, 0] += 1.0  # a valid slot does matter
        assert not torch.allclose(out, m(y), atol=1e-4)


@pytest.mark.parametrize("kind", TOKEN_KINDS)
def test_every_feature_reaches_the_output_and_every_parameter_trains(kind):
    m = fusion(kind).train()
    m(inputs()).sum().backward()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []
    m.eval()
    x = inputs()
    with torch.no_grad():
        base = m(x)
        for key in ("delg", "cvnet"):
            assert not torch.allclose(base, m({**x, key: torch.randn_like(x[key])}), atol=1e-4), key


def test_token_dropout_drops_whole_features_but_never_all_of_them():
    m = fusion("laff", token_dropout=0.9).train()
    torch.manual_seed(1)
    _, pad = m.feature_tokens(inputs(b=256))
    feature_dropped = torch.stack([pad[:, 0], pad[:, 1:6].all(1), pad[:, 6]], 1)
    assert feature_dropped.any() and not feature_dropped.all(1).any()
    assert torch.equal(pad[:, 1:6].all(1), pad[:, 1:6].any(1))  # a local set goes as a whole
    assert torch.isfinite(m(inputs(b=256))).all()
    m.eval()
    assert not m.feature_tokens(inputs())[1].any()  # no dropout at evaluation


def test_laff_weights_are_a_softmax_over_the_valid_tokens():
    with torch.no_grad():
        h, a = fusion("laff").weights(inputs(count=2))
    assert h.shape == (3, 7, 16) and torch.allclose(a.sum(1), torch.ones(3), atol=1e-6)
    assert (a[:, 3:6] == 0).all() and (a[:, :3] > 0).all()


def test_orthogonal_fusion_needs_a_global_anchor_and_something_to_fuse():
    with pytest.raises(MixerInputError, match="global feature first"):
        fusion_specs = (SPECS[1], SPECS[0])
        OrthogonalFusion(MixerArch(fusion_specs, kind="orthogonal", dim=16, heads=4))
    with pytest.raises(MixerInputError, match="at least two features"):
        OrthogonalFusion(MixerArch(SPECS[:1], kind="orthogonal", dim=16, heads=4))
    with pytest.raises(MixerInputError, match="mixer kind must be one of"):
        build_mixer(MixerArch(SPECS, kind="gated"))
