"""Image -> tensor transforms for training and evaluation, built on the one preprocessing spec.

The eval transform *is* `sdk.preprocess.preprocess_image` wrapped in `torch.from_numpy`, so training
evaluates on exactly the tensors the SDK produces. Train and multi-crop transforms reuse the spec's
interpolation and `normalize`. Plain PIL + numpy (no torchvision). Transforms are small picklable
dataclasses so DataLoader workers can use them; a seeded one gives each worker its own stream.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from sdk.preprocess import PreprocessSpec, load_image, normalize, preprocess_image

from training.config import check_fields
from training.errors import TrainingError

ImageSource = Union[str, Path, bytes, Image.Image]

_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


# ---------------------------------------------------------------- building blocks (pure functions)


def to_tensor(img: Image.Image, spec: PreprocessSpec) -> torch.Tensor:
    """PIL RGB image (already at its final size) -> float32 tensor normalised per the spec."""
    return torch.from_numpy(normalize(np.asarray(img.convert("RGB")), spec))


def random_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of a random resized crop of a width x height image: a box
    covering `scale` of the area with aspect (w/h) in `ratio`, as the usual RandomResizedCrop draws it
    (10 tries, then a centre crop with clamped aspect). Drawn apart from the pixels so that a plan of
    crops can be made first and cut later, one image at a time."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            break
    else:  # fallback: the largest centred box with aspect clamped into `ratio`
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, round(width / ratio[0])
        elif in_ratio > ratio[1]:
            h, w = height, round(height * ratio[1])
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def random_resized_crop(
    img: Image.Image,
    size: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: random.Random,
    resample: int = Image.BILINEAR,
) -> Image.Image:
    """Crop a random box (`random_box`) covering `scale` of the area with aspect (w/h) in `ratio`,
    resize to (h, w)."""
    out_h, out_w = size
    return img.crop(random_box(img.width, img.height, scale, ratio, rng)).resize((out_w, out_h), resample)


def color_jitter(img: Image.Image, strength: float, rng: random.Random) -> Image.Image:
    """Brightness, contrast and saturation each scaled by a factor in [1-strength, 1+strength], random order."""
    if strength <= 0:
        return img
    ops = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    rng.shuffle(ops)
    for op in ops:
        img = op(img).enhance(rng.uniform(1.0 - strength, 1.0 + strength))
    return img


def dino_photometric(img: Image.Image, grayscale: float, blur: float, solarize: float, rng: random.Random) -> Image.Image:
    """DINO's photometric augmentations beyond colour jitter, each with its probability: grayscale, Gaussian
    blur (radius 0.1-2 px, DINO's sigma range) and solarization (pixels >= 128 inverted)."""
    if grayscale and rng.random() < grayscale:
        img = ImageOps.grayscale(img).convert("RGB")
    if blur and rng.random() < blur:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.1, 2.0)))
    if solarize and rng.random() < solarize:
        img = ImageOps.solarize(img, 128)
    return img


SMALL_IMAGES = ("upscale", "error")


def fit_small_image(img: Image.Image, min_side: int, policy: str, resample: int = Image.BICUBIC) -> Image.Image:
    """An image whose short side is below `min_side` (the largest crop): upscaled so that side equals it
    (`policy` "upscale"), or a TrainingError ("error"). Larger images are returned as they are."""
    short = min(img.size)
    if short >= min_side:
        return img
    if policy == "error":
        raise TrainingError(f"image {img.size[0]}x{img.size[1]} is smaller than the {min_side} px crop; use larger "
                            "images, a smaller crop size, or small_images='upscale'")
    if policy != "upscale":
        raise TrainingError(f"small_images must be one of {SMALL_IMAGES}, got {policy!r}")
    w, h = img.size
    return img.resize((max(min_side, round(w * min_side / short)), max(min_side, round(h * min_side / short))), resample)


# ---------------------------------------------------------------- validation


def _check_range(name: str, value: tuple[float, float], lo: float, hi: float) -> tuple[float, float]:
    if len(value) != 2 or not (lo < value[0] <= value[1] <= hi):
        raise TrainingError(f"{name} must be (low, high) with {lo} < low <= high <= {hi}, got {value}")
    return (float(value[0]), float(value[1]))


def _check_size(name: str, size: int | tuple[int, int]) -> tuple[int, int]:
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or min(hw) <= 0:
        raise TrainingError(f"{name} must be a positive int or (height, width), got {size}")
    return (int(hw[0]), int(hw[1]))


def _seeded_rng(seed: int | None, cache: dict) -> random.Random:
    """The transform's RNG: the `random` module itself when unseeded (DataLoader reseeds it per worker,
    so workers differ); with a seed, one `random.Random` per worker derived from (seed, worker id)."""
    if seed is None:
        return random  # type: ignore[return-value]  # the module has the same methods as Random
    info = torch.utils.data.get_worker_info()
    worker = -1 if info is None else info.id
    if cache.get("worker") != worker:
        cache["worker"] = worker
        cache["rng"] = random.Random(seed * 1_000_003 + worker + 1)
    return cache["rng"]


# ---------------------------------------------------------------- transforms


@dataclass(frozen=True)
class EvalTransform:
    """The evaluation transform, exactly `sdk.preprocess.preprocess_image` (bit-identical to the SDK's
    preprocessing) as a torch tensor: (3,H,W) float32 for NCHW specs."""

    spec: PreprocessSpec

    def __call__(self, source: ImageSource) -> torch.Tensor:
        return torch.from_numpy(preprocess_image(source, self.spec))


eval_transform = EvalTransform


@dataclass
class TrainTransform:
    """The training augmentation: random-resized crop to spec.input_size, optional horizontal flip, colour
    jitter, spec normalize; reproducible when `seed` is given."""

    spec: PreprocessSpec
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    color_jitter: float = 0.3
    seed: int | None = None
    _state: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.scale = _check_range("scale", self.scale, 0.0, 1.0)
        self.ratio = _check_range("ratio", self.ratio, 0.0, math.inf)
        check_fields(self, {"color_jitter": "[0, 1)"}, error=TrainingError)

    def __call__(self, source: ImageSource) -> torch.Tensor:
        rng = _seeded_rng(self.seed, self._state)
        img = load_image(source)
        resample = _RESAMPLE[self.spec.interpolation]
        img = random_resized_crop(img, self.spec.input_size, self.scale, self.ratio, rng, resample)
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img = color_jitter(img, self.color_jitter, rng)
        return to_tensor(img, self.spec)


train_transform = TrainTransform


@dataclass
class MultiCropTransform:
    """DINO-style multi-crop: `n_global` large crops then `n_local` small crops, each flipped and jittered.

    Returns a list of tensors (globals first), normalised per the spec; used by MABNet gallery training.
    DINO's other photometric augmentations are options (`grayscale`, `blur`, `solarize`: probabilities per
    crop). An image smaller than the global crop is upscaled first, or refused (`small_images`).
    """

    spec: PreprocessSpec
    n_global: int = 2
    global_size: int | tuple[int, int] = 224
    global_scale: tuple[float, float] = (0.4, 1.0)
    n_local: int = 6
    local_size: int | tuple[int, int] = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_jitter: float = 0.3
    seed: int | None = None
    grayscale: float = 0.0
    blur: float = 0.0
    solarize: float = 0.0
    small_images: str = "upscale"
    _state: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_fields(self, {"small_images": SMALL_IMAGES, "grayscale blur solarize": "[0, 1]",
                            "color_jitter": "[0, 1)"}, error=TrainingError)
        if not isinstance(self.n_global, int) or self.n_global < 1:
            raise TrainingError(f"n_global must be an int >= 1 (the teacher sees global crops), got {self.n_global}")
        if not isinstance(self.n_local, int) or self.n_local < 0:
            raise TrainingError(f"n_local must be an int >= 0, got {self.n_local}")
        self.global_size = _check_size("global_size", self.global_size)
        self.local_size = _check_size("local_size", self.local_size)
        self.global_scale = _check_range("global_scale", self.global_scale, 0.0, 1.0)
        self.local_scale = _check_range("local_scale", self.local_scale, 0.0, 1.0)
        self.ratio = _check_range("ratio", self.ratio, 0.0, math.inf)

    def _crop(self, img: Image.Image, size, scale, rng: random.Random) -> torch.Tensor:
        out = random_resized_crop(img, size, scale, self.ratio, rng, _RESAMPLE[self.spec.interpolation])
        if rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        out = dino_photometric(color_jitter(out, self.color_jitter, rng), self.grayscale, self.blur, self.solarize, rng)
        return to_tensor(out, self.spec)

    def __call__(self, source: ImageSource) -> list[torch.Tensor]:
        rng = _seeded_rng(self.seed, self._state)
        img = fit_small_image(load_image(source), max(self.global_size), self.small_images,
                              _RESAMPLE[self.spec.interpolation])
        crops = [self._crop(img, self.global_size, self.global_scale, rng) for _ in range(self.n_global)]
        crops += [self._crop(img, self.local_size, self.local_scale, rng) for _ in range(self.n_local)]
        return crops
