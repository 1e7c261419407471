"""Transforms: eval is the SDK's preprocessing bit-for-bit; train and multi-crop have the right shapes,
are reproducible with a seed, and reject bad settings with clear errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import training  # noqa: F401  (installs the torchvision shim before anything else)
from sdk.preprocess import PreprocessSpec, preprocess_image
from training.data import ImageDataset
from training.transforms import MultiCropTransform, color_jitter, eval_transform, train_transform


@pytest.fixture(scope="module")
def photo(ukbench_dir):
    return ukbench_dir / "ukbench00004.jpg"


@pytest.fixture(scope="module")
def pattern() -> Image.Image:
    """A non-symmetric 120x90 test image (a flip or a crop changes it)."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))


# ---------------------------------------------------------------- eval


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "spec",
    [
        PreprocessSpec(),
        PreprocessSpec(input_size=(160, 128), crop_pct=0.875, interpolation="bicubic"),
        PreprocessSpec(input_size=(96, 96), resize="exact", channel_order="BGR"),
    ],
    ids=["default", "bicubic-crop", "exact-bgr"],
)
def test_eval_transform_equals_sdk_preprocess_bit_for_bit(photo, spec):
    expected = preprocess_image(photo, spec)
    for source in (photo, str(photo), Image.open(photo)):
        x = eval_transform(spec)(source)
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
        assert x.shape == (3, *spec.input_size)
        assert np.array_equal(x.numpy(), expected)


@pytest.mark.shared_data
def test_eval_transform_survives_pickling_for_dataloader_workers(photo):
    t = eval_transform(PreprocessSpec(input_size=(64, 64)))
    assert torch.equal(pickle.loads(pickle.dumps(t))(photo), t(photo))


# ---------------------------------------------------------------- train


def test_train_transform_shape_dtype_for_non_square_spec(pattern):
    spec = PreprocessSpec(input_size=(96, 64))
    x = train_transform(spec, seed=0)(pattern)
    assert x.dtype == torch.float32 and x.shape == (3, 96, 64)
    assert torch.isfinite(x).all()


def test_train_transform_reproducible_with_seed_and_random_across_calls(pattern):
    spec = PreprocessSpec(input_size=(48, 48))
    a, b = train_transform(spec, seed=7), train_transform(spec, seed=7)
    run_a = [a(pattern) for _ in range(4)]
    run_b = [b(pattern) for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(run_a, run_b))
    assert not torch.equal(run_a[0], run_a[1])  # each call draws new augmentation
    assert not torch.equal(run_a[0], train_transform(spec, seed=8)(pattern))


def test_train_transform_without_randomness_is_the_exact_resize_eval(pattern):
    # whole-image crop, no flip, no jitter: must equal the SDK's resize="exact" preprocessing
    spec = PreprocessSpec(input_size=(40, 56), resize="exact", interpolation="bicubic")
    aspect = pattern.width / pattern.height
    t = train_transform(spec, scale=(1.0, 1.0), ratio=(aspect, aspect), hflip=False, color_jitter=0.0, seed=0)
    assert np.array_equal(t(pattern).numpy(), preprocess_image(pattern, spec))


def test_train_transform_hflip_flips_about_half_the_time(pattern):
    spec = PreprocessSpec(input_size=(30, 40), resize="exact")
    aspect = pattern.width / pattern.height
    t = train_transform(spec, scale=(1.0, 1.0), ratio=(aspect, aspect), hflip=True, color_jitter=0.0, seed=1)
    plain = torch.from_numpy(preprocess_image(pattern, spec))
    flipped = plain.flip(-1)
    outs = [t(pattern) for _ in range(30)]
    n_plain = sum(torch.equal(x, plain) for x in outs)
    n_flip = sum(torch.equal(x, flipped) for x in outs)
    assert n_plain + n_flip == 30 and 5 <= n_flip <= 25


def test_color_jitter_changes_pixels_and_zero_strength_is_identity(pattern):
    import random

    assert color_jitter(pattern, 0.0, random.Random(0)) is pattern
    out = np.asarray(color_jitter(pattern, 0.4, random.Random(0)), np.int16)
    assert out.shape == (90, 120, 3) and np.abs(out - np.asarray(pattern, np.int16)).mean() > 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scale": (0.8, 0.2)}, "scale must be"),
        ({"scale": (0.0, 1.0)}, "scale must be"),
        ({"ratio": (0.0, 1.0)}, "ratio must be"),
        ({"color_jitter": 1.5}, "color_jitter must be"),
    ],
)
def test_train_transform_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_transform(PreprocessSpec(), **kwargs)


def test_seeded_transform_gives_each_dataloader_worker_its_own_reproducible_stream(pattern):
    ds = ImageDataset([(pattern, 0)] * 4, train_transform(PreprocessSpec(input_size=(32, 32)), seed=3))

    def run():
        loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, multiprocessing_context="fork")
        return [x[0] for x, _ in loader]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # reproducible
    assert not torch.equal(first[0], first[1])  # items 0 and 1 come from different workers


# ---------------------------------------------------------------- multi-crop


def test_multicrop_default_counts_and_sizes(pattern):
    crops = MultiCropTransform(PreprocessSpec(), seed=0)(pattern)
    assert len(crops) == 8
    assert [tuple(c.shape) for c in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 6
    assert all(c.dtype == torch.float32 for c in crops)


def test_multicrop_custom_counts_sizes_and_seed(pattern):
    t = MultiCropTransform(PreprocessSpec(), n_global=1, global_size=(64, 48), n_local=3, local_size=24, seed=5)
    crops = t(pattern)
    assert [tuple(c.shape) for c in crops] == [(3, 64, 48)] + [(3, 24, 24)] * 3
    again = MultiCropTransform(PreprocessSpec(), n_global=1, global_size=(64, 48), n_local=3, local_size=24, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(crops, again(pattern)))
    assert len(MultiCropTransform(PreprocessSpec(), n_global=2, n_local=0, global_size=32)(pattern)) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_global": 0}, "n_global must be an int >= 1"),
        ({"n_local": -1}, "n_local must be an int >= 0"),
        ({"local_size": 0}, "local_size must be a positive int"),
        ({"global_size": (224,)}, "global_size must be a positive int"),
        ({"local_scale": (0.5, 1.5)}, "local_scale must be"),
        ({"global_scale": (0.9, 0.4)}, "global_scale must be"),
    ],
)
def test_multicrop_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiCropTransform(PreprocessSpec(), **kwargs)
