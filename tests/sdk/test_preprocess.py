"""The one preprocessing spec: geometry, normalisation, serialisation and errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdk.preprocess import ImageError, PreprocessSpec, image_size, load_image, preprocess_image


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


def test_image_size_reads_the_header_only(tmp_path):
    """The size load_image would give, without decoding: a truncated JPEG still has one; unreadable files
    are the same one-line ImageError as load_image's."""
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "ok.jpg").write_bytes(buf.getvalue())
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert image_size(tmp_path / "ok.jpg") == load_image(tmp_path / "ok.jpg").size == (500, 300)
    assert image_size(tmp_path / "cut.jpg") == (500, 300)
    with pytest.raises(ImageError, match="cannot read image .*cut.jpg"):
        load_image(tmp_path / "cut.jpg")
    assert image_size(load_image(tmp_path / "ok.jpg")) == (500, 300) and image_size(buf.getvalue()) == (500, 300)
    with pytest.raises(ImageError, match="not found"):
        image_size(tmp_path / "missing.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="cannot read image .*bad.jpg"):
        image_size(tmp_path / "bad.jpg")
