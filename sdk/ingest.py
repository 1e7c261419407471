"""Gallery ingestion: embed a folder of images with the bundle's gallery model into a GalleryIndex.

Batched, with a progress bar, and resumable: every batch is committed durably before the next one
starts, and a re-run skips images already in the index with the same size and modification time
(changed files are re-embedded, new ones added). Item ids are paths relative to the images folder.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdk.bundle import read_manifest
from sdk.index import GalleryIndex, GalleryIndexError
from sdk.index_url import index_exists, open_index, redact
from sdk.preprocess import ImageError, thumbnail_jpeg
from sdk.vector_index import build_faiss_index

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class IngestReport:
    total: int = 0  # images found
    added: int = 0
    updated: int = 0
    skipped: int = 0  # already indexed, unchanged
    failed: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"{self.total} images: {self.added} added, {self.updated} updated, {self.skipped} already indexed, "
                f"{len(self.failed)} unreadable ({self.seconds:.1f} s)")


def list_images(root: str | Path) -> list[Path]:
    """Image files under root (recursive, sorted, hidden files and folders left out)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"images folder {root} does not exist")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                out.append(Path(dirpath) / name)
    return out


def _thumbnail(path: Path, size: int) -> bytes | None:
    try:
        return thumbnail_jpeg(path, size)
    except ImageError:  # the embedder already reported unreadable files
        return None


def open_gallery(index_url: str | Path, space: str, dim: int, create: bool, config: str | None):
    """The index at `index_url` for a bundle's space and dim: created when absent (if `create`), refused
    when it exists with another space, dim or faiss config (nothing is written then)."""
    if not index_exists(index_url) and not create:
        raise GalleryIndexError(f"no index at {redact(str(index_url))}; create it with `retrieval-sdk index build`")
    index = open_index(index_url, dim=dim, space=space, config=config, create=create)
    if config and isinstance(index, GalleryIndex) and build_faiss_index(dim, config, 0)[1] != index.stats().factory:
        index.close()
        raise GalleryIndexError(f"index {index_url} exists as '{index.config.factory}', not '{config}'; "
                                "use another --index path to build a different index")
    return index


Todo = list[tuple[Path, str, dict]]  # (image file, item id, metadata) still to embed


def plan(index, images_dir: str | Path, report: IngestReport, log: Callable[[str], None]) -> Todo:
    """The images under images_dir not yet in the index unchanged (same size and mtime): what a run embeds,
    so that a re-run resumes. Counts them into `report`."""
    images = list_images(images_dir)
    root = Path(images_dir)
    report.total = len(images)
    todo = []
    known = index.get_metadata([p.relative_to(root).as_posix() for p in images])
    for p in images:
        item_id = p.relative_to(root).as_posix()
        st = p.stat()
        meta = {"path": item_id, "size": st.st_size, "mtime": st.st_mtime_ns}
        old = known.get(item_id)
        if old and old.get("size") == meta["size"] and old.get("mtime") == meta["mtime"]:
            report.skipped += 1
        else:
            todo.append((p, item_id, meta))
    if report.skipped:
        log(f"{report.skipped} of {len(images)} images are already indexed (unchanged); "
            + (f"embedding the other {len(todo)}" if todo else "nothing to do"))
    return todo


def embed_chunk(embedder, chunk: Todo, thumbnails: int) -> tuple[Todo, np.ndarray, list | None, list[tuple[str, str]]]:
    """(readable items, their embeddings, their thumbnails or None, (id, reason) of unreadable ones)."""
    vectors, ok, errors = embedder.embed_valid([p for p, _, _ in chunk], batch_size=len(chunk))
    good = [chunk[j] for j in ok]
    thumbs = [_thumbnail(p, thumbnails) for p, _, _ in good] if thumbnails else None
    return good, vectors, thumbs, [(chunk[j][1], reason) for j, reason in errors]


def store(index, space: str, good: Todo, vectors: np.ndarray, thumbs: list | None, failed: list[tuple[str, str]],
          report: IngestReport, log: Callable[[str], None]) -> None:
    """Add one embedded chunk durably and count it (unreadable files are reported, not stored)."""
    for item_id, reason in failed:
        report.failed.append((item_id, reason))
        log(f"warning: skipped {item_id}: {reason}")
    if good:
        result = index.add([i for _, i, _ in good], vectors, space=space, metadata=[m for _, _, m in good],
                           thumbnails=thumbs)
        report.added += result["added"]
        report.updated += result["updated"]


def gallery_role(manifest) -> str:
    return "gallery" if "gallery" in manifest.models else "query"


@dataclass
class IngestRun:
    """An ingestion under way: the open index, the bundle's space and embedding role, what is left to do."""

    index: object
    space: str
    role: str
    todo: Todo
    report: IngestReport


@contextmanager
def ingest_run(bundle: str | Path, images_dir: str | Path, index_url: str | Path, create: bool, config: str | None,
               log: Callable[[str], None]) -> Iterator[IngestRun]:
    """Open (or create) the index for the bundle and plan the images still to embed; times the run."""
    t0 = time.perf_counter()
    manifest = read_manifest(bundle)
    role = gallery_role(manifest)
    report = IngestReport()
    with open_gallery(index_url, manifest.embedding_space, manifest.model(role).embedding_dim, create, config) as index:
        yield IngestRun(index, manifest.embedding_space, role, plan(index, images_dir, report, log), report)
    report.seconds = time.perf_counter() - t0


def ingest(bundle: str | Path, images_dir: str | Path, index_path: str | Path, *, create: bool = True,
           config: str | None = None, batch_size: int = 32, threads: int | None = None, thumbnails: int = 256,
           progress: bool = True, log: Callable[[str], None] = print) -> IngestReport:
    """Embed every image under images_dir into the index at index_path (created when `create`)."""
    from tqdm.auto import tqdm

    from sdk.embedder import Embedder

    with ingest_run(bundle, images_dir, index_path, create, config, log) as run:
        if run.todo:
            embedder = Embedder.from_bundle(bundle, role=run.role, threads=threads, verify=False)
            with tqdm(total=len(run.todo), desc=f"embedding ({run.role} model)", unit="img",
                      disable=not progress) as bar:
                for start in range(0, len(run.todo), batch_size):
                    chunk = run.todo[start:start + batch_size]
                    store(run.index, run.space, *embed_chunk(embedder, chunk, thumbnails), run.report, log)
                    bar.update(len(chunk))
    return run.report
