"""A persistent gallery index: faiss behind one config string, string ids, metadata in SQLite, and
persistence that never loses an acknowledged add or delete.

Storage (a folder):
  index.sqlite   items (string id -> int64 label, metadata JSON), thumbnails, info, and the write-ahead
                 log of vectors added since the last snapshot. SQLite in WAL mode, synchronous=FULL:
                 an add or delete is acknowledged only after its transaction is on disk.
  index-N.faiss  the latest faiss snapshot (written to a temp file, fsynced, renamed; then the info
                 row that names it is committed and the log rows it covers are dropped in one
                 transaction). A crash at any point leaves the previous snapshot + log, or the new one.

Labels are positions: the n-th vector ever added gets label n. Deletes and updates leave a
tombstone (the item row points elsewhere or is gone), filtered at search time with an
IDSelectorBitmap; `compact()` rebuilds without them. Liveness is read from the items table, so a
delete needs no log record. Untrained (IVF/PQ) indexes serve exact search from a staging flat
index until `train_size` vectors have arrived, then train on them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

INDEX_FORMAT = "retrieval-sdk/index"
INDEX_VERSION = 1
DB_NAME = "index.sqlite"
LOCK_NAME = "index.lock"
MAX_ID_LEN = 512
MAX_METADATA_BYTES = 64 * 1024
_SNAPSHOT_RE = re.compile(r"^index-(\d+)\.faiss$")
_PARALLEL_MIN_QUERIES = 8  # fewer queries per call are searched on one thread
_HASH_LIMIT = 1 << 30  # snapshots up to this size are sha256-checked on open (larger: size only)


class GalleryIndexError(ValueError):
    """A request to the index that cannot be served (bad input, wrong state); nothing was changed."""


class SpaceMismatchError(GalleryIndexError):
    """Vectors from another embedding space than the index's."""


class DimensionError(GalleryIndexError):
    """Vectors of the wrong dimension."""


class UnknownIdError(GalleryIndexError, KeyError):
    """An id that is not in the index."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class IndexCorruptError(GalleryIndexError):
    """The files of an index are damaged or not an index."""


class IndexLockedError(GalleryIndexError):
    """Another process has the index open for writing."""


@dataclass(frozen=True)
class IndexConfig:
    """How vectors are indexed: a faiss factory string plus search-time knobs.

    factory: 'Flat' (exact), 'HNSW32', 'IVF1024,Flat', 'IVF4096,PQ64', ... Lossy codes (PQ, SQ, LSH)
    always get an exact refine stage ('RFlat'), so scores are true cosines and vectors can be
    reconstructed for compaction and query expansion.
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

    def normalized_factory(self) -> str:
        f = self.factory.replace(" ", "")
        if not f:
            raise GalleryIndexError("index config is empty; use e.g. 'Flat', 'HNSW32' or 'IVF1024,PQ64'")
        lossy = re.search(r"(^|,)(PQ|SQ|LSH|OPQ|RQ|LSQ|PRQ)", f) or "PQ" in f.split(",")[-1]
        if lossy and "RFlat" not in f and "Refine" not in f:
            f += ",RFlat"
        return f

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


def _faiss():
    import faiss

    return faiss


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
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms < 1e-6).any():
        raise GalleryIndexError(f"{what} has an all-zero vector, which has no direction")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def _check_id(item_id) -> str:
    if not isinstance(item_id, str) or not item_id or len(item_id) > MAX_ID_LEN or "\x00" in item_id:
        raise GalleryIndexError(f"item ids must be non-empty strings of at most {MAX_ID_LEN} characters "
                                f"without NUL, got {str(item_id)[:60]!r}")
    return item_id


def _dump_metadata(meta) -> str | None:
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise GalleryIndexError(f"metadata must be a JSON object (dict), got {type(meta).__name__}")
    try:
        text = json.dumps(meta, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise GalleryIndexError(f"metadata is not JSON-serialisable ({e})") from None
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise GalleryIndexError(f"metadata is larger than {MAX_METADATA_BYTES // 1024} KiB")
    return text


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class GalleryIndex:
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
        self._factory = config.normalized_factory()
        self._lock = RWLock()
        self._db_lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._lockfile = None
        self._index = None  # the main faiss index (labels = positions)
        self._staging = None  # exact flat index while the main one waits for training
        self._id_of: list[str | None] = []  # label -> id (None: tombstone)
        self._label_of: dict[str, int] = {}
        self._live = np.zeros(0, np.uint8)  # bitmap over labels, 1 = live
        self._n_dead = 0
        self._unsaved = 0  # vectors in the log, not in the snapshot
        self._snapshot_gen = 0
        self.version = 0  # bumped on every change (caches such as diffusion key on it)
        self._closed = False

    # ------------------------------------------------------------------------------------------ open
    @classmethod
    def create(cls, path: str | Path | None, dim: int, space: str, config: IndexConfig | str = "Flat",
               exist_ok: bool = False) -> "GalleryIndex":
        """A new, empty index at `path` (a folder, created) for `dim`-d vectors of embedding space `space`."""
        if isinstance(config, str):
            config = IndexConfig(factory=config)
        if not isinstance(dim, int) or dim < 1:
            raise GalleryIndexError(f"dim must be a positive integer, got {dim!r}")
        if not space or not isinstance(space, str):
            raise GalleryIndexError("an index needs the embedding-space id of the bundle (manifest 'embedding_space')")
        self = cls(Path(path) if path is not None else None, dim, space, config)
        self._index = self._new_faiss_index()  # validates the factory string before anything is written
        if self.path is not None:
            if (self.path / DB_NAME).exists():
                if exist_ok:
                    return cls.open(self.path)
                raise GalleryIndexError(f"an index already exists at {self.path}; open it, or choose another path")
            self.path.mkdir(parents=True, exist_ok=True)
            self._acquire_lock(exclusive=True)
        self._db = self._connect()
        with self._db:
            self._create_schema()
            info = {"format": INDEX_FORMAT, "format_version": str(INDEX_VERSION), "dim": str(dim),
                    "embedding_space": space, "config": json.dumps(config.to_dict()), "snapshot": "",
                    "snapshot_ntotal": "0", "snapshot_size": "0", "snapshot_sha256": "", "created": str(time.time())}
            self._db.executemany("INSERT INTO info(key, value) VALUES (?, ?)", info.items())
        self._after_load()
        return self

    @classmethod
    def open(cls, path: str | Path, mmap: bool = False, read_only: bool = False,
             config: IndexConfig | None = None) -> "GalleryIndex":
        """Open an index folder. mmap=True memory-maps the snapshot (large indexes; implies read-only).

        `config` may change search-time knobs (ef_search, nprobe, k_factor, checkpoint_every) but not
        the factory string. Raises IndexCorruptError with a one-line reason if the files are damaged.
        """
        path = Path(path)
        db_path = path / DB_NAME
        if not db_path.is_file():
            raise GalleryIndexError(f"no index at {path} (no {DB_NAME}); create one with "
                                    "`retrieval-sdk index build BUNDLE IMAGES --index PATH`")
        read_only = read_only or mmap
        info = cls._read_info(db_path)
        try:
            stored = IndexConfig.from_dict(json.loads(info["config"]))
            dim, space = int(info["dim"]), info["embedding_space"]
        except (KeyError, ValueError, TypeError) as e:
            raise IndexCorruptError(f"{db_path}: index info is damaged ({e}); rebuild the index") from None
        if config is not None:
            if config.normalized_factory() != stored.normalized_factory():
                raise GalleryIndexError(f"index {path} is '{stored.factory}'; its config cannot change to "
                                        f"'{config.factory}' (build a new index)")
            stored = config
        self = cls(path, dim, space, stored, read_only=read_only)
        self._acquire_lock(exclusive=not read_only)
        try:
            self._db = self._connect()
            self._load(info, mmap)
        except BaseException:
            self.close()
            raise
        return self

    @staticmethod
    def _read_info(db_path: Path) -> dict:
        try:
            con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
            try:
                info = dict(con.execute("SELECT key, value FROM info").fetchall())
            finally:
                con.close()
        except sqlite3.DatabaseError as e:
            raise IndexCorruptError(f"{db_path} is not a readable index database ({e}); restore it from a "
                                    "backup or rebuild the index") from None
        if info.get("format") != INDEX_FORMAT:
            raise IndexCorruptError(f"{db_path} is not a retrieval-sdk index (format={info.get('format')!r})")
        if info.get("format_version") != str(INDEX_VERSION):
            raise GalleryIndexError(f"index format version {info.get('format_version')} is not supported by this "
                                    f"retrieval-sdk (reads {INDEX_VERSION}); upgrade retrieval-sdk")
        return info

    def _acquire_lock(self, exclusive: bool) -> None:
        if self.path is None:
            return
        self._lockfile = open(self.path / LOCK_NAME, "a+")
        try:
            fcntl.flock(self._lockfile, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lockfile.close()
            self._lockfile = None
            raise IndexLockedError(f"index {self.path} is open for writing in another process (a server or an "
                                   "ingest run); stop it first, or open read-only") from None

    def _connect(self) -> sqlite3.Connection:
        target = ":memory:" if self.path is None else str(self.path / DB_NAME)
        if self.read_only and self.path is not None:
            con = sqlite3.connect(f"file:{target}?mode=ro", uri=True, check_same_thread=False, timeout=30)
        else:
            con = sqlite3.connect(target, check_same_thread=False, timeout=30, isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")  # an acknowledged transaction survives power loss
            con.isolation_level = ""  # back to implicit transactions, committed by `with con:`
        return con

    def _create_schema(self) -> None:
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS items (id TEXT PRIMARY KEY, label INTEGER NOT NULL UNIQUE,
                                              metadata TEXT, updated REAL);
            CREATE TABLE IF NOT EXISTS thumbnails (id TEXT PRIMARY KEY, mime TEXT NOT NULL, data BLOB NOT NULL);
            CREATE TABLE IF NOT EXISTS log (label INTEGER PRIMARY KEY, vector BLOB NOT NULL);
        """)

    def _new_faiss_index(self):
        faiss = _faiss()
        try:
            index = faiss.index_factory(self.dim, self._factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise GalleryIndexError(f"invalid index config '{self.config.factory}': "
                                    f"{str(e).strip().splitlines()[-1][:200]} (try 'Flat', 'HNSW32', "
                                    "'IVF1024,Flat' or 'IVF1024,PQ64')") from None
        base = faiss.downcast_index(index.base_index) if hasattr(index, "base_index") else index
        if hasattr(base, "hnsw"):
            base.hnsw.efConstruction = self.config.ef_construction
        if isinstance(base, faiss.IndexIVF) and not hasattr(index, "base_index"):
            base.set_direct_map_type(faiss.DirectMap.Array)  # exact reconstruct for compaction / QE
        if "IDMap" in self._factory:
            raise GalleryIndexError("index config must not contain IDMap: ids are managed by GalleryIndex")
        return index

    def _load(self, info: dict, mmap: bool) -> None:
        faiss = _faiss()
        snap = info.get("snapshot", "")
        ntotal = int(info.get("snapshot_ntotal", "0"))
        if snap:
            snap_path = self.path / snap
            if not snap_path.is_file():
                raise IndexCorruptError(f"index snapshot {snap_path} is missing; restore it from a backup or rebuild")
            size = snap_path.stat().st_size
            if size != int(info.get("snapshot_size", "-1")):
                raise IndexCorruptError(f"index snapshot {snap_path} has {size} bytes, expected "
                                        f"{info.get('snapshot_size')} (truncated or replaced); restore or rebuild")
            if size <= _HASH_LIMIT and info.get("snapshot_sha256") and _sha256(snap_path) != info["snapshot_sha256"]:
                raise IndexCorruptError(f"index snapshot {snap_path} does not match its checksum (corrupt); "
                                        "restore it from a backup or rebuild the index")
            flags = (faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY) if mmap else 0
            try:
                self._index = faiss.read_index(str(snap_path), flags)
            except RuntimeError as e:
                raise IndexCorruptError(f"cannot read index snapshot {snap_path}: "
                                        f"{str(e).strip().splitlines()[-1][:200]}; restore or rebuild") from None
            if self._index.ntotal != ntotal or self._index.d != self.dim:
                raise IndexCorruptError(f"index snapshot {snap_path} holds {self._index.ntotal} x {self._index.d}, "
                                        f"expected {ntotal} x {self.dim}; restore or rebuild")
            m = _SNAPSHOT_RE.match(snap)
            self._snapshot_gen = int(m.group(1)) if m else 0
        else:
            self._index = self._new_faiss_index()
        if not self.read_only:
            self._remove_orphans(snap)
        # Replay the write-ahead log: vectors added after the snapshot, in label order.
        with self._db_lock:
            rows = self._db.execute("SELECT label, vector FROM log WHERE label >= ? ORDER BY label", (ntotal,))
            expected = ntotal
            batch: list[np.ndarray] = []
            for label, blob in rows:
                if label != expected or len(blob) != 4 * self.dim:
                    raise IndexCorruptError(f"{self.path / DB_NAME}: write-ahead log is damaged at label {label}; "
                                            "restore or rebuild the index")
                batch.append(np.frombuffer(blob, np.float32))
                expected += 1
        if batch and mmap:
            raise GalleryIndexError(f"index {self.path} has {len(batch)} vectors added since its last snapshot; "
                                    "open it once without mmap (or run `retrieval-sdk index compact`) to save one")
        if batch:
            self._append(np.stack(batch))
        self._unsaved = len(batch)
        # Liveness: the items table is the truth.
        with self._db_lock:
            pairs = self._db.execute("SELECT id, label FROM items").fetchall()
        self._after_load(pairs)

    def _after_load(self, pairs: Sequence[tuple[str, int]] = ()) -> None:
        n = self._total()
        self._id_of = [None] * n
        self._label_of = {}
        for item_id, label in pairs:
            if not 0 <= label < n:
                raise IndexCorruptError(f"item {item_id!r} points at vector {label}, but the index holds {n}; "
                                        "restore or rebuild the index")
            self._id_of[label] = item_id
            self._label_of[item_id] = label
        self._live = np.zeros((n + 7) // 8 + 1024, np.uint8)
        labels = np.fromiter(self._label_of.values(), np.int64, len(self._label_of))
        np.bitwise_or.at(self._live, labels >> 3, (1 << (labels & 7)).astype(np.uint8))
        self._n_dead = n - len(self._label_of)

    def _remove_orphans(self, keep: str) -> None:
        for p in self.path.iterdir():
            if (_SNAPSHOT_RE.match(p.name) and p.name != keep) or p.name.endswith(".faiss.tmp"):
                try:
                    p.unlink()
                except OSError:
                    pass

    # ------------------------------------------------------------------------------------- internals
    def _total(self) -> int:
        """Number of labels handed out (live + tombstones)."""
        return self._index.ntotal + (self._staging.ntotal if self._staging is not None else 0)

    def _train_size(self) -> int:
        if self.config.train_size:
            return self.config.train_size
        faiss = _faiss()
        base = self._index.base_index if hasattr(self._index, "base_index") else self._index
        ivf = faiss.try_extract_index_ivf(base) if hasattr(faiss, "try_extract_index_ivf") else None
        nlist = ivf.nlist if ivf is not None else 64
        return max(1000, 40 * nlist)

    def _append(self, x: np.ndarray) -> None:
        """Add vectors with the next labels (in memory only)."""
        if self._index.is_trained and self._staging is None:
            self._index.add(x)
            return
        faiss = _faiss()
        if self._staging is None:
            self._staging = faiss.IndexFlatIP(self.dim)
        self._staging.add(x)
        if self._staging.ntotal >= self._train_size():
            staged = self._staging.reconstruct_n(0, self._staging.ntotal)
            self._index.train(staged)
            self._index.add(staged)
            self._staging = None

    def _check_writable(self) -> None:
        if self._closed:
            raise GalleryIndexError("the index is closed")
        if self.read_only:
            raise GalleryIndexError(f"index {self.path} is open read-only (mmap); open it without mmap to change it")

    def _check_space(self, space: str | None) -> None:
        if space != self.space:
            raise SpaceMismatchError(f"embedding space {space!r} does not match the index's {self.space!r}: "
                                     "query and gallery must come from models of the same bundle")

    def _mark(self, labels: np.ndarray, live: bool) -> None:
        if len(labels) == 0:
            return
        need = int(labels.max()) // 8 + 1
        if need > len(self._live):
            grown = np.zeros(max(need, 2 * len(self._live)), np.uint8)
            grown[: len(self._live)] = self._live
            self._live = grown
        bits = (1 << (labels & 7)).astype(np.uint8)
        if live:
            np.bitwise_or.at(self._live, labels >> 3, bits)
        else:
            np.bitwise_and.at(self._live, labels >> 3, ~bits)

    # ---------------------------------------------------------------------------------------- writes
    def add(self, ids: Sequence[str], vectors, *, space: str, metadata: Sequence[dict | None] | None = None,
            thumbnails: Sequence[bytes | None] | None = None) -> dict:
        """Add or replace items. Returns {'added': n_new, 'updated': n_replaced}.

        Durable when it returns (persistent indexes). All-or-nothing: a bad id, vector or metadata
        raises before anything is stored.
        """
        self._check_writable()
        self._check_space(space)
        ids = [_check_id(i) for i in (ids if not isinstance(ids, str) else [ids])]
        x = check_vectors(vectors, self.dim)
        if len(ids) != x.shape[0]:
            raise GalleryIndexError(f"{len(ids)} ids but {x.shape[0]} vectors")
        if len(set(ids)) != len(ids):
            raise GalleryIndexError("duplicate ids in one add")
        metas = [_dump_metadata(m) for m in (metadata if metadata is not None else [None] * len(ids))]
        thumbs = list(thumbnails) if thumbnails is not None else [None] * len(ids)
        if len(metas) != len(ids) or len(thumbs) != len(ids):
            raise GalleryIndexError("metadata and thumbnails need one entry per id")
        if not ids:
            return {"added": 0, "updated": 0}
        now = time.time()
        with self._lock.write():
            start = self._total()
            labels = np.arange(start, start + len(ids), dtype=np.int64)
            old = [self._label_of.get(i) for i in ids]
            with self._db_lock, self._db:
                if self.path is not None:
                    self._db.executemany("INSERT INTO log(label, vector) VALUES (?, ?)",
                                         ((int(lb), x[j].tobytes()) for j, lb in enumerate(labels)))
                self._db.executemany(
                    "INSERT INTO items(id, label, metadata, updated) VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE "
                    "SET label=excluded.label, metadata=excluded.metadata, updated=excluded.updated",
                    ((i, int(lb), m, now) for i, lb, m in zip(ids, labels, metas)))
                for i, t in zip(ids, thumbs):
                    if t is not None:
                        self._db.execute("INSERT OR REPLACE INTO thumbnails(id, mime, data) VALUES (?, ?, ?)",
                                         (i, "image/jpeg", t))
            # Committed: from here on the change is durable; mirror it in memory.
            self._append(x)
            self._id_of.extend(ids)
            dead = np.array([o for o in old if o is not None], np.int64)
            for o in dead:
                self._id_of[o] = None
            for i, lb in zip(ids, labels):
                self._label_of[i] = int(lb)
            self._mark(dead, live=False)
            self._mark(labels, live=True)
            self._n_dead += len(dead)
            self._unsaved += len(ids) if self.path is not None else 0
            self.version += 1
            if self.path is not None and self.config.checkpoint_every and self._unsaved >= self.config.checkpoint_every:
                self._checkpoint()
        return {"added": len(ids) - len(dead), "updated": len(dead)}

    def remove(self, ids: Sequence[str] | str, missing_ok: bool = False) -> int:
        """Delete items; durable when it returns. Unknown ids raise UnknownIdError unless missing_ok."""
        self._check_writable()
        ids = [ids] if isinstance(ids, str) else list(ids)
        with self._lock.write():
            unknown = [i for i in ids if i not in self._label_of]
            if unknown and not missing_ok:
                raise UnknownIdError(f"unknown id {unknown[0]!r}" + (f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else ""))
            known = list(dict.fromkeys(i for i in ids if i in self._label_of))
            if not known:
                return 0
            with self._db_lock, self._db:
                self._db.executemany("DELETE FROM items WHERE id = ?", ((i,) for i in known))
                self._db.executemany("DELETE FROM thumbnails WHERE id = ?", ((i,) for i in known))
            labels = np.array([self._label_of.pop(i) for i in known], np.int64)
            for lb in labels:
                self._id_of[lb] = None
            self._mark(labels, live=False)
            self._n_dead += len(labels)
            self.version += 1
        return len(known)

    delete = remove

    def update_metadata(self, item_id: str, metadata: dict | None) -> None:
        self._check_writable()
        text = _dump_metadata(metadata)
        with self._lock.write():
            if item_id not in self._label_of:
                raise UnknownIdError(f"unknown id {item_id!r}")
            with self._db_lock, self._db:
                self._db.execute("UPDATE items SET metadata = ?, updated = ? WHERE id = ?", (text, time.time(), item_id))

    def save(self) -> None:
        """Write a snapshot now (otherwise every `checkpoint_every` adds and on close)."""
        self._check_writable()
        with self._lock.write():
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Snapshot the faiss index and drop the log rows it covers (caller holds the write lock)."""
        if self.path is None or self._unsaved == 0 or self._staging is not None or not self._index.is_trained:
            return
        gen = self._snapshot_gen + 1
        name, size, digest = self._write_snapshot(gen)
        ntotal = self._index.ntotal
        with self._db_lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO info(key, value) VALUES (?, ?)", [
                ("snapshot", name), ("snapshot_ntotal", str(ntotal)), ("snapshot_size", str(size)),
                ("snapshot_sha256", digest)])
            self._db.execute("DELETE FROM log WHERE label < ?", (ntotal,))
        self._snapshot_gen = gen
        self._unsaved = 0
        self._remove_orphans(name)

    def _write_snapshot(self, gen: int) -> tuple[str, int, str]:
        """Write the faiss index as snapshot `gen` (temp file, fsync, atomic rename, fsync of the folder);
        returns its file name, size and sha256 ('' above _HASH_LIMIT)."""
        name = f"index-{gen}.faiss"
        tmp = self.path / (name + ".tmp")
        _faiss().write_index(self._index, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path / name)
        _fsync_dir(self.path)
        size = (self.path / name).stat().st_size
        return name, size, (_sha256(self.path / name) if size <= _HASH_LIMIT else "")

    def compact(self) -> int:
        """Rebuild without tombstones (deleted or replaced vectors); returns how many were dropped."""
        self._check_writable()
        with self._lock.write():
            dropped = self._n_dead
            if dropped == 0:
                return 0
            order = sorted(self._label_of.items(), key=lambda kv: kv[1])
            old_labels = np.array([lb for _, lb in order], np.int64)
            vectors = self._reconstruct(old_labels) if len(order) else np.empty((0, self.dim), np.float32)
            old_index, old_staging, old_snapshot_gen = self._index, self._staging, self._snapshot_gen
            self._index, self._staging = self._new_faiss_index(), None
            if len(order):
                self._append(vectors)
            new_pairs = [(item_id, j) for j, (item_id, _) in enumerate(order)]
            if self.path is not None:
                snapshot = self._index.is_trained and self._staging is None and self._index.ntotal > 0
                name, size, digest = "", 0, ""
                if snapshot:
                    gen = old_snapshot_gen + 1
                    name, size, digest = self._write_snapshot(gen)
                    self._snapshot_gen = gen
                try:
                    with self._db_lock, self._db:
                        self._db.execute("UPDATE items SET label = -label - 1")
                        self._db.executemany("UPDATE items SET label = ? WHERE id = ?", ((j, i) for i, j in new_pairs))
                        self._db.execute("DELETE FROM log")
                        if not snapshot:  # untrained or empty: the log keeps the vectors
                            self._db.executemany("INSERT INTO log(label, vector) VALUES (?, ?)",
                                                 ((j, vectors[j].tobytes()) for _, j in new_pairs))
                        self._db.executemany("INSERT OR REPLACE INTO info(key, value) VALUES (?, ?)", [
                            ("snapshot", name), ("snapshot_ntotal", str(len(order) if snapshot else 0)),
                            ("snapshot_size", str(size)), ("snapshot_sha256", digest)])
                except BaseException:
                    self._index, self._staging, self._snapshot_gen = old_index, old_staging, old_snapshot_gen
                    raise
                self._remove_orphans(name)
                self._unsaved = 0 if snapshot else len(order)
            self._after_load(new_pairs)
            self.version += 1
            return dropped

    # ----------------------------------------------------------------------------------------- reads
    def __len__(self) -> int:
        return len(self._label_of)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._label_of

    def ids(self) -> list[str]:
        return list(self._label_of)

    def _reconstruct(self, labels: np.ndarray) -> np.ndarray:
        """Stored vectors for labels (exact for every supported config; caller holds a lock)."""
        target = self._staging if self._staging is not None else self._index
        if len(labels) == 0:
            return np.empty((0, self.dim), np.float32)
        return np.ascontiguousarray(target.reconstruct_batch(np.ascontiguousarray(labels, dtype=np.int64)),
                                    dtype=np.float32)

    def get_vectors(self, ids: Sequence[str]) -> np.ndarray:
        """The stored (normalised) vectors of items; UnknownIdError for an unknown id."""
        with self._lock.read():
            try:
                labels = np.array([self._label_of[i] for i in ids], np.int64)
            except KeyError as e:
                raise UnknownIdError(f"unknown id {e.args[0]!r}") from None
            return self._reconstruct(labels)

    def live_vectors(self) -> tuple[list[str], np.ndarray]:
        """(ids, vectors) of every live item, in label order (for re-ranking models such as diffusion)."""
        with self._lock.read():
            order = sorted(self._label_of.items(), key=lambda kv: kv[1])
            labels = np.array([lb for _, lb in order], np.int64)
            return [i for i, _ in order], self._reconstruct(labels)

    def _params(self, k: int, sel, ef_search: int | None, nprobe: int | None, k_factor: int | None):
        faiss = _faiss()
        index = self._index
        base = faiss.downcast_index(index.base_index) if hasattr(index, "base_index") else index
        if hasattr(base, "hnsw"):
            inner = faiss.SearchParametersHNSW(efSearch=max(ef_search or self.config.ef_search, k))
        elif isinstance(base, faiss.IndexIVF):
            inner = faiss.SearchParametersIVF(nprobe=min(nprobe or self.config.nprobe, base.nlist))
        else:
            inner = faiss.SearchParameters()
        if sel is not None:
            inner.sel = sel
        if hasattr(index, "base_index"):
            return faiss.IndexRefineSearchParameters(k_factor=float(k_factor or self.config.k_factor),
                                                     base_index_params=inner), inner
        return inner, inner

    def _prepare_query(self, queries, k, space) -> tuple[np.ndarray, int]:
        self._check_space(space)
        q = check_vectors(queries, self.dim, "query embedding")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise GalleryIndexError(f"k must be a positive integer, got {k!r}")
        return q, int(k)

    def _search_locked(self, q: np.ndarray, k: int, ef_search=None, nprobe=None, k_factor=None):
        """(scores, labels) for normalised queries; caller holds the read lock."""
        faiss = _faiss()
        if self._closed:
            raise GalleryIndexError("the index is closed")
        # While the main index waits for training, everything is in the staging flat index and labels
        # coincide with its positions (the main index is empty then).
        target = self._staging if self._staging is not None else self._index
        if target.ntotal == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        sel = faiss.IDSelectorBitmap(len(self._live), faiss.swig_ptr(self._live)) if self._n_dead else None
        if target is self._staging:
            params = faiss.SearchParameters()
            if sel is not None:
                params.sel = sel
        else:
            params, _ = self._params(k, sel, ef_search, nprobe, k_factor)
        if len(q) >= _PARALLEL_MIN_QUERIES:
            return target.search(q, k, params=params)
        # A few queries: one OpenMP thread. Parallel regions for a single query cost more than they
        # save and stall under load (a server runs many such searches at once on its own threads).
        # omp_set_num_threads only affects the calling thread's later parallel regions.
        faiss = _faiss()
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return target.search(q, k, params=params)
        finally:
            faiss.omp_set_num_threads(before)

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
               k_factor: int | None = None) -> list[list[Hit]]:
        """Top-k items for each query row (a single vector counts as one row), best first."""
        q, k = self._prepare_query(queries, k, space)
        with self._lock.read():
            scores, labels = self._search_locked(q, k, ef_search, nprobe, k_factor)
            out = self._hits(scores, labels)
        if with_metadata:
            out = self.with_metadata(out)
        return out

    def search_with_vectors(self, queries, k: int, *, space: str, **params) -> tuple[list[list[Hit]], list[np.ndarray]]:
        """Like `search`, plus each hit's stored vector (for query expansion), read under one lock."""
        q, k = self._prepare_query(queries, k, space)
        with self._lock.read():
            scores, labels = self._search_locked(q, k, **params)
            out = self._hits(scores, labels)
            vecs = [self._reconstruct(np.array([self._label_of[h.id] for h in row], np.int64)) for row in out]
        return out, vecs

    def _hits(self, scores: np.ndarray, labels: np.ndarray) -> list[list[Hit]]:
        id_of = self._id_of
        out = []
        for srow, lrow in zip(scores.tolist(), labels.tolist()):
            row = []
            for s, lb in zip(srow, lrow):
                if 0 <= lb < len(id_of):
                    item_id = id_of[lb]
                    if item_id is not None:
                        row.append(Hit(item_id, s))
            out.append(row)
        return out

    def with_metadata(self, results: list[list[Hit]]) -> list[list[Hit]]:
        metas = self.get_metadata(list({h.id for row in results for h in row}))
        return [[Hit(h.id, h.score, metas.get(h.id)) for h in row] for row in results]

    def get_metadata(self, ids: Sequence[str]) -> dict[str, dict | None]:
        """{id: metadata} for the ids that exist."""
        if not ids:
            return {}
        out = {}
        with self._db_lock:
            for start in range(0, len(ids), 500):
                chunk = list(ids[start:start + 500])
                rows = self._db.execute(f"SELECT id, metadata FROM items WHERE id IN ({','.join('?' * len(chunk))})",
                                        chunk).fetchall()
                out.update({i: (json.loads(m) if m else None) for i, m in rows})
        return out

    def get(self, item_id: str) -> dict:
        """{'id', 'metadata', 'updated'} of one item; UnknownIdError if absent."""
        with self._db_lock:
            row = self._db.execute("SELECT metadata, updated FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise UnknownIdError(f"unknown id {item_id!r}")
        return {"id": item_id, "metadata": json.loads(row[0]) if row[0] else None, "updated": row[1]}

    def thumbnail(self, item_id: str) -> tuple[bytes, str]:
        """(bytes, mime type) of an item's thumbnail; UnknownIdError if the item or its thumbnail is absent."""
        with self._db_lock:
            row = self._db.execute("SELECT data, mime FROM thumbnails WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            what = "has no thumbnail (it was added as an embedding)" if item_id in self._label_of else "is unknown"
            raise UnknownIdError(f"item {item_id!r} {what}")
        return bytes(row[0]), row[1]

    def stats(self) -> IndexStats:
        return IndexStats(path=str(self.path) if self.path else None, embedding_space=self.space, dim=self.dim,
                          factory=self._factory, count=len(self._label_of), tombstones=self._n_dead,
                          trained=self._staging is None and self._index.is_trained, unsaved=self._unsaved,
                          read_only=self.read_only)

    # ----------------------------------------------------------------------------------------- close
    def close(self) -> None:
        """Snapshot pending adds (read-write) and release the files."""
        if self._closed:
            return
        try:
            if self._db is not None and not self.read_only and self._index is not None:
                with self._lock.write():
                    self._checkpoint()
        finally:
            self._closed = True
            if self._db is not None:
                self._db.close()
            if self._lockfile is not None:
                self._lockfile.close()
                self._lockfile = None

    def __enter__(self) -> "GalleryIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GalleryIndex({str(self.path) if self.path else 'memory'}, '{self._factory}', {len(self)} items, "
                f"dim={self.dim}, space={self.space!r})")

