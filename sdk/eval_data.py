"""The labelled image sets `retrieval-sdk evaluate` reads: which files are the queries and the gallery, and
their labels (class subfolders, file names, a `path,label` CSV, or a revisited gnd file with its images).

Labels from the folder layout (`--labels auto`, the rule `verify` and the quickstart's `--eval-photos` use):
  DIR/<class>/<image>   one subfolder per class;
  DIR/ukbench00012.jpg  UKBench: the group is index // 4;
  DIR/<name>_<digits>[_<digits>...].jpg  the name before the trailing numbers (PhotoTourism landmarks).
`--labels folders` and `--labels names` force the first or the two others. numpy + PIL only.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from sdk.errors import SdkError
from sdk.preprocess import load_image

Protocol = Literal["leave-one-out", "query-gallery", "revisited"]
LABEL_MODES = ("auto", "folders", "names")
_UKBENCH = re.compile(r"^ukbench(\d+)$", re.IGNORECASE)
_TRAILING_NUMBERS = re.compile(r"(_\d+)+$")
NAME_RULES = "ukbenchNNNNN.jpg, NAME_123.jpg"


class EvalDataError(SdkError):
    """An image folder, label file or gnd file that cannot be evaluated as given."""


def name_label(stem: str) -> str:
    """The label a file name gives: UKBench's group, else the name before trailing `_<digits>` runs."""
    m = _UKBENCH.match(stem)
    if m:
        return f"ukbench-{int(m.group(1)) // 4}"
    return _TRAILING_NUMBERS.sub("", stem) or stem


def label_of(path: Path, root: Path) -> str:
    """The retrieval label of an image under `root`: its class subfolder, else what its name gives."""
    rel = path.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else name_label(path.stem)


@dataclass(frozen=True)
class Crop:
    """A query that is a box (x1, y1, x2, y2) of an image (the revisited protocol crops queries)."""

    path: Path
    box: tuple[float, float, float, float]

    def open(self) -> Image.Image:
        img = load_image(self.path)
        w, h = img.size
        x1, y1, x2, y2 = (int(round(v)) for v in self.box)
        x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
        if x2 <= x1 or y2 <= y1:
            raise EvalDataError(f"query box {list(self.box)} lies outside {self.path} ({w}x{h}); is it the right image?")
        return img.crop((x1, y1, x2, y2))


Source = Path | Crop


@dataclass(frozen=True)
class ImageSide:
    """One side (queries or gallery): image sources, their labels and the names shown in the report."""

    sources: list[Source]
    labels: np.ndarray  # str; revisited: the image name
    names: list[str]

    def __len__(self) -> int:
        return len(self.sources)

    def subset(self, keep: list[int]) -> "ImageSide":
        return ImageSide([self.sources[i] for i in keep], self.labels[keep], [self.names[i] for i in keep])


@dataclass
class EvalSet:
    """What is evaluated: queries against a gallery under one protocol (the revisited one with its gnd)."""

    protocol: Protocol
    queries: ImageSide
    gallery: ImageSide  # the same object as `queries` for leave-one-out
    gnd: object | None = None  # training.evaluate.RevisitedGT
    root: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def leave_one_out(self) -> bool:
        return self.protocol == "leave-one-out"


def source_keys(sources: list[Source]) -> list[list]:
    """What identifies each image for the embedding cache: path, size and modification time (and a crop's box)."""
    keys = []
    for source in sources:
        path = source.path if isinstance(source, Crop) else source
        try:
            st = path.stat()
            key = [str(path.resolve()), st.st_size, st.st_mtime_ns]
        except OSError:
            key = [str(path), "missing"]
        keys.append(key + (list(source.box) if isinstance(source, Crop) else []))
    return keys


# ------------------------------------------------------------------------------------------------ labels
def labelled_folder(root: Path, labels: str) -> ImageSide:
    """The images under `root` with labels by `labels`: auto | folders | names | a CSV file `path,label`."""
    from sdk.ingest import list_images

    if not Path(root).is_dir():
        raise EvalDataError(f"--images {root} is not a folder; pass a folder of labelled photos")
    root = Path(root)
    if labels not in LABEL_MODES:
        return _csv_side(Path(labels), root)
    paths = list_images(root)
    if not paths:
        raise EvalDataError(f"{root} has no images (.jpg, .png, .webp, ...); put labelled photos in it")
    if labels == "folders":
        loose = [p for p in paths if p.parent == root]
        if len(loose) == len(paths):
            raise EvalDataError(f"{root} has no class subfolders; put each class's images in {root}/<class>/, or "
                                f"use --labels names (file names like {NAME_RULES}) or --labels FILE.csv")
        if loose:
            raise EvalDataError(f"{root} has images outside class subfolders (e.g. {loose[0].name}); with "
                                "--labels folders every image must be in a subfolder named for its class")
    names = [p.relative_to(root).as_posix() for p in paths]
    if labels == "names":
        values = [name_label(p.stem) for p in paths]
    else:
        values = [label_of(p, root) for p in paths]
        flat = all(p.parent == root for p in paths)
        if flat and len(set(values)) == len(values):
            raise EvalDataError(f"{root} has no class subfolders and its file names give no classes ({NAME_RULES}); "
                                f"put each class's images in {root}/<class>/ or pass --labels FILE.csv")
    return ImageSide(list(paths), np.asarray(values), names)


def _csv_side(csv_path: Path, root: Path) -> ImageSide:
    """Rows `path,label` (paths relative to the images folder, or absolute)."""
    if not csv_path.is_file():
        raise EvalDataError(f"--labels {csv_path}: neither auto|folders|names nor an existing CSV file `path,label`")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if not {"path", "label"} <= set(header):
            raise EvalDataError(f"{csv_path} has header {','.join(header) or '(empty)'}; expected a header row "
                                "'path,label'")
        reader.fieldnames = header
        rows = [(line, (r["path"] or "").strip(), (r["label"] or "").strip()) for line, r in enumerate(reader, 2)]
    bad = next((line for line, p, lab in rows if not p or not lab), None)
    if bad is not None:
        raise EvalDataError(f"{csv_path} line {bad}: empty path or label (each row needs both)")
    if not rows:
        raise EvalDataError(f"{csv_path} has a header but no rows")
    return ImageSide([root / p for _, p, _ in rows], np.asarray([lab for _, _, lab in rows]), [p for _, p, _ in rows])


def check_labels(side: ImageSide, where: str, leave_one_out: bool) -> None:
    """Labels that can be evaluated: two classes at least and, leave-one-out, a class with two images."""
    classes, counts = np.unique(side.labels, return_counts=True)
    if len(classes) < 2:
        raise EvalDataError(f"all {len(side)} images of {where} are one class ({str(classes[0])!r}): retrieval needs "
                            "two classes at least (one subfolder per class, or --labels FILE.csv)")
    if leave_one_out and counts.max() < 2:
        raise EvalDataError(f"no class of {where} has two images, so no query has a match; group the images in "
                            f"class subfolders ({where}/<class>/), name them by class ({NAME_RULES}) or pass "
                            "--labels FILE.csv")


# ------------------------------------------------------------------------------------------------ sets
def build_eval_set(images: Path, labels: str = "auto", gallery: Path | None = None,
                   gallery_labels: str | None = None, gnd: Path | None = None,
                   protocol: str | None = None) -> EvalSet:
    """The evaluation set for the command's arguments (the protocol follows from them unless given)."""
    protocol = protocol or ("revisited" if gnd else "query-gallery" if gallery else "leave-one-out")
    if protocol == "revisited":
        if gnd is None:
            raise EvalDataError("--protocol revisited needs --gnd GND.pkl (a revisitop gnd_*.pkl) and --images ROOT")
        return revisited_set(images, gnd)
    if gnd is not None:
        raise EvalDataError(f"--gnd is for --protocol revisited, not {protocol}")
    if protocol == "leave-one-out":
        if gallery is not None:
            raise EvalDataError("leave-one-out uses --images as queries and gallery; drop --gallery or use "
                                "--protocol query-gallery")
        side = labelled_folder(images, labels)
        check_labels(side, str(images), leave_one_out=True)
        return EvalSet("leave-one-out", side, side, root=str(images))
    if protocol != "query-gallery":
        raise EvalDataError(f"--protocol must be leave-one-out, query-gallery or revisited, got {protocol!r}")
    if gallery is None:
        raise EvalDataError("--protocol query-gallery needs --gallery DIR (the images to search in)")
    queries = labelled_folder(images, labels)
    if gallery_labels is None:
        gallery_labels = labels if labels in LABEL_MODES else "auto"
    side = labelled_folder(gallery, gallery_labels)
    check_labels(side, str(gallery), leave_one_out=False)
    if not np.isin(queries.labels, side.labels).any():
        raise EvalDataError(f"no query label of {images} occurs in the gallery {gallery}: nothing to find "
                            "(do the two folders use the same class names?)")
    return EvalSet("query-gallery", queries, side, root=str(images))


def revisited_set(root: Path, gnd_path: Path) -> EvalSet:
    """Revisited Oxford/Paris style: database = imlist, queries = qimlist cropped to their boxes; images at
    ROOT/jpg/<name>.jpg (the revisitop layout) or ROOT/<name>.jpg."""
    from training.evaluate import load_gnd

    root = Path(root)
    if not root.is_dir():
        raise EvalDataError(f"--images {root} is not a folder; pass the folder with the gnd file's images")
    gt = load_gnd(gnd_path)
    folder = root / "jpg" if (root / "jpg").is_dir() else root
    db = ImageSide([folder / f"{n}.jpg" for n in gt.imlist], np.asarray(gt.imlist), list(gt.imlist))
    queries = ImageSide([Crop(folder / f"{n}.jpg", q.bbx) for n, q in zip(gt.qimlist, gt.gnd)],
                        np.asarray(gt.qimlist), list(gt.qimlist))
    return EvalSet("revisited", queries, db, gnd=gt, root=str(root))


def drop_unreadable(data: EvalSet, bad_queries: set[int], bad_gallery: set[int]) -> EvalSet:
    """The set without the images that could not be read (revisited: the gnd lists renumbered)."""
    if not bad_queries and not bad_gallery:
        return data
    keep_q = [i for i in range(len(data.queries)) if i not in bad_queries]
    keep_g = [i for i in range(len(data.gallery)) if i not in bad_gallery]
    if not keep_q or not keep_g:
        what = "the" if data.leave_one_out else "the query" if not keep_q else "the gallery"
        raise EvalDataError(f"none of {what} images could be read (see the warnings above); use JPEG/PNG photos")
    if data.leave_one_out:
        side = data.queries.subset(keep_q)
        check_labels(side, data.root, leave_one_out=True)
        return EvalSet(data.protocol, side, side, root=data.root, notes=data.notes)
    gallery = data.gallery.subset(keep_g)
    queries = data.queries.subset(keep_q)
    gnd = data.gnd
    if gnd is not None:
        gnd = _renumbered(gnd, keep_q, keep_g)
    else:
        check_labels(gallery, "the gallery", leave_one_out=False)
    return EvalSet(data.protocol, queries, gallery, gnd=gnd, root=data.root, notes=data.notes)


def _renumbered(gt, keep_q: list[int], keep_g: list[int]):
    """A RevisitedGT over the kept queries and database images (indices renumbered, dropped ones removed)."""
    from training.evaluate import RevisitedGT, RevisitedQuery

    new_index = np.full(gt.n_db, -1, np.int64)
    new_index[keep_g] = np.arange(len(keep_g))

    def remap(ids: np.ndarray) -> np.ndarray:
        out = new_index[ids]
        return out[out >= 0]

    gnd = [RevisitedQuery(gt.gnd[i].bbx, remap(gt.gnd[i].easy), remap(gt.gnd[i].hard), remap(gt.gnd[i].junk))
           for i in keep_q]
    return RevisitedGT(gt.name, [gt.imlist[i] for i in keep_g], [gt.qimlist[i] for i in keep_q], gnd)
