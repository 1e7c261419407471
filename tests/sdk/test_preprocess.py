"""The one preprocessing spec: geometry, normalisation, serialisation and errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdk.preprocess import ImageError, PreprocessSpec, load_image, preprocess_image


def test_shorter_side_resize_then_centre_crop():
    img = Image.new("RGB", (400, 200))
    img.paste((255, 0, 0), (0, 0, 80, 200))  # red left strip is cropped away by the centre crop
    x = preprocess_image(img, PreprocessSpec(input_size=(100, 100), mean=(0, 0, 0), std=(1, 1, 1)))
    assert x.shape == (3, 100, 100) and x.dtype == np.float32
    assert x[0].max() == 0.0  # no red left


def test_normalisation_and_layouts():
    img = Image.new("RGB", (8, 8), (255, 128, 0))
    spec = PreprocessSpec(input_size=(8, 8), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), layout="NHWC",
                          channel_order="BGR")
    x = preprocess_image(img, spec)
    assert x.shape == (8, 8, 3)
    np.testing.assert_allclose(x[0, 0], [(0 / 255 - 0.5) / 0.5, (128 / 255 - 0.5) / 0.5, 1.0], atol=1e-6)


def test_spec_roundtrips_through_dict():
    spec = PreprocessSpec(input_size=(160, 128), resize="exact", interpolation="bicubic")
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        PreprocessSpec.from_dict({**spec.to_dict(), "gamma": 2})


@pytest.mark.parametrize("kwargs,match", [({"input_size": (0, 3)}, "positive"), ({"crop_pct": 1.5}, "crop_pct"),
                                          ({"resize": "fit"}, "resize"), ({"std": (1, 0, 1)}, "std")])
def test_bad_specs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreprocessSpec(**kwargs)


def test_missing_and_corrupt_images(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ImageError, match="cannot read image .*bad.jpg"):
        load_image(tmp_path / "bad.jpg")


def test_real_photo(ukbench_dir):
    x = preprocess_image(ukbench_dir / "ukbench00000.jpg", PreprocessSpec())
    assert x.shape == (3, 224, 224) and np.isfinite(x).all() and -3 < x.mean() < 3
