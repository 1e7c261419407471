"""The vector side of a GalleryIndex: one faiss index built from a factory string, a staging flat index
while an IVF/PQ index waits for training, and the tombstone bitmap filtered at search time.

Labels are positions: the n-th vector ever appended gets label n (live or tombstoned). Which faiss type
was built decides everything else (search parameters, refinement, training), checked on the built
index rather than by parsing the factory string.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from sdk.errors import GalleryIndexError

_PARALLEL_MIN_QUERIES = 8  # fewer queries per call are searched on one thread


def faiss_module():
    import faiss

    return faiss


@contextmanager
def one_omp_thread() -> Iterator[None]:
    """faiss calls made inside run on one OpenMP thread (omp_set_num_threads only affects the calling
    thread's later parallel regions, so other threads keep theirs)."""
    faiss = faiss_module()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def downcast(index):
    """The index a refine stage wraps, as its concrete faiss type (the index itself if there is none)."""
    faiss = faiss_module()
    return faiss.downcast_index(index.base_index) if is_refined(index) else index


def is_refined(index) -> bool:
    return isinstance(index, faiss_module().IndexRefine)


def _stores_exact_vectors(index) -> bool:
    """Scores are true cosines and vectors reconstruct exactly: flat storage, or an exact refine stage."""
    faiss = faiss_module()
    if is_refined(index) or isinstance(index, (faiss.IndexFlat, faiss.IndexIVFFlat)):
        return True
    return isinstance(index, faiss.IndexHNSW) and isinstance(faiss.downcast_index(index.storage), faiss.IndexFlat)


def build_faiss_index(dim: int, factory: str, ef_construction: int):
    """(empty faiss index, the factory it was built from). Lossy codes (PQ, SQ, LSH, transforms) get an
    exact refine stage ('RFlat'), so scores are true cosines and vectors reconstruct for compaction and
    query expansion."""
    faiss = faiss_module()
    factory = factory.replace(" ", "")
    if not factory:
        raise GalleryIndexError("index config is empty; use e.g. 'Flat', 'HNSW32' or 'IVF1024,PQ64'")
    if "IDMap" in factory:
        raise GalleryIndexError("index config must not contain IDMap: ids are managed by GalleryIndex")
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if not _stores_exact_vectors(index):
            factory += ",RFlat"
            index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise GalleryIndexError(f"invalid index config '{factory}': {str(e).strip().splitlines()[-1][:200]} (try 'Flat', "
                       "'HNSW32', 'IVF1024,Flat' or 'IVF1024,PQ64')") from None
    base = downcast(index)
    if isinstance(base, faiss.IndexHNSW):
        base.hnsw.efConstruction = ef_construction
    if isinstance(index, faiss.IndexIVF):
        index.set_direct_map_type(faiss.DirectMap.Array)  # exact reconstruct for compaction / QE
    return index, factory


class VectorIndex:
    """faiss index + staging + tombstones. Not thread-safe: GalleryIndex holds its lock around every call."""

    def __init__(self, index, dim: int, train_size: int = 0):
        self.index = index  # the main faiss index (labels = positions)
        self.dim = dim
        self.staging = None  # exact flat index while the main one waits for training
        self.live = np.zeros(1024, np.uint8)  # bitmap over labels, 1 = live
        self.n_dead = 0
        self._train_size = train_size

    # ------------------------------------------------------------------------------------- state
    @property
    def total(self) -> int:
        """Number of labels handed out (live + tombstones)."""
        return self.index.ntotal + (self.staging.ntotal if self.staging is not None else 0)

    @property
    def ready(self) -> bool:
        """Trained, nothing staged: the main index holds every vector (and can be snapshotted)."""
        return self.staging is None and self.index.is_trained

    def train_size(self) -> int:
        if self._train_size:
            return self._train_size
        ivf = faiss_module().try_extract_index_ivf(downcast(self.index))
        return max(1000, 40 * (ivf.nlist if ivf is not None else 64))

    def set_live(self, labels: np.ndarray) -> None:
        """Reset the bitmap: exactly `labels` are live (after loading or compaction)."""
        n = self.total
        self.live = np.zeros((n + 7) // 8 + 1024, np.uint8)
        np.bitwise_or.at(self.live, labels >> 3, (1 << (labels & 7)).astype(np.uint8))
        self.n_dead = n - len(labels)

    def mark(self, labels: np.ndarray, live: bool) -> None:
        if len(labels) == 0:
            return
        need = int(labels.max()) // 8 + 1
        if need > len(self.live):
            grown = np.zeros(max(need, 2 * len(self.live)), np.uint8)
            grown[: len(self.live)] = self.live
            self.live = grown
        bits = (1 << (labels & 7)).astype(np.uint8)
        if live:
            np.bitwise_or.at(self.live, labels >> 3, bits)
        else:
            np.bitwise_and.at(self.live, labels >> 3, ~bits)
            self.n_dead += len(labels)

    # ------------------------------------------------------------------------------------- vectors
    def append(self, x: np.ndarray) -> None:
        """Add vectors with the next labels (in memory only); trains the main index once enough are staged."""
        if self.ready:
            self.index.add(x)
            return
        if self.staging is None:
            self.staging = faiss_module().IndexFlatIP(self.dim)
        self.staging.add(x)
        if self.staging.ntotal >= self.train_size():
            staged = self.staging.reconstruct_n(0, self.staging.ntotal)
            self.index.train(staged)
            self.index.add(staged)
            self.staging = None

    def reconstruct(self, labels: np.ndarray) -> np.ndarray:
        """Stored vectors for labels (exact for every index build_faiss_index makes)."""
        target = self.staging if self.staging is not None else self.index
        if len(labels) == 0:
            return np.empty((0, self.dim), np.float32)
        return np.ascontiguousarray(target.reconstruct_batch(np.ascontiguousarray(labels, dtype=np.int64)),
                                    dtype=np.float32)

    @staticmethod
    def _params(target, k: int, sel, ef_search: int, nprobe: int, k_factor: int):
        """(search parameters for `target`, the inner parameters they point to: keep both alive during the search)."""
        faiss = faiss_module()
        base = downcast(target)
        if isinstance(base, faiss.IndexHNSW):
            inner = faiss.SearchParametersHNSW(efSearch=max(ef_search, k))
        elif isinstance(base, faiss.IndexIVF):
            inner = faiss.SearchParametersIVF(nprobe=min(nprobe, base.nlist))
        else:
            inner = faiss.SearchParameters()
        if sel is not None:
            inner.sel = sel
        if is_refined(target):
            return faiss.IndexRefineSearchParameters(k_factor=float(k_factor), base_index_params=inner), inner
        return inner, inner

    def search(self, q: np.ndarray, k: int, ef_search: int, nprobe: int, k_factor: int,
               allowed: np.ndarray | None = None):
        """(scores, labels) of the live vectors (only labels in `allowed` when given: a metadata filter) for
        normalised queries; -1 labels where fewer than k."""
        faiss = faiss_module()
        # While the main index waits for training, everything is in the staging flat index and labels
        # coincide with its positions (the main index is empty then).
        target = self.staging if self.staging is not None else self.index
        if target.ntotal == 0 or (allowed is not None and len(allowed) == 0):
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        bitmap = self.live
        if allowed is not None:
            bitmap = np.zeros_like(self.live)
            np.bitwise_or.at(bitmap, allowed >> 3, (1 << (allowed & 7)).astype(np.uint8))
        sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap)) if self.n_dead or allowed is not None else None
        params, inner = self._params(target, k, sel, ef_search, nprobe, k_factor)  # staging: flat, just `sel`
        if len(q) >= _PARALLEL_MIN_QUERIES:
            return target.search(q, k, params=params)
        # A few queries: one OpenMP thread. Parallel regions for a single query cost more than they
        # save and stall under load (a server runs many such searches at once on its own threads).
        with one_omp_thread():
            return target.search(q, k, params=params)
