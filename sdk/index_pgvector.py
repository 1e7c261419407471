"""A gallery index in PostgreSQL with pgvector: `postgresql://USER@HOST/DB?collection=NAME[&m=16&ef_construction=100
&ef_search=128&pool_size=8]` (a unix socket: `postgresql://USER@/DB?host=/socket/dir&collection=NAME`).

Tables: `rsdk_collections` (one row per collection: dim, embedding space, HNSW config, item count and a
version bumped by every write) and `rsdk_items_NAME` (id text primary key, embedding vector(dim),
metadata jsonb with a GIN index for filters, thumbnail bytea) with an HNSW index on inner product. Every
write is one transaction that first locks and re-reads its collection row, so a collection re-created
with another space or dim is never written to, and writers from several server replicas serialise.
Searches set `hnsw.ef_search` per call with SET LOCAL and, under a metadata filter, pgvector's iterative
index scan (relaxed order, re-sorted here), so a selective filter still returns k hits.
Durability is PostgreSQL's: a commit returns after its WAL record is flushed (synchronous_commit=on).
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np

from sdk.errors import GalleryIndexError, UnknownIdError
from sdk.index import Hit, _dump_metadata, check_new_index
from sdk.index_external import ExternalIndex
from sdk.index_url import (BackendUnavailableError, HnswConfig, check_collection, hnsw_config, redact,
                           split_options)

OPTIONS = ("collection", "m", "ef_construction", "ef_search", "pool_size")
HINT = "pip install 'retrieval-sdk[scale]'"
MAX_EF_SEARCH = 1000  # pgvector's limit for hnsw.ef_search
_SCHEMA = """CREATE TABLE IF NOT EXISTS rsdk_collections (
    name text PRIMARY KEY, dim integer NOT NULL, space text NOT NULL, config jsonb NOT NULL,
    count bigint NOT NULL DEFAULT 0, version bigint NOT NULL DEFAULT 0, created double precision NOT NULL)"""


def _psycopg():
    try:
        import psycopg
        import psycopg_pool  # noqa: F401
        from pgvector.psycopg import register_vector  # noqa: F401
    except ImportError:
        raise BackendUnavailableError(f"postgresql:// indexes need psycopg 3 and pgvector: {HINT}") from None
    return psycopg


def _parse(url: str) -> tuple[str, str, HnswConfig, int]:
    """(libpq conninfo, collection name, HNSW config, pool size) from an index URL."""
    conninfo, opts = split_options(url, OPTIONS)
    name = check_collection(opts.get("collection", "gallery"), url)
    pool_size = opts.get("pool_size", "8")
    if not pool_size.isdigit() or int(pool_size) < 1:
        raise GalleryIndexError(f"index URL parameter pool_size={pool_size!r} must be a positive integer")
    return conninfo.replace("postgres://", "postgresql://", 1), name, hnsw_config(opts), int(pool_size)


def _connect(conninfo: str, url: str):
    """One autocommit connection, or a one-line BackendUnavailableError naming the (redacted) URL."""
    psycopg = _psycopg()
    try:
        return psycopg.connect(conninfo, autocommit=True, connect_timeout=10)
    except psycopg.Error as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BackendUnavailableError(f"cannot connect to PostgreSQL at {redact(url)}: {reason[:200]} "
                                      "(start the server or fix the URL)") from None


def _matrix(values: list, dim: int) -> np.ndarray:
    """(n, dim) float32 from pgvector values (pgvector-python >= 0.4 returns Vector objects)."""
    return np.array([v.to_numpy() if hasattr(v, "to_numpy") else v for v in values], np.float32).reshape(len(values), dim)


def _table(name: str) -> str:
    return f"rsdk_items_{name}"  # name is checked against COLLECTION_RE, so it is a safe identifier


def exists(url: str) -> bool:
    conninfo, name, _, _ = _parse(url)
    with _connect(conninfo, url) as conn:
        if conn.execute("SELECT to_regclass('rsdk_collections')").fetchone()[0] is None:
            return False
        return conn.execute("SELECT 1 FROM rsdk_collections WHERE name = %s", (name,)).fetchone() is not None


def create_collection(url: str, dim: int, space: str) -> "PgVectorIndex":
    """Create the collection (and the vector extension, the catalogue table) in one transaction."""
    check_new_index(dim, space)
    conninfo, name, cfg, _ = _parse(url)
    with _connect(conninfo, url) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('retrieval-sdk collections'))")
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except _psycopg().Error as e:
            raise BackendUnavailableError(f"PostgreSQL at {redact(url)} has no pgvector extension "
                                          f"({str(e).strip().splitlines()[0][:120]}); install pgvector there") from None
        conn.execute(_SCHEMA)
        if conn.execute("SELECT 1 FROM rsdk_collections WHERE name = %s", (name,)).fetchone():
            raise GalleryIndexError(f"collection {name!r} already exists at {redact(url)}; open it or choose another")
        t = _table(name)
        conn.execute(f"CREATE TABLE {t} (id text PRIMARY KEY, embedding vector({dim}) NOT NULL, metadata jsonb, "
                     "updated double precision NOT NULL, thumb_mime text, thumbnail bytea)")
        conn.execute(f"CREATE INDEX {t}_hnsw ON {t} USING hnsw (embedding vector_ip_ops) "
                     f"WITH (m = {cfg.m}, ef_construction = {cfg.ef_construction})")
        conn.execute(f"CREATE INDEX {t}_meta ON {t} USING gin (metadata jsonb_path_ops)")
        conn.execute("INSERT INTO rsdk_collections (name, dim, space, config, created) VALUES (%s, %s, %s, %s, %s)",
                     (name, dim, space, json.dumps({"m": cfg.m, "ef_construction": cfg.ef_construction}), time.time()))
    return open_collection(url)


def open_collection(url: str) -> "PgVectorIndex":
    conninfo, name, cfg, pool_size = _parse(url)
    with _connect(conninfo, url) as conn:
        row = conn.execute("SELECT dim, space, config FROM rsdk_collections WHERE name = %s", (name,)).fetchone()
    if row is None:
        raise GalleryIndexError(f"no collection {name!r} at {redact(url)}; create it with `retrieval-sdk index build`")
    dim, space, stored = row
    cfg = HnswConfig(m=stored.get("m", cfg.m), ef_construction=stored.get("ef_construction", cfg.ef_construction),
                     ef_search=cfg.ef_search)
    return PgVectorIndex(url, conninfo, name, dim, space, cfg, pool_size)


def _filter_sql(where: dict | None) -> tuple[str, list]:
    """(' AND ...' SQL, args) for a parsed filter: jsonb containment per value, served by the GIN index."""
    if not where:
        return "", []
    clauses, args = [], []
    for key, values in where.items():
        clauses.append("(" + " OR ".join(["metadata @> %s::jsonb"] * len(values)) + ")")
        args += [json.dumps({key: v}) for v in values]
    return " AND " + " AND ".join(clauses), args


class PgVectorIndex(ExternalIndex):
    """A collection in PostgreSQL + pgvector, reached through a connection pool (thread-safe)."""

    kind = "pgvector"

    def __init__(self, url: str, conninfo: str, name: str, dim: int, space: str, config: HnswConfig, pool_size: int):
        super().__init__(url, dim, space, config)
        from pgvector.psycopg import register_vector
        from psycopg_pool import ConnectionPool, PoolTimeout

        self.name, self._table = name, _table(name)
        self._pool = ConnectionPool(conninfo, min_size=1, max_size=pool_size, kwargs={"autocommit": True},
                                    configure=register_vector, open=False, timeout=30, name=f"rsdk-{name}")
        try:
            self._pool.open(wait=True, timeout=15)
        except PoolTimeout:
            self._pool.close()
            raise BackendUnavailableError(f"cannot open a connection pool to PostgreSQL at {redact(url)} "
                                          "(server gone or out of connections)") from None
        self._close_lock = threading.Lock()

    def _conn(self):
        self._check_open()
        return self._pool.connection()

    def _rows(self, sql: str, args=None) -> list[tuple]:
        """Every row of one read statement, on a pooled connection."""
        with self._conn() as conn:
            return conn.execute(sql, args).fetchall()

    # ---------------------------------------------------------------------------------------- writes
    def _lock_collection(self, conn) -> None:
        """Lock this collection's row for the transaction (writers serialise), bump its version and check
        that it still is the collection that was opened."""
        row = conn.execute("UPDATE rsdk_collections SET version = version + 1 WHERE name = %s RETURNING dim, space",
                           (self.name,)).fetchone()
        if row is None:
            raise GalleryIndexError(f"collection {self.name!r} was dropped from {redact(self.url)}; nothing was written")
        if tuple(row) != (self.dim, self.space):
            raise self._mismatch(*row)

    def _add(self, ids, x, metas, thumbs, now):
        """COPY the batch into a temporary table, then one upsert from it (a round trip per batch, not per row)."""
        t = self._table
        with self._conn() as conn, conn.transaction():
            self._lock_collection(conn)
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS rsdk_stage (id text, embedding vector, metadata jsonb, "
                         "updated double precision, thumb_mime text, thumbnail bytea) ON COMMIT DELETE ROWS")
            with conn.cursor() as cur, cur.copy("COPY rsdk_stage FROM STDIN") as copy:
                for j, i in enumerate(ids):
                    copy.write_row((i, x[j], metas[j], now, "image/jpeg" if thumbs[j] is not None else None, thumbs[j]))
            known = conn.execute(f"SELECT count(*) FROM {t} JOIN rsdk_stage USING (id)").fetchone()[0]
            conn.execute(
                f"INSERT INTO {t} (id, embedding, metadata, updated, thumb_mime, thumbnail) SELECT id, embedding, "
                "metadata, updated, thumb_mime, thumbnail FROM rsdk_stage ON CONFLICT (id) DO UPDATE SET "
                "embedding = excluded.embedding, metadata = excluded.metadata, updated = excluded.updated, "
                f"thumb_mime = COALESCE(excluded.thumb_mime, {t}.thumb_mime), "
                f"thumbnail = COALESCE(excluded.thumbnail, {t}.thumbnail)")
            added = len(ids) - known
            conn.execute("UPDATE rsdk_collections SET count = count + %s WHERE name = %s", (added, self.name))
        return added, known

    def _remove(self, ids, missing_ok):
        with self._conn() as conn, conn.transaction():
            self._lock_collection(conn)
            gone = conn.execute(f"DELETE FROM {self._table} WHERE id = ANY(%s) RETURNING id", (ids,)).fetchall()
            deleted = {r[0] for r in gone}
            unknown = [i for i in ids if i not in deleted]
            if unknown and not missing_ok:  # raising rolls the delete back: nothing changes
                raise UnknownIdError(f"unknown id {unknown[0]!r}" + (f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else ""))
            conn.execute("UPDATE rsdk_collections SET count = count - %s WHERE name = %s", (len(gone), self.name))
        return len(gone)

    def update_metadata(self, item_id: str, metadata: dict | None) -> None:
        text = _dump_metadata(metadata)
        with self._conn() as conn, conn.transaction():
            self._lock_collection(conn)
            if conn.execute(f"UPDATE {self._table} SET metadata = %s::jsonb, updated = %s WHERE id = %s",
                            (text, time.time(), item_id)).rowcount == 0:
                raise UnknownIdError(f"unknown id {item_id!r}")

    # ----------------------------------------------------------------------------------------- reads
    def _search(self, q, k, ef_search, where):
        sql, args = _filter_sql(where)
        ef = min(max(ef_search, k), MAX_EF_SEARCH)
        out = []
        with self._conn() as conn, conn.transaction():
            conn.execute(f"SET LOCAL hnsw.ef_search = {int(ef)}")
            if where:
                conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
            for row in q:
                rows = conn.execute(f"SELECT id, -(embedding <#> %s) AS score FROM {self._table} WHERE true{sql} "
                                    "ORDER BY embedding <#> %s LIMIT %s", (row, *args, row, k)).fetchall()
                hits = [Hit(i, float(s)) for i, s in rows]
                if where:  # relaxed order: re-sort the few hits it may hand back slightly out of order
                    hits.sort(key=lambda h: -h.score)
                out.append(hits)
        return out

    def get_vectors(self, ids) -> np.ndarray:
        ids = list(ids)
        rows = dict(self._rows(f"SELECT id, embedding FROM {self._table} WHERE id = ANY(%s)", (ids,)))
        missing = [i for i in ids if i not in rows]
        if missing:
            raise UnknownIdError(f"unknown id {missing[0]!r}")
        return _matrix([rows[i] for i in ids], self.dim)

    def live_vectors(self) -> tuple[list[str], np.ndarray]:
        rows = self._rows(f"SELECT id, embedding FROM {self._table} ORDER BY id")
        return [r[0] for r in rows], _matrix([r[1] for r in rows], self.dim)

    def get_metadata(self, ids) -> dict[str, dict | None]:
        if not ids:
            return {}
        return dict(self._rows(f"SELECT id, metadata FROM {self._table} WHERE id = ANY(%s)", (list(ids),)))

    def get(self, item_id: str) -> dict:
        rows = self._rows(f"SELECT metadata, updated FROM {self._table} WHERE id = %s", (item_id,))
        if not rows:
            raise UnknownIdError(f"unknown id {item_id!r}")
        return {"id": item_id, "metadata": rows[0][0], "updated": rows[0][1]}

    def _thumbnail(self, item_id: str) -> tuple[bytes, str] | None:
        rows = self._rows(f"SELECT thumbnail, thumb_mime FROM {self._table} WHERE id = %s AND thumbnail IS NOT NULL",
                          (item_id,))
        return (bytes(rows[0][0]), rows[0][1]) if rows else None

    def _collection_value(self, column: str) -> int:
        rows = self._rows(f"SELECT {column} FROM rsdk_collections WHERE name = %s", (self.name,))
        if not rows:
            raise GalleryIndexError(f"collection {self.name!r} was dropped from {redact(self.url)}")
        return int(rows[0][0])

    @property
    def version(self) -> int:
        """Bumped by every write through any replica (caches such as diffusion key on it)."""
        return self._collection_value("version")

    def __len__(self) -> int:
        return self._collection_value("count")

    def __contains__(self, item_id) -> bool:
        return bool(self._rows(f"SELECT 1 FROM {self._table} WHERE id = %s", (item_id,)))

    def ids(self) -> list[str]:
        return [r[0] for r in self._rows(f"SELECT id FROM {self._table} ORDER BY id")]

    def close(self) -> None:
        with self._close_lock:
            if not self._closed:
                self._closed = True
                self._pool.close()
