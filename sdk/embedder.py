"""On-device embedding: a bundle's query (or gallery) model run through sdk.backends (ONNX Runtime or
LiteRT), never torch.

`Embedder.from_bundle(path)` reads the manifest, preprocesses with the one spec it carries
(sdk/preprocess.py, identical to training's eval transform) and returns float32 L2-normalised rows
(contract 3). Optional test-time augmentation: multi-scale (1, 1/sqrt2, 1/2 combined by a generalised
mean, as cnnimageretrieval's `extract_ms`) and multi-crop (five or ten crops, averaged).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Literal, Union

import numpy as np
from PIL import Image

from sdk.backends import BACKENDS, BackendError, Runner, open_runner
from sdk.bundle import BundleError, Manifest, ModelEntry, read_manifest
from sdk.errors import SdkError
from sdk.preprocess import _RESAMPLE, ImageError, PreprocessSpec, load_image, normalize, resize_image
from sdk.vectors import l2_normalize

ImageInput = Union[str, Path, bytes, Image.Image, np.ndarray]
Backend = Literal["onnx", "tflite", "coreml"]
Crops = Literal["center", "five", "ten"]

MULTI_SCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)  # the scales of the issue and of cnnimageretrieval
MIN_SIDE = 32  # multi-scale never shrinks an input below this many pixels
CROP_FRACTION = 0.875  # multi-crop: the crops cover this fraction of the (enlarged) shorter side


def to_pil(image: ImageInput) -> Image.Image:
    """Any accepted image input -> RGB PIL image (numpy: HxWx3 or HxW uint8, RGB)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ImageError(f"numpy images must be uint8 HxWx3 RGB (got dtype {image.dtype}); "
                             "convert with (x * 255).clip(0, 255).astype(np.uint8)")
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4)):
            return Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[2] == 1 else image).convert("RGB")
        raise ImageError(f"numpy image must be HxW or HxWx3 (got shape {image.shape})")
    try:
        return load_image(image)
    except Image.DecompressionBombError as e:
        raise ImageError(f"image is too large to decode safely ({e})") from None


class Embedder:
    """images -> float32 (N, D) L2-normalised embeddings in the bundle's embedding space."""

    def __init__(self, runner: Runner, spec: PreprocessSpec, entry: ModelEntry, space: str, backend: str,
                 scales: Sequence[float] = (1.0,), crops: Crops = "center", scale_power: float = 1.0,
                 workers: int | None = None):
        if not scales or any(not (0.0 < s <= 4.0) for s in scales):
            raise SdkError(f"scales must be a non-empty list of numbers in (0, 4], got {list(scales)}")
        if crops not in ("center", "five", "ten"):
            raise SdkError(f"crops must be 'center', 'five' or 'ten', got {crops!r}")
        if scale_power <= 0:
            raise SdkError(f"scale_power must be > 0, got {scale_power}")
        self.runner = runner
        self.spec = spec
        self.entry = entry
        self.space = space
        self.backend = backend
        self.scales = tuple(float(s) for s in scales)
        self.crops = crops
        self.scale_power = float(scale_power)
        self.workers = max(1, workers if workers is not None else min(4, os.cpu_count() or 1))

    @classmethod
    def from_bundle(cls, bundle: str | Path, backend: Backend = "onnx", role: str = "query",
                    precision: str | None = None, threads: int | None = None, multiscale: bool = False,
                    scales: Sequence[float] | None = None, crops: Crops = "center", scale_power: float = 1.0,
                    workers: int | None = None, verify: bool = True) -> "Embedder":
        """Load the `role` model of a bundle with `backend` ('onnx', 'tflite', or 'coreml' on macOS).

        threads: CPU threads of the runtime (None: its default). multiscale: embed at 1, 1/sqrt2 and 1/2
        of the input size and combine by a generalised mean with `scale_power` (1: average; 3: GeM-style,
        for non-negative descriptors). crops: 'five' or 'ten' (with flips) crops averaged.
        """
        if backend not in BACKENDS:
            raise SdkError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        bundle = Path(bundle)
        manifest: Manifest = read_manifest(bundle, verify=verify)
        entry = manifest.model(role)
        mfile = entry.file(backend, precision)
        runner = open_runner(bundle / mfile.path, mfile, threads, entry.preprocess)
        # The runtime says how the file wants its input laid out (TFLite: NHWC); everything else is the spec.
        spec = replace(entry.preprocess, layout=runner.layout)
        if scales is None:
            scales = MULTI_SCALES if multiscale else (1.0,)
        return cls(runner, spec, entry, manifest.embedding_space, backend, scales=scales, crops=crops,
                   scale_power=scale_power, workers=workers)

    # ------------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.entry.embedding_dim

    @property
    def role(self) -> str:
        return self.entry.role

    def __repr__(self) -> str:
        return (f"Embedder({self.entry.name!r}, role={self.role}, backend={self.backend}, dim={self.dim}, "
                f"space={self.space!r}, scales={self.scales}, crops={self.crops})")

    def _views(self, img: Image.Image) -> list[list[np.ndarray]]:
        """One image -> per scale, the list of preprocessed crops (arrays without batch axis)."""
        out = []
        h, w = self.spec.input_size
        for s in self.scales:
            size = (max(MIN_SIDE, round(h * s)), max(MIN_SIDE, round(w * s)))
            spec = self.spec.with_size(size) if s != 1.0 else self.spec
            crops = ([resize_image(img, spec)] if self.crops == "center"
                     else _multi_crops(img, spec, self.crops == "ten"))
            out.append([normalize(np.asarray(c), spec) for c in crops])
        return out

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        y = self.runner.embed(batch)
        if y.shape[1] != self.dim:
            raise BackendError(f"model returned {y.shape[1]}-d embeddings, manifest says {self.dim}; re-export the bundle")
        return y

    def embed(self, images: Iterable[ImageInput], batch_size: int = 32, progress: bool = False,
              desc: str = "embedding") -> np.ndarray:
        """Several images (paths, bytes, PIL or uint8 arrays) -> float32 (N, D), rows L2-normalised.

        A bad image raises ImageError naming it; use `embed_valid` to skip bad images instead.
        """
        vectors, _, errors = self._embed(images, batch_size, progress, desc, skip_errors=False)
        return vectors

    def embed_valid(self, images: Iterable[ImageInput], batch_size: int = 32, progress: bool = False,
                    desc: str = "embedding") -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
        """Like `embed`, but unreadable images are skipped: (vectors of the good ones, their indices,
        [(index, error message)] of the bad ones)."""
        return self._embed(images, batch_size, progress, desc, skip_errors=True)

    def _embed(self, images, batch_size, progress, desc, skip_errors):
        from tqdm.auto import tqdm

        if isinstance(images, (str, Path, bytes, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim < 4):
            # iterating one image would embed its characters / bytes / rows as "images"
            raise TypeError(f"embed() takes a list of images, got one {type(images).__name__}; "
                            "use embed_one(image) for a single image")
        images = list(images)
        if batch_size < 1:
            raise SdkError(f"batch_size must be >= 1, got {batch_size}")
        chunks, ok, errors = [], [], []
        bar = tqdm(total=len(images), desc=desc, unit="img", disable=not progress)

        def prepare(i):
            try:
                return i, self._views(to_pil(images[i])), None
            except ImageError as e:
                if not skip_errors:
                    raise
                return i, None, str(e)

        pool = ThreadPoolExecutor(self.workers) if self.workers > 1 and len(images) > 1 else None
        try:
            for start in range(0, len(images), batch_size):
                idx = range(start, min(start + batch_size, len(images)))
                prepared = list(pool.map(prepare, idx)) if pool else [prepare(i) for i in idx]
                good = [(i, v) for i, v, err in prepared if err is None]
                errors += [(i, err) for i, _, err in prepared if err is not None]
                if good:
                    chunks.append(self._combine([v for _, v in good]))
                    ok += [i for i, _ in good]
                bar.update(len(idx))
        finally:
            if pool:
                pool.shutdown()
            bar.close()
        vectors = np.concatenate(chunks) if chunks else np.empty((0, self.dim), np.float32)
        return vectors, ok, errors

    def embed_one(self, image: ImageInput) -> np.ndarray:
        """One image -> float32 (D,) L2-normalised."""
        return self.embed([image], batch_size=1)[0]

    __call__ = embed

    def _combine(self, views: list[list[list[np.ndarray]]]) -> np.ndarray:
        """Run every (scale, crop) view batched across images, then pool crops (mean) and scales (gen. mean)."""
        n, p = len(views), self.scale_power
        acc = np.zeros((n, self.dim), np.float64)
        for si in range(len(self.scales)):
            n_crops = len(views[0][si])
            per_scale = np.zeros((n, self.dim), np.float64)
            for ci in range(n_crops):
                y = self._infer(np.stack([v[si][ci] for v in views]))
                per_scale += l2_normalize(y)
            per_scale = l2_normalize(per_scale / n_crops)
            acc += np.sign(per_scale) * np.abs(per_scale) ** p
        acc /= len(self.scales)
        out = np.sign(acc) * np.abs(acc) ** (1.0 / p)
        if not np.isfinite(out).all():
            raise BackendError("the model produced NaN/inf embeddings; check the model file and its precision")
        return l2_normalize(out).astype(np.float32)


def _multi_crops(img: Image.Image, spec: PreprocessSpec, flips: bool) -> list[Image.Image]:
    """Four corners + centre of the image scaled so its shorter side is input/CROP_FRACTION (+ mirrored)."""
    th, tw = spec.input_size
    w, h = img.size
    if spec.resize == "exact":
        nw, nh = round(tw / CROP_FRACTION), round(th / CROP_FRACTION)
    else:
        scale = max(th, tw) / CROP_FRACTION / min(w, h)
        nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    big = img.resize((nw, nh), _RESAMPLE[spec.interpolation])
    boxes = [(0, 0), (nw - tw, 0), (0, nh - th), (nw - tw, nh - th), ((nw - tw) // 2, (nh - th) // 2)]
    crops = [big.crop((x, y, x + tw, y + th)) for x, y in boxes]
    if flips:
        crops += [c.transpose(Image.FLIP_LEFT_RIGHT) for c in crops]
    return crops


__all__ = ["Embedder", "BackendError", "MULTI_SCALES", "to_pil", "BundleError"]
