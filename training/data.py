"""Datasets for training and evaluation: readers for common layouts, class/query splits, a torch Dataset.

Every reader returns a `LabelledImages` (image sources, integer labels, class names) so splitting and
loading work the same for an image folder, a CSV manifest, Google Landmarks v2, Fashion-MNIST or the
procedural instance set. Images are opened with `sdk.preprocess.load_image`, so a missing or corrupt
file raises `ImageError` naming the file. Layout problems raise `DatasetError` saying what was expected.
"""

from __future__ import annotations

import colorsys
import csv
import gzip
import pickle
import random
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter
from torch.utils.data import Dataset

from sdk.bundle import save_atomic
from sdk.preprocess import ImageError, load_image
from training.errors import TrainingError

__all__ = [
    "DatasetError", "ImageError", "LabelledImages", "ImageArrays", "RevisitedData", "ImageDataset",
    "IMAGE_EXTENSIONS", "FASHION_MNIST_CLASSES",
    "select_classes", "split_classes", "split_query_gallery",
    "image_folder", "csv_manifest", "gldv2_csv", "gldv2_path", "revisited", "crop_box", "read_idx", "fashion_mnist_arrays",
    "fashion_mnist", "make_instance_set",
]

ImageSource = Union[str, Path, Image.Image]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


class DatasetError(TrainingError):
    """A dataset folder, manifest or file is missing or not in the expected layout."""


class LabelError(TrainingError):
    """Labels missing or not fitting the features / classifier."""


# ---------------------------------------------------------------- containers


@dataclass(frozen=True)
class LabelledImages:
    """Image sources (paths or in-memory PIL images) with integer labels indexing `classes`."""

    paths: list[ImageSource]
    labels: list[int]
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise DatasetError(f"{len(self.paths)} images but {len(self.labels)} labels; they must pair up")
        bad = [y for y in self.labels if not 0 <= y < len(self.classes)]
        if bad:
            raise DatasetError(f"label {bad[0]} is outside 0..{len(self.classes) - 1} (one per class name)")

    def __len__(self) -> int:
        return len(self.paths)

    def items(self) -> list[tuple[ImageSource, int]]:
        """(source, label) pairs, as `ImageDataset` takes them."""
        return list(zip(self.paths, self.labels))

    def subset(self, indices: Sequence[int]) -> "LabelledImages":
        """The images at `indices`, same classes and labels."""
        return LabelledImages([self.paths[i] for i in indices], [self.labels[i] for i in indices], self.classes)

    def indices_by_class(self) -> list[list[int]]:
        """For each class index, the positions of its images."""
        out: list[list[int]] = [[] for _ in self.classes]
        for i, y in enumerate(self.labels):
            out[y].append(i)
        return out


@dataclass(frozen=True, eq=False)
class ImageArrays:
    """Images held as one uint8 array (N,H,W) grey or (N,H,W,3) RGB, with int64 labels and class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)

    def to_labelled(self) -> LabelledImages:
        """As PIL RGB images (grey replicated to 3 channels), ready for `ImageDataset`."""
        pil = [Image.fromarray(a).convert("RGB") for a in self.images]
        return LabelledImages(pil, [int(y) for y in self.labels], self.classes)


@dataclass(frozen=True)
class RevisitedData:
    """A revisited Oxford/Paris dataset: database images, cropped queries and the per-query ground truth.

    Labels are positions: database label i is `imlist[i]`, query label q is `qimlist[q]` and `gnd[q]`.
    """

    name: str
    database: LabelledImages
    queries: LabelledImages
    gnd: list[dict] = field(repr=False)


# ---------------------------------------------------------------- torch dataset


class ImageDataset(Dataset):
    """(image source, label) items -> (transform(image), label); images opened with sdk's `load_image`."""

    def __init__(
        self,
        items: Sequence[tuple[ImageSource, int]] | LabelledImages,
        transform: Callable[[Image.Image], object],
        classes: Sequence[str] | None = None,
    ) -> None:
        if isinstance(items, LabelledImages):
            classes = items.classes if classes is None else classes
            items = items.items()
        if not callable(transform):
            raise TypeError(f"transform must be callable (e.g. training.transforms.eval_transform(spec)), got {transform!r}")
        self.items = list(items)
        self.transform = transform
        self.classes = None if classes is None else tuple(classes)
        for i, item in enumerate(self.items):
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], (int, np.integer))):
                raise DatasetError(f"item {i} is {item!r}; items must be (path or PIL image, int label) pairs")
            if self.classes is not None and not 0 <= item[1] < len(self.classes):
                raise DatasetError(f"item {i} has label {item[1]} outside 0..{len(self.classes) - 1} (one per class)")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        source, label = self.items[index]
        return self.transform(load_image(source)), int(label)

    @property
    def labels(self) -> list[int]:
        return [int(y) for _, y in self.items]


# ---------------------------------------------------------------- splits


def select_classes(data: LabelledImages, class_ids: Sequence[int]) -> LabelledImages:
    """Only the images of `class_ids`, relabelled 0..k-1 in the order given (so a classifier head fits)."""
    remap = {c: new for new, c in enumerate(class_ids)}
    if len(remap) != len(class_ids) or any(not 0 <= c < len(data.classes) for c in remap):
        raise DatasetError(f"class_ids must be distinct indices in 0..{len(data.classes) - 1}, got {list(class_ids)}")
    keep = [i for i, y in enumerate(data.labels) if y in remap]
    return LabelledImages(
        [data.paths[i] for i in keep], [remap[data.labels[i]] for i in keep], tuple(data.classes[c] for c in class_ids)
    )


def split_classes(
    data: LabelledImages, held_out: float | int = 0.5, seed: int = 0
) -> tuple[LabelledImages, LabelledImages]:
    """Disjoint classes for training and held-out evaluation (retrieval of unseen classes).

    `held_out` is a fraction of the classes (float in (0,1)) or a count (int); the choice is random but
    fixed by `seed`. Both parts are relabelled 0..k-1, keeping the original class order.
    """
    n = len(data.classes)
    k = round(held_out * n) if isinstance(held_out, float) else int(held_out)
    if isinstance(held_out, float) and not 0.0 < held_out < 1.0:
        raise DatasetError(f"held_out as a fraction must be in (0, 1), got {held_out}")
    if not 0 < k < n:
        raise DatasetError(f"held_out={held_out} leaves {k} of {n} classes held out; need at least one on each side")
    held = set(random.Random(seed).sample(range(n), k))
    train_ids = [c for c in range(n) if c not in held]
    return select_classes(data, train_ids), select_classes(data, sorted(held))


def split_query_gallery(
    data: LabelledImages, queries_per_class: int = 1, seed: int = 0
) -> tuple[LabelledImages, LabelledImages]:
    """Per class, `queries_per_class` random images become queries and the rest the gallery (labels kept).

    A class with too few images to leave one in the gallery goes wholly to the gallery as a distractor.
    """
    if queries_per_class < 1:
        raise DatasetError(f"queries_per_class must be >= 1, got {queries_per_class}")
    rng = random.Random(seed)
    queries: list[int] = []
    for members in data.indices_by_class():
        if len(members) > queries_per_class:
            queries.extend(rng.sample(members, queries_per_class))
    if not queries:
        raise DatasetError(f"no class has more than {queries_per_class} images, so no query would have a match")
    chosen = set(queries)
    gallery = [i for i in range(len(data)) if i not in chosen]
    return data.subset(sorted(queries)), data.subset(gallery)


@dataclass(frozen=True)
class Splits:
    """A run's labelled training split, its held-out evaluation split and how they were made."""

    train: LabelledImages
    eval: LabelledImages
    description: str


def _subset(data: LabelledImages, limit: int | None, seed: int) -> LabelledImages:
    if limit is None or limit >= len(data):
        return data
    idx = sorted(random.Random(seed).sample(range(len(data)), limit))
    return data.subset(idx)


def split_images(data: LabelledImages, held_out: float, seed: int = 0) -> tuple[LabelledImages, LabelledImages]:
    """Per class, a `held_out` fraction of its images (at least 2 when it has >= 4) goes to evaluation;
    both parts keep every class, so evaluation sees unseen images of seen classes."""
    rng = random.Random(seed)
    train_idx, eval_idx = [], []
    for members in data.indices_by_class():
        members = list(members)
        rng.shuffle(members)
        k = max(2, round(held_out * len(members))) if len(members) >= 4 else 0
        eval_idx += members[:k]
        train_idx += members[k:]
    if not eval_idx:
        raise DatasetError("no class has >= 4 images, so no evaluation images could be held out")
    return data.subset(sorted(train_idx)), data.subset(sorted(eval_idx))


def load_splits(cfg) -> Splits:
    """The training and evaluation splits of `cfg.data` (a training.config.DataConfig), files written under
    `cfg.out`: the one reader of every labelled layout and split, for every `train` command."""
    d = cfg.data
    out = Path(cfg.out)
    if d.kind == "fashion_mnist":
        root = d.root or "/usr/share/datasets/fashion-mnist"
        train = fashion_mnist(root, "train", d.train_limit)
        evaluation = fashion_mnist(root, "test", d.eval_limit)
        desc = (f"Fashion-MNIST: train {len(train)} images (first of the train split), evaluation {len(evaluation)} "
                f"test-split images of the same {len(train.classes)} classes")
        return Splits(train, evaluation, desc)
    if d.kind == "instances":
        folder = out / "data" / f"instances-{d.n_objects}x{d.n_views}-{d.image_size}px-seed{d.seed}"
        data = make_instance_set(folder, n_objects=d.n_objects, n_views=d.n_views, image_size=d.image_size, seed=d.seed)
        name = f"procedural instance set ({d.n_objects} objects x {d.n_views} views)"
    elif d.kind == "folder":
        data, name = image_folder(d.root), f"image folder {d.root}"
    elif d.kind == "csv":
        data, name = csv_manifest(d.csv, d.root), f"CSV {d.csv}"
    else:
        data, name = gldv2_csv(d.csv, d.root), f"GLDv2 {d.csv}"
        if "" in data.classes:
            raise LabelError(f"{d.csv} has rows without a landmark_id: every image needs a class label")
    if d.split == "classes":
        train, evaluation = split_classes(data, held_out=d.held_out, seed=d.seed)
        how = f"{len(evaluation.classes)} held-out classes (unseen objects) vs {len(train.classes)} training classes"
    else:
        train, evaluation = split_images(data, d.held_out, seed=d.seed)
        how = f"held-out images of the {len(train.classes)} training classes (unseen views of seen objects)"
    train = _subset(train, d.train_limit, d.seed)
    evaluation = _subset(evaluation, d.eval_limit, d.seed + 1)
    return Splits(train, evaluation, f"{name}: train {len(train)} images, evaluation {len(evaluation)} images, {how}")


# ---------------------------------------------------------------- readers


def _natural_classes(names: set[str]) -> list[str]:
    """Class names sorted numerically when all are integers (so '10' follows '9'), else as strings."""
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def image_folder(root: str | Path) -> LabelledImages:
    """Read ROOT/<class>/<image>.jpg (any depth below the class folder); classes sorted by folder name."""
    root = Path(root)
    layout = f"expected {root}/<class>/<image>.jpg (extensions {', '.join(IMAGE_EXTENSIONS)})"
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root} ({layout})")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = {d.name: sorted(p for p in d.rglob("*") if _is_image(p)) for d in class_dirs}
    if not any(per_class.values()):
        raise DatasetError(f"no class subfolders with images in {root}; {layout}")
    empty = [name for name, files in per_class.items() if not files]
    if empty:
        raise DatasetError(f"class folders without images in {root}: {', '.join(empty[:5])} (add images or remove them)")
    classes = tuple(per_class)
    paths = [p for files in per_class.values() for p in files]
    labels = [c for c, files in enumerate(per_class.values()) for _ in files]
    return LabelledImages(paths, labels, classes)


def unlabelled_folder(root: str | Path) -> list[Path]:
    """Every image file under ROOT (any depth, sorted): an unlabelled set such as rank distillation's D."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root} (pass a folder of photos)")
    paths = sorted(p for p in root.rglob("*") if _is_image(p))
    if not paths:
        raise DatasetError(f"no images in {root} (extensions {', '.join(IMAGE_EXTENSIONS)}); put photos in it")
    return paths


def write_images(data: LabelledImages, root: str | Path) -> LabelledImages:
    """The same set with every in-memory image written once as ROOT/<class>/<index>.png (file paths are what
    a disk cache keys on); images that already are files keep their paths."""
    root = Path(root)
    paths: list[ImageSource] = []
    for i, (source, label) in enumerate(data.items()):
        if isinstance(source, (str, Path)):
            paths.append(Path(source))
            continue
        path = root / data.classes[label] / f"{i:06d}.png"
        if not path.is_file():
            save_atomic(load_image(source), path, lambda img, tmp: img.save(tmp, format="PNG"))
        paths.append(path)
    return LabelledImages(paths, list(data.labels), data.classes)


def _read_csv(csv_path: Path, required: Sequence[str], what: str) -> list[dict]:
    if not csv_path.is_file():
        raise DatasetError(f"{what} not found: {csv_path}")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise DatasetError(
                f"{csv_path} has header {','.join(header) or '(empty)'}; expected a header row "
                f"'{','.join(required)}' (missing {', '.join(missing)})"
            )
        reader.fieldnames = header
        rows = list(reader)
    if not rows:
        raise DatasetError(f"{csv_path} has a header but no rows")
    return rows


def csv_manifest(csv_path: str | Path, root: str | Path | None = None) -> LabelledImages:
    """Read a CSV with header `path,label`; labels (strings) become class indices in natural order.

    Relative paths are resolved against `root`, or the CSV's folder when `root` is None. Files are not
    opened here: a missing one raises `ImageError` when loaded.
    """
    csv_path = Path(csv_path)
    base = Path(root) if root is not None else csv_path.parent
    rows = _read_csv(csv_path, ("path", "label"), "CSV manifest")
    for line, row in enumerate(rows, start=2):
        if not (row["path"] or "").strip() or not (row["label"] or "").strip():
            raise DatasetError(f"{csv_path} line {line}: empty path or label (each row needs both)")
    classes = _natural_classes({row["label"].strip() for row in rows})
    index = {c: i for i, c in enumerate(classes)}
    paths = [base / row["path"].strip() for row in rows]
    return LabelledImages(paths, [index[row["label"].strip()] for row in rows], tuple(classes))


def gldv2_path(image_root: str | Path, image_id: str) -> Path:
    """Where Google Landmarks v2 keeps an image: ROOT/a/b/c/abc....jpg for id 'abc...'."""
    if len(image_id) < 3:
        raise DatasetError(f"GLDv2 image id {image_id!r} is shorter than 3 characters; ids are 16 hex digits")
    return Path(image_root) / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def gldv2_csv(csv_path: str | Path, image_root: str | Path) -> LabelledImages:
    """Read Google Landmarks v2: train.csv (`id,landmark_id`, url ignored) or train_clean.csv
    (`landmark_id,images` with space-separated ids); images at image_root/{id[0]}/{id[1]}/{id[2]}/{id}.jpg.
    Classes are landmark ids in numeric order."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(f"GLDv2 CSV not found: {csv_path} (train.csv or train_clean.csv from the GLDv2 release)")
    with open(csv_path, newline="", encoding="utf-8") as f:
        header = [h.strip() for h in next(csv.reader(f), [])]
    if "images" in header and "id" not in header:
        rows = _read_csv(csv_path, ("landmark_id", "images"), "GLDv2 CSV")
        pairs = [(i, row["landmark_id"].strip()) for row in rows for i in row["images"].split()]
    else:
        try:
            rows = _read_csv(csv_path, ("id", "landmark_id"), "GLDv2 CSV")
        except DatasetError as e:
            raise DatasetError(f"{e} (or 'landmark_id,images' as in train_clean.csv)") from None
        pairs = [(row["id"].strip(), row["landmark_id"].strip()) for row in rows]
    classes = _natural_classes({lm for _, lm in pairs})
    index = {c: i for i, c in enumerate(classes)}
    return LabelledImages([gldv2_path(image_root, i) for i, _ in pairs], [index[lm] for _, lm in pairs], tuple(classes))


def revisited(root: str | Path, name: str) -> RevisitedData:
    """Read revisited Oxford/Paris (`roxford5k`, `rparis6k`): ROOT/gnd_NAME.pkl and ROOT/jpg/<imname>.jpg.

    Database images stay as paths; each query is loaded and cropped to its ground-truth box `bbx`
    (x1, y1, x2, y2), as the protocol requires, so all query images must be present.
    """
    root = Path(root)
    url = f"http://cmp.felk.cvut.cz/revisitop/data/datasets/{name}/"
    gnd_path = root / f"gnd_{name}.pkl"
    if not gnd_path.is_file():
        raise DatasetError(f"ground truth not found: {gnd_path} (download gnd_{name}.pkl from {url})")
    with open(gnd_path, "rb") as f:
        cfg = pickle.load(f)
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise DatasetError(f"{gnd_path} is not a revisited gnd file (expected keys imlist, qimlist, gnd)")
    jpg = root / "jpg"
    if not jpg.is_dir():
        raise DatasetError(f"image folder not found: {jpg} (expected {jpg}/<imname>.jpg; get the {name} images via {url})")
    imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
    if len(gnd) != len(qimlist):
        raise DatasetError(f"{gnd_path}: {len(qimlist)} queries but {len(gnd)} gnd entries; the file is damaged")
    database = LabelledImages([jpg / f"{n}.jpg" for n in imlist], list(range(len(imlist))), tuple(imlist))
    crops = [crop_box(load_image(jpg / f"{n}.jpg"), g["bbx"], jpg / f"{n}.jpg") for n, g in zip(qimlist, gnd)]
    queries = LabelledImages(crops, list(range(len(qimlist))), tuple(qimlist))
    return RevisitedData(name, database, queries, gnd)


def crop_box(img: Image.Image, bbx: Sequence[float], source: object = "image") -> Image.Image:
    """Crop to box (x1, y1, x2, y2), rounded like PIL and clipped to the image; an empty box is an error."""
    w, h = img.size
    x1, y1, x2, y2 = (int(round(v)) for v in bbx)
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
    if x2 <= x1 or y2 <= y1:
        raise DatasetError(f"box {list(bbx)} lies outside {source} of size {w}x{h}; is it the right image?")
    return img.crop((x1, y1, x2, y2))


# ---------------------------------------------------------------- Fashion-MNIST (idx files)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Read an idx file (MNIST format, gzipped or not) into a numpy array, checking its magic number."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"idx file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read idx file {path}: {e} (re-download or reinstall it)") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(
            f"{path} is not an idx file: magic {data[:4].hex() or '(empty)'}, expected 0000 08 0N (re-download it)"
        )
    dims = data[3]
    if ndim is not None and dims != ndim:
        raise DatasetError(f"{path} holds a {dims}-d array, expected {ndim}-d (is it the images/labels file swapped?)")
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    body = data[4 + 4 * dims :]
    if len(body) != int(np.prod(shape)) * dtype.itemsize:
        raise DatasetError(f"{path} is truncated: header says shape {shape} but {len(body)} bytes follow (re-download it)")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def fashion_mnist_arrays(
    root: str | Path = "/usr/share/datasets/fashion-mnist", split: str = "train", limit: int | None = None
) -> ImageArrays:
    """Fashion-MNIST as arrays: uint8 images (N,28,28), int64 labels 0..9 and the 10 class names."""
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Fashion-MNIST not found at {root} (apt-get install dataset-fashion-mnist, or pass root=)")
    prefix = "train" if split == "train" else "t10k"

    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (root / name).is_file():
                return root / name
        raise DatasetError(f"{root} lacks {stem}.gz (expected the four Fashion-MNIST idx files there)")

    images = read_idx(find(f"{prefix}-images-idx3-ubyte"), ndim=3)
    labels = read_idx(find(f"{prefix}-labels-idx1-ubyte"), ndim=1).astype(np.int64)
    if len(images) != len(labels) or images.dtype != np.uint8:
        raise DatasetError(f"{root} {split}: {len(images)} uint8 images but {len(labels)} labels; files do not match")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return ImageArrays(images, labels, FASHION_MNIST_CLASSES)


def fashion_mnist(
    root: str | Path = "/usr/share/datasets/fashion-mnist", split: str = "train", limit: int | None = None
) -> LabelledImages:
    """Fashion-MNIST as PIL RGB images (28x28 grey replicated to 3 channels) for `ImageDataset`."""
    return fashion_mnist_arrays(root, split, limit).to_labelled()


# ---------------------------------------------------------------- procedural instance-retrieval set


def _draw_object(rng: np.random.Generator, size: int) -> Image.Image:
    """One distinctive object: a gradient background, a stripe texture and a dozen shapes in its own palette."""
    hues = rng.uniform(0, 1) + np.array([0.0, rng.uniform(0.15, 0.5), rng.uniform(0.5, 0.85)])
    def colour() -> tuple[int, int, int]:
        rgb = colorsys.hsv_to_rgb((rng.choice(hues) + rng.normal(0, 0.03)) % 1.0, rng.uniform(0.45, 1.0),
                                  rng.uniform(0.3, 1.0))
        return tuple(int(c * 255) for c in rgb)

    # background: a linear gradient between two palette colours in a random direction
    c0, c1 = np.array(colour(), np.float32), np.array(colour(), np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip((np.cos(angle) * xx + np.sin(angle) * yy + 1) / 2, 0, 1)[..., None]
    img = Image.fromarray(((1 - t) * c0 + t * c1).astype(np.uint8))
    draw = ImageDraw.Draw(img)

    # a striped patch: texture that survives resizing better than fine noise
    x0, y0 = rng.integers(0, size // 2, 2)
    w = int(rng.integers(size // 4, size // 2))
    step = int(rng.integers(6, 16))
    stripe = colour()
    for k in range(0, w, step):
        draw.rectangle([x0 + k, y0, x0 + k + step // 2, y0 + w], fill=stripe)

    for _ in range(int(rng.integers(10, 16))):
        kind = rng.integers(0, 4)
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(0.05, 0.2) * size
        fill, outline = colour(), colour()
        if kind == 0:
            draw.ellipse([x - r, y - r * rng.uniform(0.5, 1.5), x + r, y + r], fill=fill, outline=outline, width=3)
        elif kind == 1:
            draw.rectangle([x - r, y - r * rng.uniform(0.4, 1.2), x + r, y + r], fill=fill, outline=outline, width=3)
        elif kind == 2:
            n = int(rng.integers(3, 7))
            a = np.sort(rng.uniform(0, 2 * np.pi, n))
            pts = [(x + r * np.cos(t_) * rng.uniform(0.6, 1.4), y + r * np.sin(t_) * rng.uniform(0.6, 1.4)) for t_ in a]
            draw.polygon(pts, fill=fill, outline=outline)
        else:
            x2, y2 = rng.uniform(0, size, 2)
            draw.line([x, y, x2, y2], fill=fill, width=int(rng.integers(3, 10)))
    return img


def _render_view(obj: Image.Image, rng: np.random.Generator, out_size: int) -> Image.Image:
    """A photo-like view: rotation, off-centre crop at a random scale and aspect, colour/lighting, blur, noise."""
    size = obj.size[0]
    fill = tuple(int(v) for v in np.asarray(obj).reshape(-1, 3).mean(0))
    img = obj.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR, fillcolor=fill)
    side = rng.uniform(0.6, 0.9) * size
    aspect = rng.uniform(0.85, 1.15)
    cw, ch = min(size, side * aspect), min(size, side / aspect)
    left, top = rng.uniform(0, size - cw), rng.uniform(0, size - ch)
    img = img.resize((out_size, out_size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.25))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.2))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.8, 1.2))
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    # uneven lighting (a linear ramp) and sensor noise
    yy, xx = np.mgrid[0:out_size, 0:out_size].astype(np.float32) / out_size - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    light = 1.0 + rng.uniform(0.1, 0.3) * (np.cos(angle) * xx + np.sin(angle) * yy) * 2
    pixels = np.asarray(img, np.float32) * light[..., None] + rng.normal(0, 4.0, (out_size, out_size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def is_instance_set_image(path: str | Path) -> bool:
    """Whether `path` has the layout make_instance_set writes (object_NNN/view_NN.jpg): a synthetic view."""
    return re.search(r"object_\d+[/\\]view_\d+\.jpg$", str(path)) is not None


def make_instance_set(
    out_dir: str | Path, n_objects: int = 20, n_views: int = 6, image_size: int = 160, seed: int = 0
) -> LabelledImages:
    """Write a procedural instance-retrieval set: OUT/object_XXX/view_YY.jpg, `n_views` views per object.

    Each object is a random composition of coloured shapes in its own palette; each view changes crop,
    rotation, scale, colour, lighting, blur and noise. Deterministic for a seed; `image_folder(out_dir)`
    reads it back (when out_dir holds nothing else). For tests and demos, not for benchmarking.
    """
    if n_objects < 1 or n_views < 1 or image_size < 16:
        raise DatasetError(f"need n_objects >= 1, n_views >= 1, image_size >= 16; got {n_objects}, {n_views}, {image_size}")
    out_dir = Path(out_dir)
    paths: list[Path] = []
    labels: list[int] = []
    classes = tuple(f"object_{i:03d}" for i in range(n_objects))
    for i, name in enumerate(classes):
        rng = np.random.default_rng([seed, i])  # per-object stream: object i is the same whatever n_objects is
        obj = _draw_object(rng, 2 * image_size)
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        for v in range(n_views):
            path = folder / f"view_{v:02d}.jpg"
            _render_view(obj, rng, image_size).save(path, quality=90)
            paths.append(path)
            labels.append(i)
    return LabelledImages(paths, labels, classes)
