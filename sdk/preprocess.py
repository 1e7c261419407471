"""The one preprocessing spec (contract 1 of ARCHITECTURE.md) and its numpy/PIL implementation.

Training's eval transform, the exporters, the SDK embedder and the web demo all read a
`PreprocessSpec` (stored in the bundle manifest) and run `preprocess_image`, so an image becomes the
same tensor everywhere. No torch here: the runtime installs without it.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from sdk.errors import SdkError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


class ImageError(SdkError):
    """An image file is missing, unreadable or not an image."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How a model wants its input.

    resize="shorter": scale the shorter side to size/crop_pct, then centre-crop to `input_size`
    (crop_pct=1.0 keeps the whole shorter side). resize="exact": scale straight to `input_size`.
    """

    input_size: tuple[int, int] = (224, 224)  # (height, width)
    resize: Literal["shorter", "exact"] = "shorter"
    crop_pct: float = 1.0
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    value_range: float = field(default=255.0)  # raw pixel values are divided by this before mean/std

    def __post_init__(self) -> None:
        h, w = self.input_size
        if h <= 0 or w <= 0:
            raise SdkError(f"input_size must be positive, got {self.input_size}")
        if self.resize not in ("shorter", "exact"):
            raise SdkError(f"resize must be 'shorter' or 'exact', got {self.resize!r}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise SdkError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in _RESAMPLE:
            raise SdkError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise SdkError("mean and std need 3 values each, std > 0")

    def with_size(self, size: int | tuple[int, int]) -> "PreprocessSpec":
        """The same spec at another input size (an int means square)."""
        hw = (size, size) if isinstance(size, int) else tuple(size)
        return PreprocessSpec(**{**asdict(self), "input_size": hw})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise SdkError(f"unknown preprocessing keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        d = dict(d)
        for key in ("input_size", "mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def _open(source: str | Path | bytes, draft: int | None = None, decode: bool = True) -> Image.Image:
    """The image decoded (not yet converted; a JPEG at the smallest scale >= `draft` when given; only its
    header read with decode=False); every failure is an ImageError naming the file."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        if draft:
            img.draft("RGB", (draft, draft))
        if decode:
            img.load()
        return img
    except FileNotFoundError:
        raise ImageError(f"image not found: {source} (check the path)") from None
    except Image.DecompressionBombError:
        raise ImageError(f"image {name} has too many pixels (a decompression bomb?); send a smaller image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError,
            ZeroDivisionError, OverflowError) as e:  # what Pillow's decoders raise on damaged or hostile files
        raise ImageError(f"cannot read image {name}: {e} (is it a valid JPEG/PNG file?)") from None


def image_size(source: str | Path | bytes | Image.Image) -> tuple[int, int]:
    """(width, height) as `load_image` would give them, from the header alone (no pixels decoded)."""
    if isinstance(source, Image.Image):
        return source.size
    with _open(source, decode=False) as img:
        return img.size


def load_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    """Open an image as RGB, with a one-line error naming the file when it is missing or not an image."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    return _open(source).convert("RGB")


def thumbnail_jpeg(source: str | Path | bytes | Image.Image, size: int) -> bytes:
    """A JPEG thumbnail at most size x size (JPEGs are decoded at a reduced scale: cheap for big photos)."""
    img = source.convert("RGB") if isinstance(source, Image.Image) else _open(source, draft=size).convert("RGB")
    img.thumbnail((size, size))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()


def resize_image(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Geometric part of the spec: resize (and centre-crop) to spec.input_size."""
    th, tw = spec.input_size
    resample = _RESAMPLE[spec.interpolation]
    if spec.resize == "exact":
        return img.resize((tw, th), resample)
    w, h = img.size
    scale = max(th, tw) / spec.crop_pct / min(w, h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    img = img.resize((nw, nh), resample)
    left, top = (nw - tw) // 2, (nh - th) // 2
    return img.crop((left, top, left + tw, top + th))


def normalize(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """HWC uint8/float RGB pixels -> float32 array in the spec's channel order and layout (no batch axis)."""
    x = pixels.astype(np.float32) / np.float32(spec.value_range)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    if spec.channel_order == "BGR":
        x = x[..., ::-1]
    if spec.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


def preprocess_image(source: str | Path | bytes | Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Image (path, bytes or PIL) -> float32 array of shape (3,H,W) or (H,W,3) per spec.layout."""
    img = resize_image(load_image(source), spec)
    return normalize(np.asarray(img), spec)


def preprocess_batch(sources, spec: PreprocessSpec) -> np.ndarray:
    """Several images -> one float32 batch (N,3,H,W) or (N,H,W,3)."""
    return np.stack([preprocess_image(s, spec) for s in sources])
