"""Gallery ingestion: embed a folder of images with the bundle's gallery model into a GalleryIndex.

Batched, with a progress bar, and resumable: every batch is committed durably before the next one
starts, and a re-run skips images already in the index with the same size and modification time
(changed files are re-embedded, new ones added). Item ids are paths relative to the images folder.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sdk.bundle import read_manifest
from sdk.index import GalleryIndex, GalleryIndexError, IndexConfig
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


def ingest(bundle: str | Path, images_dir: str | Path, index_path: str | Path, *, create: bool = True,
           config: str | None = None, batch_size: int = 32, threads: int | None = None, thumbnails: int = 256,
           progress: bool = True, log: Callable[[str], None] = print) -> IngestReport:
    """Embed every image under images_dir into the index at index_path (created when `create`)."""
    from sdk.embedder import Embedder

    t0 = time.perf_counter()
    manifest = read_manifest(bundle)
    role = "gallery" if "gallery" in manifest.models else "query"
    entry = manifest.model(role)
    index_path = Path(index_path)
    exists = (index_path / "index.sqlite").exists()
    if not exists and not create:
        raise GalleryIndexError(f"no index at {index_path}; create it with `retrieval-sdk index build`")
    images = list_images(images_dir)
    root = Path(images_dir)
    report = IngestReport(total=len(images))
    if exists:
        index = GalleryIndex.open(index_path)
        if config and build_faiss_index(index.dim, config, 0)[1] != index.stats().factory:
            index.close()
            raise GalleryIndexError(f"index {index_path} exists as '{index.config.factory}', not '{config}'; "
                                    "use another --index path to build a different index")
    else:
        index = GalleryIndex.create(index_path, entry.embedding_dim, manifest.embedding_space,
                                    IndexConfig(config or "Flat"))
    with index:
        if index.space != manifest.embedding_space or index.dim != entry.embedding_dim:
            raise GalleryIndexError(f"index {index_path} is space {index.space!r} ({index.dim}-d) but bundle {bundle} "
                                    f"is {manifest.embedding_space!r} ({entry.embedding_dim}-d); use a matching bundle")
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
        if todo:
            embedder = Embedder.from_bundle(bundle, role=role, threads=threads, verify=False)
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(todo), desc=f"embedding ({role} model)", unit="img")
            try:
                for start in range(0, len(todo), batch_size):
                    chunk = todo[start:start + batch_size]
                    vectors, ok, errors = embedder.embed_valid([p for p, _, _ in chunk], batch_size=batch_size)
                    for j, reason in errors:
                        report.failed.append((chunk[j][1], reason))
                        log(f"warning: skipped {chunk[j][1]}: {reason}")
                    if ok:
                        good = [chunk[j] for j in ok]
                        thumbs = [_thumbnail(p, thumbnails) for p, _, _ in good] if thumbnails else None
                        result = index.add([i for _, i, _ in good], vectors, space=manifest.embedding_space,
                                           metadata=[m for _, _, m in good], thumbnails=thumbs)
                        report.added += result["added"]
                        report.updated += result["updated"]
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
    report.seconds = time.perf_counter() - t0
    return report
