"""What the database backends (pgvector, Qdrant) share: GalleryIndex's public surface over an engine that
stores vectors, metadata and the collection's space and dim itself, so a server on top keeps no state.

A backend subclasses ExternalIndex and implements the engine calls (`_add`, `_remove`, `_search`, ...);
this class does every check first (sdk.index's prepare_items / check_vectors / parse_filter), so a bad
request raises before anything reaches the engine, exactly as with the embedded faiss index.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from sdk.errors import GalleryIndexError
from sdk.index import Hit, IndexStats, IndexSurface, check_k, check_vectors, parse_filter, prepare_items
from sdk.index_url import HnswConfig, redact


class ExternalIndex(IndexSurface):
    """String ids -> vectors of one embedding space in an external engine; subclasses talk to the engine."""

    kind = "external"
    read_only = False
    path = None

    def __init__(self, url: str, dim: int, space: str, config: HnswConfig):
        self.url = url
        self.dim = dim
        self.space = space
        self.config = config
        self._closed = False

    # --------------------------------------------------------------------------------- engine calls
    def _add(self, ids: list[str], x: np.ndarray, metas: list[str | None], thumbs: list[bytes | None],
             now: float) -> tuple[int, int]:
        """Upsert durably after re-checking the stored space and dim; -> (added, updated)."""
        raise NotImplementedError

    def _remove(self, ids: list[str], missing_ok: bool) -> int:
        raise NotImplementedError

    def _search(self, q: np.ndarray, k: int, ef_search: int, where: dict | None) -> list[list[Hit]]:
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- checks
    def _check_open(self) -> None:
        if self._closed:
            raise GalleryIndexError("the index is closed")

    def _prepare_query(self, queries, k, space) -> tuple[np.ndarray, int]:
        self._check_open()
        self._check_space(space)
        return check_vectors(queries, self.dim, "query embedding"), check_k(k)

    def _mismatch(self, dim: int, space: str) -> GalleryIndexError:
        return GalleryIndexError(f"collection {redact(self.url)} now holds {dim}-d vectors of space {space!r}, not "
                                 f"{self.dim}-d {self.space!r} (it was re-created); nothing was written: reopen it")

    # ---------------------------------------------------------------------------------------- writes
    def add(self, ids: Sequence[str], vectors, *, space: str, metadata: Sequence[dict | None] | None = None,
            thumbnails: Sequence[bytes | None] | None = None) -> dict:
        """Add or replace items, all or nothing; durable when it returns. -> {'added', 'updated'}."""
        self._check_open()
        self._check_space(space)
        ids, x, metas, thumbs = prepare_items(ids, vectors, self.dim, metadata, thumbnails)
        if not ids:
            return {"added": 0, "updated": 0}
        added, updated = self._add(ids, x, metas, thumbs, time.time())
        return {"added": added, "updated": updated}

    def remove(self, ids: Sequence[str] | str, missing_ok: bool = False) -> int:
        """Delete items; durable when it returns. Unknown ids raise UnknownIdError unless missing_ok."""
        self._check_open()
        ids = [ids] if isinstance(ids, str) else list(dict.fromkeys(ids))
        return self._remove(ids, missing_ok) if ids else 0

    delete = remove

    def compact(self) -> int:
        """Nothing to drop: the engine reclaims deleted rows itself (VACUUM, Qdrant's optimizer)."""
        return 0

    def save(self) -> None:
        """Every acknowledged write is already durable in the engine."""

    # ----------------------------------------------------------------------------------------- reads
    def search(self, queries, k: int = 10, *, space: str, with_metadata: bool = False,
               ef_search: int | None = None, nprobe: int | None = None, k_factor: int | None = None,
               filter: dict | None = None) -> list[list[Hit]]:
        """Top-k items per query row, best first; ef_search per call (nprobe/k_factor are faiss-only)."""
        q, k = self._prepare_query(queries, k, space)
        out = self._search(q, k, int(ef_search or self.config.ef_search), parse_filter(filter))
        return self.with_metadata(out) if with_metadata else out

    def search_with_vectors(self, queries, k: int, *, space: str, **params) -> tuple[list[list[Hit]], list[np.ndarray]]:
        """Like `search`, plus each hit's stored vector (for query expansion)."""
        out = self.search(queries, k, space=space, **params)
        return out, [self.get_vectors([h.id for h in row]) for row in out]

    def stats(self) -> IndexStats:
        return IndexStats(path=redact(self.url), embedding_space=self.space, dim=self.dim, factory=self.factory(),
                          count=len(self), tombstones=0, trained=True, unsaved=0, read_only=False,
                          extra={"backend": self.kind})

    def factory(self) -> str:
        c = self.config
        return f"{self.kind} HNSW m={c.m} ef_construction={c.ef_construction}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact(self.url)}, dim={self.dim}, space={self.space!r})"
