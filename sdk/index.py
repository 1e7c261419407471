"""A persistent gallery index: faiss behind one config string, string ids, metadata in SQLite, and
persistence that never loses an acknowledged add or delete.

GalleryIndex maps string ids to labels and checks every request; the vectors live in a VectorIndex
(sdk/vector_index.py: faiss index, staging, tombstones) and the metadata, write-ahead log, snapshots
and folder lock in an IndexStore (sdk/index_store.py, which documents the files).

Labels are positions: the n-th vector ever added gets label n. Deletes and updates leave a
tombstone (the item row points elsewhere or is gone), filtered at search time with an
IDSelectorBitmap; `compact()` rebuilds without them. Liveness is read from the items table, so a
delete needs no log record. Untrained (IVF/PQ) indexes serve exact search from a staging flat
index until `train_size` vectors have arrived, then train on them.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sdk.errors import (DimensionError, GalleryIndexError, IndexCorruptError, IndexLockedError,  # noqa: F401
                        SpaceMismatchError, UnknownIdError)
from sdk.index_store import DB_NAME, INDEX_FORMAT, INDEX_VERSION, IndexStore, read_info
from sdk.json_limits import MAX_METADATA_DEPTH, JSONLimitError, check_json
from sdk.vector_index import VectorIndex, build_faiss_index, one_omp_thread
from sdk.vectors import l2_normalize

MAX_ID_LEN = 512
MAX_METADATA_BYTES = 64 * 1024


@dataclass(frozen=True)
class IndexConfig:
    """How vectors are indexed: a faiss factory string plus search-time knobs.

    factory: 'Flat' (exact), 'HNSW32', 'IVF1024,Flat', 'IVF4096,PQ64', ... An index that does not store
    vectors exactly (PQ, SQ, LSH, transforms) gets an exact refine stage ('RFlat', see
    sdk/vector_index.py), so scores are true cosines and vectors reconstruct for compaction and QE.
    """

    factory: str = "Flat"
    ef_search: int = 128  # HNSW search breadth
    # HNSW build breadth. faiss's default 40 builds 1.6x faster but gives a much weaker graph: on 1M x 512
    # clustered vectors recall@10 at ef_search 32 was 0.68 with 40 and 0.98 with 100 (benchmarks/index_bench.py)
    ef_construction: int = 100
    nprobe: int = 32  # IVF lists visited per query
    k_factor: int = 8  # refine: candidates = k * k_factor (4 -> 8: recall@10 0.84 -> 0.99 for IVF1024,PQ64 at 1M)
    train_size: int = 0  # IVF: vectors needed before training (0: 40 per list, at least 1000)
    checkpoint_every: int = 20000  # added vectors between automatic snapshots (0: only on close/save)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IndexConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Hit:
    """One search result: the item's id, its score (cosine, or a re-ranking score) and metadata."""

    id: str
    score: float
    metadata: dict | None = None


@dataclass
class IndexStats:
    path: str | None
    embedding_space: str
    dim: int
    factory: str
    count: int
    tombstones: int
    trained: bool
    unsaved: int
    read_only: bool
    extra: dict = field(default_factory=dict)


class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (so adds are not starved)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def check_vectors(vectors, dim: int, what: str = "embedding") -> np.ndarray:
    """-> float32 (n, dim) L2-normalised copy; one-line errors for wrong shape, NaN/inf or zero rows."""
    try:
        x = np.array(vectors, dtype=np.float32, copy=True)
    except (TypeError, ValueError) as e:
        raise GalleryIndexError(f"{what} is not a numeric array ({e})") from None
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise DimensionError(f"{what} must be a vector or an (n, {dim}) matrix, got shape {x.shape}")
    if x.shape[1] != dim:
        raise DimensionError(f"{what} has dimension {x.shape[1]}, the index holds {dim}-d vectors "
                             "(use the bundle's model that matches this index)")
    if not np.isfinite(x).all():
        raise GalleryIndexError(f"{what} contains NaN or inf values")
    if (np.linalg.norm(x, axis=1) < 1e-6).any():
        raise GalleryIndexError(f"{what} has an all-zero vector, which has no direction")
    return np.ascontiguousarray(l2_normalize(x), dtype=np.float32)


def _check_id(item_id) -> str:
    if not isinstance(item_id, str) or not item_id or len(item_id) > MAX_ID_LEN or "\x00" in item_id:
        raise GalleryIndexError(f"item ids must be non-empty strings of at most {MAX_ID_LEN} characters "
                                f"without NUL, got {str(item_id)[:60]!r}")
    try:
        item_id.encode("utf-8")
    except UnicodeEncodeError:
        raise GalleryIndexError(f"item id {item_id[:60]!r} is not valid Unicode (a lone surrogate); "
                                "send UTF-8 text") from None
    return item_id


def _dump_metadata(meta) -> str | None:
    """Metadata -> stored JSON text, refused unless it can always be served back (size, depth, integers,
    strings, finite numbers; sdk/json_limits.py)."""
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise GalleryIndexError(f"metadata must be a JSON object (dict), got {type(meta).__name__}")
    try:
        text = json.dumps(meta, allow_nan=False, separators=(",", ":"))
    except RecursionError:
        raise GalleryIndexError(f"metadata is nested more than {MAX_METADATA_DEPTH} levels deep; flatten it") from None
    except (TypeError, ValueError) as e:
        raise GalleryIndexError(f"metadata is not JSON-serialisable ({e})") from None
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise GalleryIndexError(f"metadata is larger than {MAX_METADATA_BYTES // 1024} KiB")
    try:
        check_json(meta, MAX_METADATA_DEPTH, "metadata")
    except JSONLimitError as e:
        raise GalleryIndexError(str(e)) from None
    return text


def prepare_items(ids, vectors, dim: int, metadata=None, thumbnails=None
                  ) -> tuple[list[str], np.ndarray, list[str | None], list[bytes | None]]:
    """An add request checked whole, before anything is stored: (ids, normalised vectors, metadata JSON
    texts, thumbnails), one-line errors for bad ids, vectors, metadata or mismatched lengths."""
    ids = [_check_id(i) for i in (ids if not isinstance(ids, str) else [ids])]
    x = check_vectors(vectors, dim)
    if len(ids) != x.shape[0]:
        raise GalleryIndexError(f"{len(ids)} ids but {x.shape[0]} vectors")
    if len(set(ids)) != len(ids):
        raise GalleryIndexError("duplicate ids in one add")
    metas = [_dump_metadata(m) for m in (metadata if metadata is not None else [None] * len(ids))]
    thumbs = list(thumbnails) if thumbnails is not None else [None] * len(ids)
    if len(metas) != len(ids) or len(thumbs) != len(ids):
        raise GalleryIndexError("metadata and thumbnails need one entry per id")
    return ids, x, metas, thumbs


def check_new_index(dim, space) -> None:
    """One-line errors for the dim and embedding space a new index is created with."""
    if not isinstance(dim, int) or dim < 1:
        raise GalleryIndexError(f"dim must be a positive integer, got {dim!r}")
    if not space or not isinstance(space, str):
        raise GalleryIndexError("an index needs the embedding-space id of the bundle (manifest 'embedding_space')")


def check_space(space: str | None, expected: str) -> None:
    """SpaceMismatchError unless `space` is the index's embedding space."""
    if space != expected:
        raise SpaceMismatchError(f"embedding space {space!r} does not match the index's {expected!r}: "
                                 "query and gallery must come from models of the same bundle")


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise GalleryIndexError(f"k must be a positive integer, got {k!r}")
    return int(k)


FilterValue = str | int | bool
_FILTER_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def parse_filter(where) -> dict[str, list[FilterValue]] | None:
    """A metadata filter {key: value or [values]} -> {key: [values]}: an item matches when, for every key,
    its metadata's top-level value equals one of the values (strings, integers, booleans; types are
    compared too, so 1 matches neither true nor "1"). None or {} -> None (no filter)."""
    if where is None or where == {}:
        return None
    if not isinstance(where, dict):
        raise GalleryIndexError(f"a filter must be a JSON object {{key: value}}, got {type(where).__name__}")
    out = {}
    for key, value in where.items():
        if not isinstance(key, str) or not _FILTER_KEY.match(key):
            raise GalleryIndexError(f"filter key {str(key)[:40]!r} must be 1-64 letters, digits, '_' or '-' "
                                    "(a top-level metadata key)")
        values = value if isinstance(value, list) else [value]
        if not values or len(values) > 1000:
            raise GalleryIndexError(f"filter key {key!r} needs 1 to 1000 values")
        for v in values:
            if not isinstance(v, (str, int)) or (isinstance(v, int) and not isinstance(v, bool)
                                                  and not -2**63 <= v < 2**63):
                raise GalleryIndexError(f"filter values must be strings, integers or booleans; {key!r} has "
                                        f"{type(v).__name__} {str(v)[:40]}")
        out[key] = values
    return out


def matches_filter(meta: dict | None, where: dict[str, list[FilterValue]]) -> bool:
    """Whether metadata passes a parsed filter (type-exact equality, see parse_filter)."""
    if not meta:
        return False
    for key, values in where.items():
        v = meta.get(key, _MISSING)
        if not any(type(v) is type(w) and v == w for w in values):
            return False
    return True


_MISSING = object()


def _id_maps(pairs: Sequence[tuple[str, int]], vectors: VectorIndex) -> tuple[list[str | None], dict[str, int]]:
    """(label -> id or None, id -> label) from the (id, label) pairs of the live items, which also become the
    live labels of `vectors` (its tombstone bitmap)."""
    n = vectors.total
    id_of: list[str | None] = [None] * n
    label_of: dict[str, int] = {}
    for item_id, label in pairs:
        if not 0 <= label < n:
            raise IndexCorruptError(f"item {item_id!r} points at vector {label}, but the index holds {n}; "
                                    "restore or rebuild the index")
        id_of[label] = item_id
        label_of[item_id] = label
    vectors.set_live(np.fromiter(label_of.values(), np.int64, len(label_of)))
    return id_of, label_of


class IndexSurface(AbstractContextManager):  # `with` returns the object and closes it
    """The public reads GalleryIndex and the database backends (sdk/index_external.py) share over their
    `get_metadata`, `_thumbnail` and `__contains__`."""

    def _check_space(self, space: str | None) -> None:
        check_space(space, self.space)

    def with_metadata(self, results: list[list[Hit]]) -> list[list[Hit]]:
        metas = self.get_metadata(list({h.id for row in results for h in row}))
        return [[Hit(h.id, h.score, metas.get(h.id)) for h in row] for row in results]

    def thumbnail(self, item_id: str) -> tuple[bytes, str]:
        """(bytes, mime type) of an item's thumbnail; UnknownIdError if the item or its thumbnail is absent."""
        found = self._thumbnail(item_id)
        if found is None:
            what = "has no thumbnail (it was added as an embedding)" if item_id in self else "is unknown"
            raise UnknownIdError(f"item {item_id!r} {what}")
        return found

    def __exit__(self, *exc) -> None:
        self.close()


class GalleryIndex(IndexSurface):
    """String ids -> L2-normalised float32 vectors of one embedding space, searchable by inner product.

    Create with `GalleryIndex.create(path, dim, space, config)`, open with `GalleryIndex.open(path)`;
    `path=None` keeps everything in memory (benchmarks, tests). Thread-safe: searches run
    concurrently, adds/deletes take an exclusive lock. Use as a context manager or call `close()`.
    """

    def __init__(self, path: Path | None, dim: int, space: str, config: IndexConfig, read_only: bool = False):
        self.path = path
        self.dim = dim
        self.space = space
        self.config = config
        self.read_only = read_only
        index, self._factory = build_faiss_index(dim, config.factory, config.ef_construction)  # validates it
        self._vectors = VectorIndex(index, dim, config.train_size)
        self._lock = RWLock()
        self._store: IndexStore | None = None
        self._id_of: list[str | None] = []  # label -> id (None: tombstone)
        self._label_of: dict[str, int] = {}
        self._unsaved = 0  # vectors in the log, not in the snapshot
        self.version = 0  # bumped on every change (caches such as diffusion key on it)
        self._closed = False
        self._compact_lock = threading.Lock()  # one compaction at a time
        # Writers take `_writer` for the whole change (the durable SQLite commit included) and the
        # read/write lock only to mirror the committed change in memory, so searches wait for
        # microseconds, not for an fsync or a snapshot.
        self._writer = threading.Lock()
        self._compacting = False  # checkpoints wait while a compaction writes its snapshot

    # ------------------------------------------------------------------------------------------ open
    @classmethod
    def create(cls, path: str | Path | None, dim: int, space: str, config: IndexConfig | str = "Flat",
               exist_ok: bool = False) -> "GalleryIndex":
        """A new, empty index at `path` (a folder, created) for `dim`-d vectors of embedding space `space`."""
        if isinstance(config, str):
            config = IndexConfig(factory=config)
        check_new_index(dim, space)
        self = cls(Path(path) if path is not None else None, dim, space, config)
        if self.path is not None:
            if (self.path / DB_NAME).exists():
                if exist_ok:
                    return cls.open(self.path)
                raise GalleryIndexError(f"an index already exists at {self.path}; open it, or choose another path")
            self.path.mkdir(parents=True, exist_ok=True)
        self._store = IndexStore(self.path)
        self._store.create({"format": INDEX_FORMAT, "format_version": str(INDEX_VERSION), "dim": str(dim),
                            "embedding_space": space, "config": json.dumps(config.to_dict()),
                            **dict(IndexStore.snapshot_rows("", 0, 0, "")), "created": str(time.time())})
        return self

    @classmethod
    def open(cls, path: str | Path, mmap: bool = False, read_only: bool = False,
             config: IndexConfig | None = None) -> "GalleryIndex":
        """Open an index folder. mmap=True memory-maps the snapshot (large indexes; implies read-only).

        `config` may change search-time knobs (ef_search, nprobe, k_factor, checkpoint_every) but not
        the factory string. Raises IndexCorruptError with a one-line reason if the files are damaged.
        """
        path = Path(path)
        read_only = read_only or mmap
        info = read_info(path)
        try:
            stored = IndexConfig.from_dict(json.loads(info["config"]))
            dim, space = int(info["dim"]), info["embedding_space"]
        except (KeyError, ValueError, TypeError) as e:
            raise IndexCorruptError(f"{path / DB_NAME}: index info is damaged ({e}); rebuild the index") from None
        if config is not None:
            if build_faiss_index(dim, config.factory, 0)[1] != build_faiss_index(dim, stored.factory, 0)[1]:
                raise GalleryIndexError(f"index {path} is '{stored.factory}'; its config cannot change to "
                                        f"'{config.factory}' (build a new index)")
            stored = config
        self = cls(path, dim, space, stored, read_only=read_only)
        try:
            self._store = IndexStore(path, read_only=read_only, exclusive=not read_only)
            self._load(info, mmap)
        except BaseException:
            self.close()
            raise
        return self

    def _load(self, info: dict, mmap: bool) -> None:
        index = self._store.read_snapshot(info, self.dim, mmap)
        if index is not None:
            self._vectors.index = index
        self._store.remove_orphans(info.get("snapshot", ""))
        # Replay the write-ahead log: vectors added after the snapshot, in label order.
        batch = self._store.replay_log(int(info.get("snapshot_ntotal", "0")), self.dim)
        if batch and mmap:
            raise GalleryIndexError(f"index {self.path} has {len(batch)} vectors added since its last snapshot; "
                                    "open it once without mmap (or run `retrieval-sdk index compact`) to save one")
        if batch:
            self._vectors.append(np.stack(batch))
        self._unsaved = len(batch)
        self._id_of, self._label_of = _id_maps(self._store.items(), self._vectors)

    # ------------------------------------------------------------------------------------- internals
    def _check_writable(self) -> None:
        if self._closed:
            raise GalleryIndexError("the index is closed")
        if self.read_only:
            raise GalleryIndexError(f"index {self.path} is open read-only (mmap); open it without mmap to change it")

    # ---------------------------------------------------------------------------------------- writes
    def add(self, ids: Sequence[str], vectors, *, space: str, metadata: Sequence[dict | None] | None = None,
            thumbnails: Sequence[bytes | None] | None = None) -> dict:
        """Add or replace items. Returns {'added': n_new, 'updated': n_replaced}.

        Durable when it returns (persistent indexes). All-or-nothing: a bad id, vector or metadata
        raises before anything is stored.
        """
        self._check_writable()
        self._check_space(space)
        ids, x, metas, thumbs = prepare_items(ids, vectors, self.dim, metadata, thumbnails)
        if not ids:
            return {"added": 0, "updated": 0}
        with self._writer:
            start = self._vectors.total
            labels = np.arange(start, start + len(ids), dtype=np.int64)
            old = [self._label_of.get(i) for i in ids]
            self._store.add(ids, labels, x, metas, thumbs, time.time())
            # Committed: from here on the change is durable; mirror it in memory.
            with self._lock.write():
                self._mirror_add(ids, labels, x, old)
            if self.path is not None and self.config.checkpoint_every and self._unsaved >= self.config.checkpoint_every:
                self._checkpoint()
        return {"added": sum(o is None for o in old), "updated": sum(o is not None for o in old)}

    def _mirror_add(self, ids: list[str], labels: np.ndarray, x: np.ndarray, old: list[int | None]) -> None:
        """The in-memory side of a committed add (caller holds both locks)."""
        self._vectors.append(x)
        self._id_of.extend(ids)
        dead = np.array([o for o in old if o is not None], np.int64)
        for o in dead:
            self._id_of[o] = None
        for i, lb in zip(ids, labels):
            self._label_of[i] = int(lb)
        self._vectors.mark(dead, live=False)
        self._vectors.mark(labels, live=True)
        self._unsaved += len(ids) if self.path is not None else 0
        self.version += 1

    def remove(self, ids: Sequence[str] | str, missing_ok: bool = False) -> int:
        """Delete items; durable when it returns. Unknown ids raise UnknownIdError unless missing_ok."""
        self._check_writable()
        ids = [ids] if isinstance(ids, str) else list(ids)
        with self._writer:
            unknown = [i for i in ids if i not in self._label_of]
            if unknown and not missing_ok:
                raise UnknownIdError(f"unknown id {unknown[0]!r}" + (f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else ""))
            known = list(dict.fromkeys(i for i in ids if i in self._label_of))
            if not known:
                return 0
            self._store.remove(known)
            with self._lock.write():
                labels = np.array([self._label_of.pop(i) for i in known], np.int64)
                for lb in labels:
                    self._id_of[lb] = None
                self._vectors.mark(labels, live=False)
                self.version += 1
        return len(known)

    delete = remove

    def update_metadata(self, item_id: str, metadata: dict | None) -> None:
        self._check_writable()
        text = _dump_metadata(metadata)
        with self._writer:
            if item_id not in self._label_of:
                raise UnknownIdError(f"unknown id {item_id!r}")
            self._store.set_metadata(item_id, text, time.time())

    def save(self) -> None:
        """Write a snapshot now (otherwise every `checkpoint_every` adds and on close)."""
        self._check_writable()
        with self._writer:
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Snapshot the faiss index and drop the log rows it covers. The caller holds the writer lock:
        no change can happen meanwhile, while searches go on (writing the index only reads it)."""
        if self.path is None or self._unsaved == 0 or not self._vectors.ready or self._compacting:
            return
        self._store.commit_snapshot(self._store.write_snapshot(self._vectors.index), self._vectors.index.ntotal)
        self._unsaved = 0

    def compact(self) -> int:
        """Rebuild without tombstones (deleted or replaced vectors); returns how many were dropped.

        Online: the live vectors are copied (writers wait), the new faiss index is built and
        snapshotted with no lock held (searches and writes go on), then, with writers held off, the
        vectors added meanwhile are appended, what was deleted meanwhile is tombstoned and the items
        are relabelled in one transaction; searches wait only for the final swap of a few references.
        A crash before that transaction leaves the old index.
        """
        self._check_writable()
        with self._compact_lock:
            with self._writer:
                if self._vectors.n_dead == 0:
                    return 0
                order = sorted(self._label_of.items(), key=lambda kv: kv[1])
                base_total, dead_before = self._vectors.total, self._vectors.n_dead
                vectors = self._vectors.reconstruct(np.array([lb for _, lb in order], np.int64))
                self._compacting = True  # checkpoints (which hold the writer lock) skip until the swap
            try:
                return self._compact_swap(order, base_total, dead_before, vectors)
            finally:
                self._compacting = False

    def _compact_swap(self, order, base_total: int, dead_before: int, vectors: np.ndarray) -> int:
        index, _ = build_faiss_index(self.dim, self._factory, self.config.ef_construction)
        new = VectorIndex(index, self.dim, self.config.train_size)
        if len(order):
            with one_omp_thread():  # the build runs beside searches: it leaves them the other cores
                new.append(vectors)
        old_gen = self._store.snapshot_gen
        snapshot = None
        if self.path is not None and new.ready and new.index.ntotal > 0:
            snapshot = self._store.write_snapshot(new.index)
        position = {item_id: j for j, (item_id, _) in enumerate(order)}
        with self._writer:  # no change can commit meanwhile; searches go on until the swap
            try:
                # Catch up with the writes made while the new index was built: labels >= base_total are
                # vectors added since (appended now, in label order); older live labels were in `order`.
                pairs, added = [], []
                for item_id, label in self._label_of.items():
                    if label < base_total:
                        pairs.append((item_id, position[item_id]))
                    else:
                        added.append((label, item_id))
                added.sort()
                if added:
                    new.append(self._vectors.reconstruct(np.array([lb for lb, _ in added], np.int64)))
                pairs += [(item_id, len(order) + j) for j, (_, item_id) in enumerate(added)]
                covered = len(order) if snapshot else 0  # labels the snapshot holds; the log has the rest
                if self.path is not None:
                    log = new.reconstruct(np.arange(covered, new.total, dtype=np.int64))
                    self._store.relabel(pairs, snapshot, covered, log)
            except BaseException:
                self._store.snapshot_gen = old_gen
                if snapshot:
                    (self.path / snapshot[0]).unlink(missing_ok=True)
                raise
            id_of, label_of = _id_maps(pairs, new)
            with self._lock.write():  # the swap: searches wait only for these assignments
                self._vectors, self._id_of, self._label_of = new, id_of, label_of
                self._unsaved = new.total - covered if self.path is not None else 0
                self.version += 1
            self._compacting = False
            if self.path is not None and self.config.checkpoint_every and self._unsaved >= self.config.checkpoint_every:
                self._checkpoint()
            return dead_before

    # ----------------------------------------------------------------------------------------- reads
    def __len__(self) -> int:
        return len(self._label_of)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._label_of

    def ids(self) -> list[str]:
        return list(self._label_of)

    def get_vectors(self, ids: Sequence[str]) -> np.ndarray:
        """The stored (normalised) vectors of items; UnknownIdError for an unknown id."""
        with self._lock.read():
            try:
                labels = np.array([self._label_of[i] for i in ids], np.int64)
            except KeyError as e:
                raise UnknownIdError(f"unknown id {e.args[0]!r}") from None
            return self._vectors.reconstruct(labels)

    def live_vectors(self) -> tuple[list[str], np.ndarray]:
        """(ids, vectors) of every live item, in label order (for re-ranking models such as diffusion)."""
        with self._lock.read():
            order = sorted(self._label_of.items(), key=lambda kv: kv[1])
            return [i for i, _ in order], self._vectors.reconstruct(np.array([lb for _, lb in order], np.int64))

    def _prepare_query(self, queries, k, space) -> tuple[np.ndarray, int]:
        self._check_space(space)
        return check_vectors(queries, self.dim, "query embedding"), check_k(k)

    def _search_locked(self, q: np.ndarray, k: int, ef_search=None, nprobe=None, k_factor=None, where=None):
        """(scores, labels) for normalised queries, within the items that pass the parsed filter `where`;
        caller holds the read lock (ids are mapped to labels under it, so a compaction cannot intervene)."""
        if self._closed:
            raise GalleryIndexError("the index is closed")
        c = self.config
        allowed = None
        if where is not None:
            label_of = self._label_of
            allowed = np.fromiter((label_of[i] for i in self._store.filter_ids(where) if i in label_of), np.int64)
        return self._vectors.search(q, k, ef_search or c.ef_search, nprobe or c.nprobe, k_factor or c.k_factor,
                                    allowed)

    def search_labels(self, queries, k: int = 10, *, space: str, ef_search: int | None = None,
                      nprobe: int | None = None, k_factor: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw search: (scores (n, k) float32, int64 labels (n, k), -1 where fewer than k items).

        Labels are positions and change on `compact()`; map them with `search` unless you hold off writes.
        """
        q, k = self._prepare_query(queries, k, space)
        with self._lock.read():
            return self._search_locked(q, k, ef_search, nprobe, k_factor)

    def search(self, queries, k: int = 10, *, space: str, with_metadata: bool = False,
               ef_search: int | None = None, nprobe: int | None = None,
               k_factor: int | None = None, filter: dict | None = None) -> list[list[Hit]]:
        """Top-k items for each query row (a single vector counts as one row), best first; `filter`
        ({key: value or [values]}, see parse_filter) keeps only items whose metadata matches."""
        q, k = self._prepare_query(queries, k, space)
        where = parse_filter(filter)
        with self._lock.read():
            scores, labels = self._search_locked(q, k, ef_search, nprobe, k_factor, where)
            out = self._hits(scores, labels)
        if with_metadata:
            out = self.with_metadata(out)
        return out

    def search_with_vectors(self, queries, k: int, *, space: str, filter: dict | None = None,
                            **params) -> tuple[list[list[Hit]], list[np.ndarray]]:
        """Like `search`, plus each hit's stored vector (for query expansion), read under one lock."""
        q, k = self._prepare_query(queries, k, space)
        where = parse_filter(filter)
        with self._lock.read():
            scores, labels = self._search_locked(q, k, where=where, **params)
            out = self._hits(scores, labels)
            vecs = [self._vectors.reconstruct(np.array([self._label_of[h.id] for h in row], np.int64)) for row in out]
        return out, vecs

    def _hits(self, scores: np.ndarray, labels: np.ndarray) -> list[list[Hit]]:
        id_of, n = self._id_of, len(self._id_of)  # labels -1 (fewer than k) and tombstones give no hit
        return [[Hit(id_of[lb], s) for s, lb in zip(srow, lrow) if 0 <= lb < n and id_of[lb] is not None]
                for srow, lrow in zip(scores.tolist(), labels.tolist())]

    def get_metadata(self, ids: Sequence[str]) -> dict[str, dict | None]:
        """{id: metadata} for the ids that exist."""
        return self._store.metadata(ids) if ids else {}

    def get(self, item_id: str) -> dict:
        """{'id', 'metadata', 'updated'} of one item; UnknownIdError if absent."""
        return self._store.item(item_id)

    def _thumbnail(self, item_id: str) -> tuple[bytes, str] | None:
        return self._store.thumbnail(item_id)

    def stats(self) -> IndexStats:
        return IndexStats(path=str(self.path) if self.path else None, embedding_space=self.space, dim=self.dim,
                          factory=self._factory, count=len(self._label_of), tombstones=self._vectors.n_dead,
                          trained=self._vectors.ready, unsaved=self._unsaved, read_only=self.read_only)

    # ----------------------------------------------------------------------------------------- close
    def close(self) -> None:
        """Snapshot pending adds (read-write) and release the files."""
        if self._closed:
            return
        try:
            if self._store is not None and not self.read_only:
                with self._writer:
                    self._checkpoint()
        finally:
            self._closed = True
            if self._store is not None:
                self._store.close()

    def __repr__(self) -> str:
        return (f"GalleryIndex({str(self.path) if self.path else 'memory'}, '{self._factory}', {len(self)} items, "
                f"dim={self.dim}, space={self.space!r})")
