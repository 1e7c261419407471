"""Pooling: hand-computed values, the GeM limits (p=1 -> SPoC, p -> inf -> MAC), gradients, ONNX export."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import training  # noqa: F401  (installs the torchvision shim before anything else)
from training.pooling import RMAC, GeM, MAC, SPoC, build_pooling, gem, mac, rmac, rmac_regions, spoc


def _positive_map(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) + 0.01  # (0.01, 1.01): post-ReLU-like, no clamping involved


def test_hand_computed_values():
    # one channel holding [[1, 2], [3, 6]]
    x = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]])
    assert spoc(x).item() == pytest.approx(3.0)  # (1 + 2 + 3 + 6) / 4
    assert mac(x).item() == pytest.approx(6.0)
    # p = 2: sqrt((1 + 4 + 9 + 36) / 4) = sqrt(12.5)
    assert gem(x, p=2.0).item() == pytest.approx(math.sqrt(12.5), rel=1e-6)


def test_output_shape_is_batch_by_channels():
    x = _positive_map(3, 5, 4, 7)
    for pool in (GeM(), SPoC(), MAC()):
        assert pool(x).shape == (3, 5)


def test_gem_with_p_one_equals_spoc():
    x = _positive_map(2, 8, 5, 6)
    torch.testing.assert_close(gem(x, p=1.0), spoc(x))


def test_gem_approaches_mac_as_p_grows():
    x = _positive_map(2, 8, 4, 4)
    target = mac(x)
    errors = [(gem(x, p=p) - target).abs().max().item() for p in (3.0, 20.0, 200.0)]
    assert errors[0] > errors[1] > errors[2]
    # (1/16)^(1/200) ~ 0.986: at p=200 GeM is within 2% of the max (never above it)
    assert torch.all(gem(x, p=200.0) <= target * (1 + 1e-5))
    torch.testing.assert_close(gem(x, p=200.0), target, rtol=0.02, atol=0.0)


@pytest.mark.parametrize("p", [1.0, 3.0, 7.5])
def test_gem_of_constant_map_is_the_constant(p):
    x = torch.full((2, 3, 5, 4), 0.7)
    torch.testing.assert_close(gem(x, p=p), torch.full((2, 3), 0.7))


def test_gem_clamps_negative_and_zero_inputs():
    x = torch.tensor([[[[-5.0, 0.0]]]])
    out = gem(x, p=3.0, eps=1e-6)
    assert torch.isfinite(out).all()
    assert out.item() == pytest.approx(1e-6, rel=1e-4)


def test_learnable_p_gets_a_gradient_and_fixed_p_does_not_train():
    pool = GeM(p=3.0, learnable=True)
    assert [name for name, _ in pool.named_parameters()] == ["p"]
    pool(_positive_map(2, 4, 3, 3)).sum().backward()
    assert pool.p.grad is not None and pool.p.grad.abs().item() > 0

    fixed = GeM(p=3.0, learnable=False)
    assert list(fixed.parameters()) == []
    assert "p" in dict(fixed.named_buffers())


def test_gem_rejects_non_positive_p():
    with pytest.raises(ValueError, match="p must be > 0"):
        GeM(p=0.0)
    with pytest.raises(ValueError, match="p must be > 0"):
        gem(_positive_map(1, 1, 2, 2), p=-1.0)


def test_pooling_rejects_flat_input():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        spoc(torch.ones(2, 3))


def test_build_pooling_by_name():
    assert isinstance(build_pooling("gem", p=4.0, learnable=False), GeM)
    assert build_pooling("GeM", p=4.0).p.item() == pytest.approx(4.0)
    assert isinstance(build_pooling("spoc"), SPoC)
    assert isinstance(build_pooling("mac"), MAC)
    with pytest.raises(ValueError, match="unknown pooling 'avg'"):
        build_pooling("avg")


def test_rmac_regions_cover_the_map_at_three_levels():
    # a 2x2 conv5 map (64 px input): the whole map, then its four cells (level 2), then 3x3 cells of side 1
    assert rmac_regions(2, 2)[:5] == [(0, 0, 2, 2), (0, 0, 1, 1), (0, 1, 1, 1), (1, 0, 1, 1), (1, 1, 1, 1)]
    assert len(rmac_regions(2, 2)) == 1 + 4 + 9
    for h, w in ((7, 10), (10, 7), (4, 4), (1, 3)):
        regions = rmac_regions(h, w)
        assert regions and all(0 <= t and t + rh <= h and 0 <= lft and lft + rw <= w for t, lft, rh, rw in regions)
        assert regions[0][2] == min(h, w)  # level 1: squares of the short side
    assert len(rmac_regions(7, 10)) > len(rmac_regions(7, 7))  # extra regions along the long side


def test_rmac_is_the_sum_of_normalised_regional_maxima():
    x = _positive_map(2, 3, 4, 6)
    expected = F.normalize(mac(x), dim=1)
    for t, lft, rh, rw in rmac_regions(4, 6):
        expected = expected + F.normalize(x[..., t:t + rh, lft:lft + rw].amax(dim=(-2, -1)), dim=1)
    assert torch.allclose(rmac(x), expected, atol=1e-6)
    assert isinstance(build_pooling("rmac"), RMAC) and torch.allclose(RMAC()(x), expected, atol=1e-6)
    # one region per level on a square map whose maximum sits everywhere: 1 + levels terms of the same vector
    ones = torch.ones(1, 2, 3, 3)
    assert rmac(ones).shape == (1, 2) and rmac(ones)[0, 0] > 1.0


def _export_and_run(module: torch.nn.Module, example: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    """Export with dynamic batch/H/W (opset 17, TorchScript exporter: the dynamo one needs onnxscript)
    and check onnxruntime against torch at every input size."""
    import onnxruntime as ort

    module.eval()
    buf = io.BytesIO()
    torch.onnx.export(
        module,
        (example,),
        buf,
        dynamo=False,
        opset_version=17,
        input_names=["features"],
        output_names=["pooled"],
        dynamic_axes={"features": {0: "batch", 2: "height", 3: "width"}},
    )
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    for x in inputs:
        (got,) = session.run(None, {"features": x.numpy()})
        with torch.no_grad():
            want = module(x).numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("module", [GeM(p=3.0, learnable=True), GeM(p=2.5, learnable=False), SPoC(), MAC()],
                         ids=["gem-learnable", "gem-fixed", "spoc", "mac"])
def test_onnx_export_with_dynamic_spatial_size(module):
    _export_and_run(
        module,
        _positive_map(1, 6, 7, 7),
        [_positive_map(2, 6, 7, 7, seed=1), _positive_map(3, 6, 11, 5, seed=2)],
    )
