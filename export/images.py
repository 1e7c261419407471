"""Image folders for calibration and parity checks: find the images, derive retrieval labels, preprocess.

numpy + PIL only (through sdk.preprocess), so `verify` can run on an install without torch.
Labels, for the retrieval mAP that `verify` prints, come from the folder layout (sdk.eval_data.label_of):
  DIR/<class>/<image>   one subfolder per class (e.g. `training.data.make_instance_set`);
  DIR/ukbench00012.jpg  UKBench: the group is index // 4;
  DIR/<name>_<digits>[_<digits>...].jpg  the name before the trailing numbers (PhotoTourism landmarks).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.errors import ExportError
from sdk.eval_data import label_of  # the one labelling rule (`retrieval-sdk evaluate` uses it too)
from sdk.preprocess import ImageError, PreprocessSpec, load_image, normalize, resize_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def find_images(folder: str | Path, what: str = "image") -> list[Path]:
    """All image files under `folder` (recursively, sorted), or an ExportError naming the fix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{what} folder {folder} does not exist or is not a folder; pass a folder of photos")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ExportError(f"{what} folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); put photos like "
                          "the ones your users will query with in it (50-300 is plenty)")
    return files


@dataclass
class ImageSet:
    """A folder of images: resized RGB pixels (N, H, W, 3) uint8 at one spec's input size, and labels."""

    name: str
    paths: list[Path]
    pixels: np.ndarray
    labels: np.ndarray | None  # None when the folder gives no usable labels (every image its own class)

    def batch(self, spec: PreprocessSpec) -> np.ndarray:
        """Float32 NCHW (or per spec.layout) model input, normalised per `spec`."""
        return np.stack([normalize(p, spec) for p in self.pixels])


def load_image_set(folder: str | Path, spec: PreprocessSpec, max_images: int | None = None, seed: int = 0,
                   what: str = "image", progress: bool = False) -> ImageSet:
    """Read and resize the images of `folder` (a seeded sample of `max_images` when there are more).
    Unreadable files are skipped with a note; a folder with none readable is an ExportError."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    files = find_images(folder, what)
    if max_images is not None and len(files) > max_images:
        files = sorted(random.Random(seed).sample(files, max_images))
    pixels, kept, bad = [], [], []
    for f in tqdm(files, desc=f"reading {what}s", unit="img", disable=not progress, leave=False):
        try:
            pixels.append(np.asarray(resize_image(load_image(f), spec)))
            kept.append(f)
        except ImageError:
            bad.append(f)
    if not kept:
        raise ExportError(f"none of the {len(files)} files in {what} folder {folder} is a readable image "
                          f"(first: {bad[0]}); use JPEG/PNG photos")
    labels = np.asarray([label_of(f, folder) for f in kept])
    _, counts = np.unique(labels, return_counts=True)
    usable = len(counts) >= 2 and (counts >= 2).any()
    return ImageSet(folder.name, kept, np.stack(pixels), labels if usable else None)


def random_images(n: int, spec: PreprocessSpec, seed: int = 0) -> ImageSet:
    """Smooth random RGB images, for quick parity checks when no photo folder is given."""
    rng = np.random.default_rng(seed)
    h, w = spec.input_size
    small = rng.integers(0, 256, (n, max(h // 16, 2), max(w // 16, 2), 3)).astype(np.uint8)
    from PIL import Image

    pixels = np.stack([np.asarray(Image.fromarray(s).resize((w, h), Image.BILINEAR)) for s in small])
    return ImageSet("random", [], pixels, None)
