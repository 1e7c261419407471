"""A gallery index in Qdrant: `qdrant://HOST:PORT/COLLECTION[?api_key=KEY&https=1&m=16&ef_construction=100
&ef_search=128&quantization=int8]` (a server), or `qdrant+local:///FOLDER/COLLECTION` (qdrant-client's local
mode: a brute-force numpy stand-in kept in FOLDER, for tests and small galleries; it ignores HNSW and
quantisation settings and one process at a time may open the folder).

Points: id = uuid5 of the string id, vector = the embedding (dot product on unit vectors = cosine),
payload {id, metadata, updated, thumbnail (base64)}; metadata filters become payload conditions on
`metadata.KEY`. The collection's dim, embedding space and config live in the catalogue collection
`rsdk_catalogue` (one point per collection), re-read and checked before every write. Writes use
wait=True: acknowledged once applied and in Qdrant's write-ahead log.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
import uuid
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from sdk.errors import GalleryIndexError, UnknownIdError
from sdk.index import Hit, _dump_metadata, check_new_index, matches_filter
from sdk.index_external import ExternalIndex
from sdk.index_url import BackendUnavailableError, HnswConfig, check_collection, hnsw_config, redact

CATALOGUE = "rsdk_catalogue"
_NS = uuid.UUID("5f0c7c2e-8a4b-4c55-9a0e-2d7c1c9b6e11")  # uuid5 namespace of item ids
HINT = "pip install 'retrieval-sdk[scale]'"
BATCH = 256  # points per upsert call


def _models():
    try:
        from qdrant_client import models
    except ImportError:
        raise BackendUnavailableError(f"qdrant:// indexes need qdrant-client: {HINT}") from None
    return models


def point_id(item_id: str) -> str:
    return str(uuid.uuid5(_NS, item_id))


def _parse(url: str) -> tuple[dict, str, HnswConfig, str]:
    """(QdrantClient keyword arguments, collection, HNSW config, quantization) from an index URL."""
    parts = urlsplit(url)
    opts = dict(parse_qsl(parts.query))
    if parts.scheme.lower() == "qdrant+local":
        folder, _, name = parts.path.rstrip("/").rpartition("/")
        if not folder:
            raise GalleryIndexError(f"index URL {url} needs a folder and a collection: qdrant+local:///FOLDER/COLLECTION")
        client = {"path": folder}
    else:
        name = parts.path.strip("/")
        if not parts.hostname:
            raise GalleryIndexError(f"index URL {redact(url)} needs a host: qdrant://HOST:6333/COLLECTION")
        client = {"host": parts.hostname, "port": parts.port or 6333, "https": opts.get("https") in ("1", "true"),
                  "api_key": opts.get("api_key"), "timeout": 10,
                  "check_compatibility": False}  # reachability is checked by _client
    quant = opts.get("quantization", "none")
    if quant not in ("none", "int8"):
        raise GalleryIndexError(f"index URL parameter quantization={quant!r} must be 'none' or 'int8'")
    return client, check_collection(name, url), hnsw_config(opts), quant


_LOCAL_CLIENTS: dict[str, tuple[object, threading.Lock]] = {}  # local mode: one client per folder per process
_LOCAL_GUARD = threading.Lock()


def _client(kwargs: dict, url: str):
    """(a QdrantClient, a lock serialising its calls) checked to answer; local-mode clients are shared per
    folder (the folder takes one client at a time, and local mode is not thread-safe)."""
    _models()
    from qdrant_client import QdrantClient

    if "path" in kwargs:
        with _LOCAL_GUARD:
            if kwargs["path"] not in _LOCAL_CLIENTS:
                try:
                    _LOCAL_CLIENTS[kwargs["path"]] = (QdrantClient(path=kwargs["path"]), threading.Lock())
                except (RuntimeError, OSError) as e:
                    raise BackendUnavailableError(f"cannot open Qdrant local folder {kwargs['path']}: "
                                                  f"{str(e).splitlines()[0][:200]}") from None
            return _LOCAL_CLIENTS[kwargs["path"]]
    client = QdrantClient(**kwargs)
    try:
        client.get_collections()
    except Exception as e:  # noqa: BLE001  (httpx / grpc / qdrant exceptions alike mean: not reachable)
        client.close()
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BackendUnavailableError(f"cannot reach Qdrant at {redact(url)}: {reason[:200]} "
                                      "(start the server or fix the URL)") from None
    return client, contextlib.nullcontext()  # a server client is thread-safe: no serialisation needed


def _catalogue_entry(client, name: str) -> dict | None:
    if not client.collection_exists(CATALOGUE):
        return None
    found = client.retrieve(CATALOGUE, [point_id(name)], with_payload=True)
    return found[0].payload if found else None


def exists(url: str) -> bool:
    kwargs, name, _, _ = _parse(url)
    client, lock = _client(kwargs, url)
    try:
        with lock:
            return _catalogue_entry(client, name) is not None and client.collection_exists(name)
    finally:
        _release(client, kwargs)


def _release(client, kwargs: dict) -> None:
    if "path" not in kwargs:
        client.close()


def create_collection(url: str, dim: int, space: str) -> "QdrantIndex":
    check_new_index(dim, space)
    m = _models()
    kwargs, name, cfg, quant = _parse(url)
    client, lock = _client(kwargs, url)
    try:
        with lock:
            if client.collection_exists(name):
                raise GalleryIndexError(f"collection {name!r} already exists at {redact(url)}; open it or choose another")
            if not client.collection_exists(CATALOGUE):
                client.create_collection(CATALOGUE, vectors_config=m.VectorParams(size=1, distance=m.Distance.DOT))
            quantization = (m.ScalarQuantization(scalar=m.ScalarQuantizationConfig(type=m.ScalarType.INT8,
                                                                                    always_ram=True))
                            if quant == "int8" else None)
            client.create_collection(name, vectors_config=m.VectorParams(size=dim, distance=m.Distance.DOT),
                                     hnsw_config=m.HnswConfigDiff(m=cfg.m, ef_construct=cfg.ef_construction),
                                     quantization_config=quantization)
            client.upsert(CATALOGUE, [m.PointStruct(id=point_id(name), vector=[1.0], payload={
                "name": name, "dim": dim, "space": space, "m": cfg.m, "ef_construction": cfg.ef_construction,
                "quantization": quant, "version": uuid.uuid4().hex})], wait=True)
    finally:
        _release(client, kwargs)
    return open_collection(url)


def open_collection(url: str) -> "QdrantIndex":
    kwargs, name, cfg, quant = _parse(url)
    client, lock = _client(kwargs, url)
    with lock:
        entry = _catalogue_entry(client, name)
        ok = entry is not None and client.collection_exists(name)
    if not ok:
        _release(client, kwargs)
        raise GalleryIndexError(f"no collection {name!r} at {redact(url)}; create it with `retrieval-sdk index build`")
    cfg = HnswConfig(m=entry.get("m", cfg.m), ef_construction=entry.get("ef_construction", cfg.ef_construction),
                     ef_search=cfg.ef_search)
    return QdrantIndex(url, client, lock, kwargs, name, int(entry["dim"]), entry["space"], cfg,
                       entry.get("quantization", quant))


class QdrantIndex(ExternalIndex):
    """A Qdrant collection (server: thread-safe client; local mode: calls serialised)."""

    kind = "qdrant"

    def __init__(self, url, client, lock, kwargs, name, dim, space, config, quantization):
        super().__init__(url, dim, space, config)
        self.local = "path" in kwargs
        self.name, self.quantization = name, quantization
        self._client, self._lock, self._kwargs = client, lock, kwargs
        self._m = _models()
        self._write_lock = threading.Lock()

    def factory(self) -> str:
        if self.local:
            return "qdrant local (brute force)"
        return super().factory() + (" int8" if self.quantization == "int8" else "")

    def _call(self, method: str, *args, **kwargs):
        self._check_open()
        with self._lock:
            return getattr(self._client, method)(*args, **kwargs)

    def _retrieve(self, ids, payload=True, vectors=False) -> dict[str, object]:
        """{string id: point} for the ids that exist."""
        out = {}
        for start in range(0, len(ids), 1000):
            for p in self._call("retrieve", self.name, [point_id(i) for i in ids[start:start + 1000]],
                                with_payload=payload, with_vectors=vectors):
                out[p.payload["id"]] = p
        return out

    def _check_catalogue(self) -> None:
        """Re-read the collection's entry: a collection re-created with another space or dim is never written."""
        entry = self._call("retrieve", CATALOGUE, [point_id(self.name)], with_payload=True)
        if not entry:
            raise GalleryIndexError(f"collection {self.name!r} was dropped from {redact(self.url)}; nothing was written")
        p = entry[0].payload
        if (int(p["dim"]), p["space"]) != (self.dim, self.space):
            raise self._mismatch(int(p["dim"]), p["space"])

    def _bump_version(self) -> None:
        self._call("set_payload", CATALOGUE, {"version": uuid.uuid4().hex}, points=[point_id(self.name)], wait=True)

    # ---------------------------------------------------------------------------------------- writes
    def _add(self, ids, x, metas, thumbs, now):
        m = self._m
        with self._write_lock:
            self._check_catalogue()
            known = self._retrieve(ids, payload=["id", "thumbnail"])
            points = []
            for j, i in enumerate(ids):
                payload = {"id": i, "metadata": json.loads(metas[j]) if metas[j] else None, "updated": now}
                thumb = thumbs[j]
                if thumb is not None:
                    payload["thumbnail"] = base64.b64encode(thumb).decode()
                elif i in known and known[i].payload.get("thumbnail"):
                    payload["thumbnail"] = known[i].payload["thumbnail"]  # an update keeps its thumbnail
                points.append(m.PointStruct(id=point_id(i), vector=x[j].tolist(), payload=payload))
            for start in range(0, len(points), BATCH):
                self._call("upsert", self.name, points[start:start + BATCH], wait=True)
            self._bump_version()
        return len(ids) - len(known), len(known)

    def _remove(self, ids, missing_ok):
        with self._write_lock:
            known = self._retrieve(ids, payload=["id"])
            unknown = [i for i in ids if i not in known]
            if unknown and not missing_ok:
                raise UnknownIdError(f"unknown id {unknown[0]!r}" + (f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else ""))
            if known:
                self._call("delete", self.name, self._m.PointIdsList(points=[point_id(i) for i in known]), wait=True)
                self._bump_version()
        return len(known)

    def update_metadata(self, item_id: str, metadata: dict | None) -> None:
        text = _dump_metadata(metadata)
        with self._write_lock:
            if not self._retrieve([item_id], payload=["id"]):
                raise UnknownIdError(f"unknown id {item_id!r}")
            self._call("set_payload", self.name, {"metadata": json.loads(text) if text else None, "updated": time.time()},
                       points=[point_id(item_id)], wait=True)
            self._bump_version()

    # ----------------------------------------------------------------------------------------- reads
    def _search(self, q, k, ef_search, where):
        m = self._m
        params = None if self.local else m.SearchParams(  # local mode is brute force: no search parameters
            hnsw_ef=max(ef_search, k),
            quantization=m.QuantizationSearchParams(rescore=True) if self.quantization == "int8" else None)
        match = [m.FieldCondition(key=f"metadata.{key}", match=m.MatchValue(value=values[0]) if len(values) == 1
                                  else m.MatchAny(any=values)) for key, values in (where or {}).items()]
        only = m.Filter(must=match) if match else None
        requests = [m.QueryRequest(query=row.tolist(), limit=k, filter=only, params=params,
                                   with_payload=["id", "metadata"] if where else ["id"]) for row in q]
        # under a filter, type-exact equality again (local mode compares True == 1 like Python does)
        return [[Hit(p.payload["id"], float(p.score)) for p in res.points
                 if not where or matches_filter(p.payload.get("metadata"), where)]
                for res in self._call("query_batch_points", self.name, requests)]

    def get_vectors(self, ids) -> np.ndarray:
        ids = list(ids)
        found = self._retrieve(ids, payload=["id"], vectors=True)
        missing = [i for i in ids if i not in found]
        if missing:
            raise UnknownIdError(f"unknown id {missing[0]!r}")
        return np.array([found[i].vector for i in ids], np.float32).reshape(len(ids), self.dim)

    def _scroll(self, vectors: bool):
        offset = None
        while True:
            points, offset = self._call("scroll", self.name, limit=1000, offset=offset, with_payload=["id"],
                                        with_vectors=vectors)
            yield from points
            if offset is None:
                return

    def live_vectors(self) -> tuple[list[str], np.ndarray]:
        points = sorted(self._scroll(True), key=lambda p: p.payload["id"])
        return [p.payload["id"] for p in points], np.array([p.vector for p in points], np.float32).reshape(len(points), self.dim)

    def get_metadata(self, ids) -> dict[str, dict | None]:
        return {i: p.payload.get("metadata") for i, p in self._retrieve(list(ids), payload=["id", "metadata"]).items()}

    def get(self, item_id: str) -> dict:
        found = self._retrieve([item_id], payload=["id", "metadata", "updated"])
        if not found:
            raise UnknownIdError(f"unknown id {item_id!r}")
        p = found[item_id].payload
        return {"id": item_id, "metadata": p.get("metadata"), "updated": p.get("updated")}

    def _thumbnail(self, item_id: str) -> tuple[bytes, str] | None:
        found = self._retrieve([item_id], payload=["id", "thumbnail"])
        thumb = found[item_id].payload.get("thumbnail") if found else None
        return (base64.b64decode(thumb), "image/jpeg") if thumb else None

    @property
    def version(self) -> str:
        """A token changed by every write through any replica (caches such as diffusion key on it)."""
        entry = self._call("retrieve", CATALOGUE, [point_id(self.name)], with_payload=["version"])
        return entry[0].payload.get("version", "") if entry else ""

    def __len__(self) -> int:
        return int(self._call("count", self.name, exact=True).count)

    def __contains__(self, item_id) -> bool:
        return isinstance(item_id, str) and bool(self._retrieve([item_id], payload=["id"]))

    def ids(self) -> list[str]:
        return sorted(p.payload["id"] for p in self._scroll(False))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.local:
            with _LOCAL_GUARD, self._lock:
                if _LOCAL_CLIENTS.get(self._kwargs["path"], (None,))[0] is self._client:
                    del _LOCAL_CLIENTS[self._kwargs["path"]]
                    self._client.close()
        else:
            self._client.close()
