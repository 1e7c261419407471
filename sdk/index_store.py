"""The persistent side of a GalleryIndex: a folder holding

  index.sqlite   items (string id -> int64 label, metadata JSON), thumbnails, info, and the write-ahead
                 log of vectors added since the last snapshot. SQLite in WAL mode, synchronous=FULL:
                 an add or delete is acknowledged only after its transaction is on disk.
  index-N.faiss  the latest faiss snapshot (written to a temp file, fsynced, renamed; then the info
                 row that names it is committed and the log rows it covers are dropped in one
                 transaction). A crash at any point leaves the previous snapshot + log, or the new one.
  index.lock     flock: one writer (exclusive) or many readers (shared) across processes.

`path=None` keeps the database in memory (no snapshots, no log, no lock).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from sdk.bundle import sha256_path
from sdk.errors import GalleryIndexError, IndexCorruptError, IndexLockedError, UnknownIdError

INDEX_FORMAT = "retrieval-sdk/index"
INDEX_VERSION = 1
DB_NAME = "index.sqlite"
LOCK_NAME = "index.lock"
SNAPSHOT_RE = re.compile(r"^index-(\d+)\.faiss$")
_HASH_LIMIT = 1 << 30  # snapshots up to this size are sha256-checked on open (larger: size only)
_SCHEMA = """
    CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS items (id TEXT PRIMARY KEY, label INTEGER NOT NULL UNIQUE,
                                      metadata TEXT, updated REAL);
    CREATE TABLE IF NOT EXISTS thumbnails (id TEXT PRIMARY KEY, mime TEXT NOT NULL, data BLOB NOT NULL);
    CREATE TABLE IF NOT EXISTS log (label INTEGER PRIMARY KEY, vector BLOB NOT NULL);
"""


def read_info(path: Path) -> dict:
    """The info table of the index folder at `path`, checked to be a supported retrieval-sdk index."""
    db_path = path / DB_NAME
    if not db_path.is_file():
        raise GalleryIndexError(f"no index at {path} (no {DB_NAME}); create one with "
                                "`retrieval-sdk index build BUNDLE IMAGES --index PATH`")
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


class IndexStore:
    """SQLite metadata and write-ahead log, faiss snapshots and the folder lock of one index."""

    def __init__(self, path: Path | None, read_only: bool = False, exclusive: bool = True):
        self.path = path
        self.read_only = read_only
        self.snapshot_gen = 0
        self._lock = threading.Lock()  # one statement/transaction at a time on the shared connection
        self._lockfile = None
        if path is not None:
            self._lockfile = open(path / LOCK_NAME, "a+")
            try:
                fcntl.flock(self._lockfile, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lockfile.close()
                raise IndexLockedError(f"index {path} is open for writing in another process (a server or an "
                                       "ingest run); stop it first, or open read-only") from None
        try:
            self.db = self._connect()
            # Reads (metadata, items, thumbnails) go through their own connection: in WAL mode they see
            # the last committed state and never wait for a writer's transaction or its fsync.
            self.reader, self._read_lock = self.db, self._lock
            if path is not None and not read_only:
                self.reader = sqlite3.connect(f"file:{path / DB_NAME}?mode=ro", uri=True, check_same_thread=False,
                                              timeout=30)
                self._read_lock = threading.Lock()
        except BaseException:
            self.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        target = ":memory:" if self.path is None else str(self.path / DB_NAME)
        if self.read_only and self.path is not None:
            return sqlite3.connect(f"file:{target}?mode=ro", uri=True, check_same_thread=False, timeout=30)
        con = sqlite3.connect(target, check_same_thread=False, timeout=30, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")  # an acknowledged transaction survives power loss
        con.isolation_level = ""  # back to implicit transactions, committed by `with con:`
        return con

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One committed transaction (rolled back on any exception)."""
        with self._lock, self.db:
            yield self.db

    def create(self, info: dict[str, str]) -> None:
        with self.transaction() as db:
            db.executescript(_SCHEMA)
            db.executemany("INSERT INTO info(key, value) VALUES (?, ?)", info.items())

    def close(self) -> None:
        reader = getattr(self, "reader", None)
        if reader is not None and reader is not getattr(self, "db", None):
            reader.close()
        if getattr(self, "db", None) is not None:
            self.db.close()
        if self._lockfile is not None:
            self._lockfile.close()
            self._lockfile = None

    # ------------------------------------------------------------------------------------- snapshots
    def write_snapshot(self, index) -> tuple[str, int, str]:
        """Write `index` as the next snapshot (temp file, fsync, atomic rename, fsync of the folder);
        returns its file name, size and sha256 ('' above _HASH_LIMIT). Commit it with `commit_snapshot`."""
        from sdk.vector_index import faiss_module

        name = f"index-{self.snapshot_gen + 1}.faiss"
        tmp = self.path / (name + ".tmp")
        faiss_module().write_index(index, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path / name)
        dir_fd = os.open(self.path, os.O_RDONLY)  # the rename is durable once the folder is synced
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.snapshot_gen += 1
        size = (self.path / name).stat().st_size
        return name, size, (sha256_path(self.path / name) if size <= _HASH_LIMIT else "")

    @staticmethod
    def snapshot_rows(name: str, ntotal: int, size: int, digest: str) -> list[tuple[str, str]]:
        return [("snapshot", name), ("snapshot_ntotal", str(ntotal)), ("snapshot_size", str(size)),
                ("snapshot_sha256", digest)]

    def commit_snapshot(self, snapshot: tuple[str, int, str], ntotal: int) -> None:
        """Name the snapshot in the info table and drop the log rows it covers, in one transaction."""
        with self.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO info(key, value) VALUES (?, ?)",
                           self.snapshot_rows(snapshot[0], ntotal, *snapshot[1:]))
            db.execute("DELETE FROM log WHERE label < ?", (ntotal,))
        self.remove_orphans(snapshot[0])

    def read_snapshot(self, info: dict, dim: int, mmap: bool):
        """The faiss index of the info's snapshot (None when there is none yet), checked against the info."""
        from sdk.vector_index import faiss_module

        faiss = faiss_module()
        snap, ntotal = info.get("snapshot", ""), int(info.get("snapshot_ntotal", "0"))
        if not snap:
            return None
        snap_path = self.path / snap
        if not snap_path.is_file():
            raise IndexCorruptError(f"index snapshot {snap_path} is missing; restore it from a backup or rebuild")
        size = snap_path.stat().st_size
        if size != int(info.get("snapshot_size", "-1")):
            raise IndexCorruptError(f"index snapshot {snap_path} has {size} bytes, expected "
                                    f"{info.get('snapshot_size')} (truncated or replaced); restore or rebuild")
        if size <= _HASH_LIMIT and info.get("snapshot_sha256") and sha256_path(snap_path) != info["snapshot_sha256"]:
            raise IndexCorruptError(f"index snapshot {snap_path} does not match its checksum (corrupt); "
                                    "restore it from a backup or rebuild the index")
        flags = (faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY) if mmap else 0
        try:
            index = faiss.read_index(str(snap_path), flags)
        except RuntimeError as e:
            raise IndexCorruptError(f"cannot read index snapshot {snap_path}: "
                                    f"{str(e).strip().splitlines()[-1][:200]}; restore or rebuild") from None
        if index.ntotal != ntotal or index.d != dim:
            raise IndexCorruptError(f"index snapshot {snap_path} holds {index.ntotal} x {index.d}, "
                                    f"expected {ntotal} x {dim}; restore or rebuild")
        m = SNAPSHOT_RE.match(snap)
        self.snapshot_gen = int(m.group(1)) if m else 0
        return index

    def remove_orphans(self, keep: str) -> None:
        """Delete snapshots other than `keep` and leftover temp files."""
        if self.path is None or self.read_only:
            return
        for p in self.path.iterdir():
            if (SNAPSHOT_RE.match(p.name) and p.name != keep) or p.name.endswith(".faiss.tmp"):
                with suppress(OSError):
                    p.unlink()

    # ---------------------------------------------------------------------------------- log and items
    def replay_log(self, start: int, dim: int) -> list[np.ndarray]:
        """Vectors logged since the snapshot (labels start, start+1, ...), checked to be contiguous."""
        with self._lock:
            rows = self.db.execute("SELECT label, vector FROM log WHERE label >= ? ORDER BY label", (start,))
            out: list[np.ndarray] = []
            for label, blob in rows:
                if label != start + len(out) or len(blob) != 4 * dim:
                    raise IndexCorruptError(f"{self.path / DB_NAME}: write-ahead log is damaged at label {label}; "
                                            "restore or rebuild the index")
                out.append(np.frombuffer(blob, np.float32))
        return out

    def items(self) -> list[tuple[str, int]]:
        """(id, label) of every live item: the items table is the truth about liveness."""
        with self._lock:
            return self.db.execute("SELECT id, label FROM items").fetchall()

    def add(self, ids: Sequence[str], labels: np.ndarray, x: np.ndarray, metas: Sequence[str | None],
            thumbs: Sequence[bytes | None], now: float) -> None:
        """Log the vectors (persistent stores) and upsert the items and thumbnails, in one transaction."""
        with self.transaction() as db:
            if self.path is not None:
                db.executemany("INSERT INTO log(label, vector) VALUES (?, ?)",
                               ((int(lb), x[j].tobytes()) for j, lb in enumerate(labels)))
            db.executemany(
                "INSERT INTO items(id, label, metadata, updated) VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE "
                "SET label=excluded.label, metadata=excluded.metadata, updated=excluded.updated",
                ((i, int(lb), m, now) for i, lb, m in zip(ids, labels, metas)))
            for i, t in zip(ids, thumbs):
                if t is not None:
                    db.execute("INSERT OR REPLACE INTO thumbnails(id, mime, data) VALUES (?, ?, ?)",
                               (i, "image/jpeg", t))

    def remove(self, ids: Iterable[str]) -> None:
        ids = [(i,) for i in ids]
        with self.transaction() as db:
            db.executemany("DELETE FROM items WHERE id = ?", ids)
            db.executemany("DELETE FROM thumbnails WHERE id = ?", ids)

    def set_metadata(self, item_id: str, text: str | None, now: float) -> None:
        with self.transaction() as db:
            db.execute("UPDATE items SET metadata = ?, updated = ? WHERE id = ?", (text, now, item_id))

    def relabel(self, pairs: Sequence[tuple[str, int]], snapshot: tuple[str, int, str] | None, covered: int,
                log: np.ndarray) -> None:
        """After compaction, in one transaction: items point at their new labels, the new `snapshot` (or
        none) holds labels < `covered`, and the log holds `log`, the vectors of labels covered, covered+1, ..."""
        with self.transaction() as db:
            db.execute("CREATE TEMP TABLE IF NOT EXISTS relabel (id TEXT PRIMARY KEY, label INTEGER NOT NULL)")
            db.execute("DELETE FROM temp.relabel")
            db.executemany("INSERT INTO temp.relabel(id, label) VALUES (?, ?)", pairs)
            db.execute("UPDATE items SET label = -1 - (SELECT r.label FROM temp.relabel r WHERE r.id = items.id)")
            db.execute("UPDATE items SET label = -1 - label")
            db.execute("DELETE FROM temp.relabel")
            db.execute("DELETE FROM log")
            db.executemany("INSERT INTO log(label, vector) VALUES (?, ?)",
                           ((covered + j, log[j].tobytes()) for j in range(len(log))))
            name, size, digest = snapshot or ("", 0, "")
            db.executemany("INSERT OR REPLACE INTO info(key, value) VALUES (?, ?)",
                           self.snapshot_rows(name, covered if snapshot else 0, size, digest))
        self.remove_orphans(snapshot[0] if snapshot else "")

    def metadata(self, ids: Sequence[str]) -> dict[str, dict | None]:
        """{id: metadata} for the ids that exist."""
        out = {}
        with self._read_lock:
            for start in range(0, len(ids), 500):
                chunk = list(ids[start:start + 500])
                rows = self.reader.execute(f"SELECT id, metadata FROM items WHERE id IN ({','.join('?' * len(chunk))})",
                                       chunk).fetchall()
                out.update({i: (json.loads(m) if m else None) for i, m in rows})
        return out

    def filter_ids(self, where: dict[str, list]) -> list[str]:
        """Ids of the items whose metadata passes a parsed filter (sdk.index.parse_filter): per key, the
        JSON type and the value must equal one of the values."""
        clauses, args = [], []
        for key, values in where.items():
            path = f'$."{key}"'
            alts = []
            for v in values:
                if isinstance(v, bool):
                    alts.append("json_type(metadata, ?) = ?")
                    args += [path, "true" if v else "false"]
                else:
                    alts.append("(json_type(metadata, ?) = ? AND json_extract(metadata, ?) = ?)")
                    args += [path, "text" if isinstance(v, str) else "integer", path, v]
            clauses.append("(" + " OR ".join(alts) + ")")
        with self._read_lock:
            rows = self.reader.execute("SELECT id FROM items WHERE metadata IS NOT NULL AND " + " AND ".join(clauses),
                                       args).fetchall()
        return [r[0] for r in rows]

    def item(self, item_id: str) -> dict:
        with self._read_lock:
            row = self.reader.execute("SELECT metadata, updated FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise UnknownIdError(f"unknown id {item_id!r}")
        return {"id": item_id, "metadata": json.loads(row[0]) if row[0] else None, "updated": row[1]}

    def thumbnail(self, item_id: str) -> tuple[bytes, str] | None:
        with self._read_lock:
            row = self.reader.execute("SELECT data, mime FROM thumbnails WHERE id = ?", (item_id,)).fetchone()
        return None if row is None else (bytes(row[0]), row[1])
