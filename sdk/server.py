"""The cloud gallery service (`retrieval-sdk serve`): FastAPI over a GalleryIndex and a model bundle.

Endpoints (OpenAPI at /openapi.json, docs at /docs):
  POST   /v1/search                 query embedding (JSON floats, or base64 float32/int8) -> top-k
  POST   /v1/search/image           an image; the server embeds it with the query model (thin clients)
  POST   /v1/items                  add/replace items: JSON embeddings, or multipart images (gallery model)
  GET    /v1/items/{id}             an item's metadata
  DELETE /v1/items/{id}             delete an item
  GET    /v1/items/{id}/thumbnail   the JPEG thumbnail stored with an image item
  POST   /v1/embed                  images -> the bundle's gallery (or query) embeddings (write scope)
  GET    /v1/model                  manifest, embedding-space id, index stats
  POST   /v1/index/compact          drop tombstones now (also done in the background past a threshold)
  GET    /healthz, /metrics         liveness; Prometheus text metrics

API keys (X-API-Key header or `Authorization: Bearer KEY`) carry scopes 'read' and/or 'write'; with
no keys configured the server is open (it binds 127.0.0.1 by default). Every error is a 4xx with a
one-line `detail`, and a rejected request never changes the index.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import logging
import os
import threading
import time
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal, Optional
from urllib.parse import unquote

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from sdk import __version__
from sdk.bundle import BundleError, Manifest, read_manifest
from sdk.errors import GalleryIndexError, SdkError, SpaceMismatchError, UnknownIdError
from sdk.index import GalleryIndex, IndexConfig, check_vectors
from sdk.index_url import open_index, url_scheme
from sdk.json_limits import loads as parse_json
from sdk.preprocess import ImageError, thumbnail_jpeg
from sdk.rerank import RERANK_METHODS, DiffusionCache, DiffusionNotReady, Method, RerankConfig, rerank_search
from sdk.server_asgi import Metrics, ServiceMiddleware

log = logging.getLogger("retrieval_sdk.server")

SCOPES = ("read", "write")
API_KEYS_ENV = "RETRIEVAL_SDK_API_KEYS"
FloatValue = Annotated[float, Field(allow_inf_nan=False)]


# ------------------------------------------------------------------------------------------------ config
@dataclass
class ServerConfig:
    bundle: Path
    index: str | Path  # a folder / faiss:///PATH, postgresql://..., qdrant://... (sdk/index_url.py)
    index_config: str = "Flat"  # faiss factory for a new faiss index (an existing one keeps its own)
    api_keys: dict[str, frozenset[str]] = field(default_factory=dict)  # key -> scopes
    max_body_bytes: int = 32 * 1024 * 1024
    body_timeout_s: float = 30.0  # the whole request body must arrive within this (slow senders get 408)
    max_image_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    max_request_pixels: int = 100_000_000  # all images of one request together (decoding cost)
    max_items_per_request: int = 1000
    max_images_per_request: int = 64
    max_k: int = 1000
    thumbnail_size: int = 256
    threads: int | None = None  # ONNX Runtime threads per model
    checkpoint_every: int = 20000  # added vectors between index snapshots (the log covers the rest)
    # Background compaction once tombstones are more than this share of all vectors (and at least
    # compact_min_tombstones); a fraction >= 1 turns it off (POST /v1/index/compact still works).
    compact_tombstone_fraction: float = 0.5
    compact_min_tombstones: int = 1000
    rerank: RerankConfig = field(default_factory=RerankConfig)
    static: dict[str, Path] = field(default_factory=dict)  # URL prefix -> folder (e.g. the mobile demo)


def parse_api_keys(text: str) -> dict[str, frozenset[str]]:
    """API keys from text: JSON {"KEY": ["read", "write"]} or lines 'KEY read,write' ('#' comments;
    ';' may separate entries on one line, as in the environment variable)."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            raw = json.loads(text)
            entries = [(k, v if isinstance(v, list) else str(v).split(",")) for k, v in raw.items()]
        except (json.JSONDecodeError, AttributeError) as e:
            raise SdkError(f"API keys JSON is invalid ({e}); expected {{\"KEY\": [\"read\", \"write\"]}}") from None
    else:
        entries = []
        for line in text.replace(";", "\n").splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split(None, 1)
            if len(parts) != 2:
                raise SdkError(f"API key line {line[:12]!r}... needs scopes: 'KEY read' or 'KEY read,write'")
            entries.append((parts[0], parts[1].replace(" ", "").split(",")))
    keys = {}
    for key, scopes in entries:
        scopes = frozenset(s.strip() for s in scopes if s.strip())
        bad = scopes - set(SCOPES)
        if bad or not scopes:
            raise SdkError(f"API key scopes must be among {SCOPES}, got {sorted(bad) or 'none'}")
        if len(key) < 8:
            raise SdkError("API keys must be at least 8 characters long")
        keys[key] = scopes
    return keys


def load_api_keys(path: Path | None) -> dict[str, frozenset[str]]:
    """Keys from a file (--api-keys-file) and/or the RETRIEVAL_SDK_API_KEYS environment variable."""
    keys = parse_api_keys(os.environ.get(API_KEYS_ENV, ""))
    if path is not None:
        try:
            keys.update(parse_api_keys(Path(path).read_text()))
        except OSError as e:
            raise SdkError(f"cannot read API keys file {path}: {e.strerror}") from None
    return keys


# ------------------------------------------------------------------------------------------------ schemas
class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    space: str = Field(..., max_length=256, description="Embedding-space id of the model that made the embedding.")
    embedding: Optional[list[FloatValue]] = Field(None, max_length=65536, description="The query embedding as floats.")
    embedding_b64: Optional[str] = Field(None, max_length=1_000_000,
                                         description="The query embedding as base64 of little-endian float32 or int8.")
    dtype: Literal["float32", "int8"] = Field("float32", description="dtype of embedding_b64.")
    k: int = Field(10, ge=1, le=100000)
    rerank: Method = "none"
    with_metadata: bool = True
    filter: Optional[dict] = Field(None, max_length=32, description=(
        "Only items whose metadata has, for every key, one of the values: {\"color\": \"red\", \"shop\": [1, 2]} "
        "(strings, integers, booleans; top-level keys)."))


class SearchHit(BaseModel):
    id: str
    score: float
    metadata: Optional[dict] = None


class SearchResponse(BaseModel):
    results: list[SearchHit]
    took_ms: float
    space: str
    rerank: str


class ItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(..., min_length=1, max_length=512)
    embedding: Optional[list[FloatValue]] = Field(None, max_length=65536)
    embedding_b64: Optional[str] = Field(None, max_length=1_000_000)
    dtype: Literal["float32", "int8"] = "float32"
    metadata: Optional[dict] = None


class AddItemsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    space: str = Field(..., max_length=256)
    items: list[ItemIn] = Field(..., min_length=1)


class AddItemsResponse(BaseModel):
    added: int
    updated: int
    ids: list[str]


class EmbedResponse(BaseModel):
    space: str
    role: str
    dim: int
    embeddings_b64: list[str]  # one little-endian float32 vector per image, in upload order


class DeleteResponse(BaseModel):
    deleted: str


class ItemResponse(BaseModel):
    id: str
    metadata: Optional[dict] = None
    updated: Optional[float] = None


class ModelResponse(BaseModel):
    embedding_space: str
    embedding_dim: int
    manifest: dict
    index: dict
    gallery_model: str


class Health(BaseModel):
    status: str
    items: int


_ERROR = {"description": "Error", "content": {"application/json": {"example": {"detail": "one-line reason"}}}}


# ------------------------------------------------------------------------------------------------ helpers
def decode_embedding(values, b64: str | None, dtype: str, dim: int) -> np.ndarray:
    """JSON floats or base64 float32/int8 -> normalised float32 (dim,); HTTP 400 on anything wrong."""
    if (values is None) == (b64 is None):
        raise HTTPException(400, "give exactly one of 'embedding' (floats) or 'embedding_b64' (base64)")
    if b64 is not None:
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(400, "embedding_b64 is not valid base64") from None
        width = 4 if dtype == "float32" else 1
        if len(raw) != dim * width:
            raise HTTPException(400, f"embedding_b64 decodes to {len(raw)} bytes; a {dim}-d {dtype} embedding "
                                     f"has {dim * width}")
        x = np.frombuffer(raw, "<f4" if dtype == "float32" else np.int8).astype(np.float32)
        if dtype == "int8":
            x = x / 127.0  # symmetric int8 quantisation; the scale cancels in normalisation
    else:
        with np.errstate(over="ignore"):  # values beyond float32 become inf and are refused below
            x = np.asarray(values, np.float32)
    try:
        return check_vectors(x, dim)[0]
    except GalleryIndexError as e:
        raise HTTPException(400, str(e)) from None


# ------------------------------------------------------------------------------------------------ state
class ServerState:
    """What the endpoints share: the manifest, the index, lazily loaded embedders, caches, metrics."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.manifest: Manifest = read_manifest(config.bundle)
        self.space = self.manifest.embedding_space
        self.gallery_role = "gallery" if "gallery" in self.manifest.models else "query"
        self.dim = self.manifest.model(self.gallery_role).embedding_dim
        if "query" in self.manifest.models and self.manifest.model("query").embedding_dim != self.dim:
            raise BundleError("bundle's query and gallery models have different embedding dims; re-export it")
        faiss = url_scheme(config.index) == "faiss"
        new_config = IndexConfig(config.index_config, checkpoint_every=config.checkpoint_every) if faiss else None
        self.index = open_index(config.index, dim=self.dim, space=self.space, config=new_config, create=True)
        if isinstance(self.index, GalleryIndex) and self.index.config.checkpoint_every != config.checkpoint_every:
            self.index.config = replace(self.index.config, checkpoint_every=config.checkpoint_every)
        self._embedders: dict[str, object] = {}
        self._embed_lock = threading.Lock()
        self.diffusion = DiffusionCache(background=True)
        self._compact_guard = threading.Lock()
        self._compactor: threading.Thread | None = None  # the latest compaction
        self._compactors: list[threading.Thread] = []  # all that may still run (joined on close)
        self.compactions = 0
        self.metrics = Metrics(self.index.stats)

    def embedder(self, role: str):
        with self._embed_lock:
            if role not in self._embedders:
                from sdk.embedder import Embedder

                self._embedders[role] = Embedder.from_bundle(self.config.bundle, role=role,
                                                             threads=self.config.threads, workers=1, verify=False)
            return self._embedders[role]

    def after_write(self) -> None:
        """After each add or delete: start a background compaction once tombstones pass the configured
        share of the index (searches and writes go on meanwhile; GalleryIndex.compact)."""
        st = self.index.stats()
        if (st.tombstones < self.config.compact_min_tombstones
                or st.tombstones <= self.config.compact_tombstone_fraction * (st.count + st.tombstones)):
            return
        with self._compact_guard:
            if self._compactor is not None and self._compactor.is_alive():
                return
            self._start_compaction({})

    def compact(self) -> int:
        """Compact now and wait for it (after any compaction already running; searches answer throughout)."""
        with self._compact_guard:
            result: dict = {}
            thread = self._start_compaction(result)
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["dropped"]

    def _start_compaction(self, result: dict) -> threading.Thread:
        """Run index.compact() in a new thread at lowered CPU priority, so that the rebuild takes the
        cycles searches leave; `result` gets 'dropped' or 'error' (caller holds _compact_guard)."""

        def work() -> None:
            with suppress(AttributeError, OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)  # this thread only (Linux)
            try:
                result["dropped"] = self.index.compact()
                self.compactions += 1
                log.info("compaction dropped %d tombstones", result["dropped"])
            except Exception as e:  # noqa: BLE001  (logged; the index is unchanged and a later write retries)
                result["error"] = e
                log.exception("compaction failed")

        self._compactor = threading.Thread(target=work, name="compaction", daemon=True)
        self._compactor.start()
        self._compactors = [t for t in self._compactors if t.is_alive()] + [self._compactor]
        return self._compactor

    def close(self) -> None:
        with self._compact_guard:
            compactors = list(self._compactors)
        for thread in compactors:
            thread.join()
        self.index.close()


async def _read_uploads(uploads, config: ServerConfig) -> list[bytes]:
    """The uploads' bytes, each checked to be a readable image within the size limits, and all of them together
    within the request's pixel budget (decoding costs CPU by the pixels an image claims, however small its file)."""
    blobs, pixels = [], 0
    for u in uploads:
        data, name = await u.read(config.max_image_bytes + 1), u.filename or "image"
        if not data:
            raise HTTPException(400, f"upload {name!r} is empty")
        if len(data) > config.max_image_bytes:
            raise HTTPException(413, f"image {name!r} is larger than {config.max_image_bytes} bytes")
        try:
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
        except Image.DecompressionBombError:
            raise HTTPException(413, f"image {name!r} has too many pixels") from None
        except Exception:  # noqa: BLE001  (PIL raises many types for non-images)
            raise HTTPException(400, f"upload {name!r} is not a readable image (send JPEG, PNG or WebP)") from None
        if w * h > config.max_image_pixels:
            raise HTTPException(413, f"image {name!r} is {w}x{h}; the limit is {config.max_image_pixels} pixels")
        pixels += w * h
        if pixels > config.max_request_pixels:
            raise HTTPException(413, f"the images of one request may hold {config.max_request_pixels} pixels in "
                                     "all; send fewer or smaller images per request")
        blobs.append(data)
    return blobs


def _embed_images(state: ServerState, role: str, blobs: list[bytes]) -> np.ndarray:
    try:
        return state.embedder(role).embed(blobs, batch_size=16)
    except ImageError as e:
        raise HTTPException(400, str(e)) from None


# ------------------------------------------------------------------------------------------------ routes
# The endpoints are plain functions over the ServerState the app carries (app.state.retrieval); the
# API-key check is a dependency per scope. create_app only wires them together.
router = APIRouter()
_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)
_bearer = HTTPBearer(auto_error=False)


def get_state(request: Request) -> ServerState:
    return request.app.state.retrieval


def require(scope: str):
    """A dependency that lets a request through when its API key carries `scope` (or no keys are set)."""

    def check(state: ServerState = Depends(get_state), api_key: Optional[str] = Depends(_key_header),
              creds: Optional[HTTPAuthorizationCredentials] = Depends(_bearer)) -> None:
        keys = state.config.api_keys
        if not keys:
            return
        given = api_key or (creds.credentials if creds else None)
        if not given:
            raise HTTPException(401, "missing API key: send 'X-API-Key: KEY' or 'Authorization: Bearer KEY'",
                                headers={"WWW-Authenticate": "Bearer"})
        scopes = next((s for k, s in keys.items() if hmac.compare_digest(k.encode(), given.encode())), None)
        if scopes is None:
            raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
        if scope not in scopes:
            raise HTTPException(403, f"this API key lacks the '{scope}' scope")

    return check


READ, WRITE = Depends(require("read")), Depends(require("write"))
State = Annotated[ServerState, Depends(get_state)]


def _check_space(state: ServerState, space: str, fix: str) -> None:
    if space != state.space:
        raise SpaceMismatchError(f"embedding space {space!r} does not match this server's {state.space!r}: {fix}")


def run_search(state: ServerState, q: np.ndarray, k: int, rerank: str, with_metadata: bool,
               where: dict | None = None) -> SearchResponse:
    if k > state.config.max_k:
        raise HTTPException(400, f"k={k} is above this server's limit of {state.config.max_k}")
    t0 = time.perf_counter()
    try:
        hits = rerank_search(state.index, q, k, rerank, space=state.space, config=state.config.rerank,
                             cache=state.diffusion, **({"filter": where} if where else {}))[0]
    except (ValueError, ImportError) as e:
        if isinstance(e, SdkError):  # answered by ERROR_STATUS (DiffusionNotReady: 429 + Retry-After)
            raise
        raise HTTPException(400, str(e)) from None
    if with_metadata:
        hits = state.index.with_metadata([hits])[0]
    took = (time.perf_counter() - t0) * 1000
    return SearchResponse(results=[SearchHit(id=h.id, score=h.score, metadata=h.metadata) for h in hits],
                          took_ms=round(took, 3), space=state.space, rerank=rerank)


async def _json_body(request: Request, model: type[BaseModel]):
    """The request's JSON body as `model`; read only now, after the API key was checked (the routes take
    no body parameter, so FastAPI does not read the body before their dependencies run)."""
    body = await request.body()

    def parse():  # in a worker thread: a large body must not stall the event loop (and /healthz)
        try:
            return model.model_validate(parse_json(body, "request body"))
        except ValidationError as e:  # answered like every other invalid body (_invalid_request)
            raise RequestValidationError(e.errors()) from None

    return await run_in_threadpool(parse)


def _request_body(schemas: dict[str, str]) -> dict:
    return {"requestBody": {"required": True, "content": {
        ctype: {"schema": {"$ref": f"#/components/schemas/{name}"}} for ctype, name in schemas.items()}}}


@router.post("/v1/search", response_model=SearchResponse, dependencies=[READ], tags=["search"],
             responses={400: _ERROR, 401: _ERROR, 403: _ERROR, 409: _ERROR, 413: _ERROR, 429: _ERROR},
             openapi_extra=_request_body({"application/json": "SearchRequest"}))
async def search(request: Request, state: State) -> SearchResponse:
    """Search with a query embedding computed on the device (same embedding space)."""
    req = await _json_body(request, SearchRequest)
    _check_space(state, req.space, "embed the query with the bundle the server uses")
    q = decode_embedding(req.embedding, req.embedding_b64, req.dtype, state.dim)
    return await run_in_threadpool(run_search, state, q, req.k, req.rerank, req.with_metadata, req.filter)


@router.post("/v1/search/image", response_model=SearchResponse, dependencies=[READ], tags=["search"],
             responses={400: _ERROR, 401: _ERROR, 403: _ERROR, 413: _ERROR})
async def search_image(request: Request, state: State) -> SearchResponse:
    """Search with an image; the server embeds it with the query model (for thin clients)."""
    form = await _form(request)
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise HTTPException(400, "send the image as a multipart file field named 'image'")
    data = (await _read_uploads([upload], state.config))[0]
    k = _int_field(form, "k", 10, 1, 100000)
    rerank = str(form.get("rerank", "none"))
    if rerank not in RERANK_METHODS:
        raise HTTPException(400, f"rerank must be one of {', '.join(RERANK_METHODS)}")
    with_metadata = str(form.get("with_metadata", "true")).lower() not in ("false", "0", "no")

    def work():
        q = _embed_images(state, "query" if "query" in state.manifest.models else state.gallery_role, [data])[0]
        return run_search(state, q, k, rerank, with_metadata)

    return await run_in_threadpool(work)


def _uploads(form, config: ServerConfig) -> list:
    """The multipart file fields named 'images' (1 to max_images_per_request of them)."""
    uploads = [u for u in form.getlist("images") if not isinstance(u, str)]
    if not uploads:
        raise HTTPException(400, "send one or more multipart file fields named 'images'")
    if len(uploads) > config.max_images_per_request:
        raise HTTPException(413, f"at most {config.max_images_per_request} images per request")
    return uploads


@router.post("/v1/embed", response_model=EmbedResponse, dependencies=[WRITE], tags=["search"],
             responses={400: _ERROR, 401: _ERROR, 403: _ERROR, 413: _ERROR})
async def embed(request: Request, state: State) -> EmbedResponse:
    """Embed images with the bundle's gallery model (role=query: its query model) without storing them:
    the server as a black-box teacher for `retrieval-sdk train distill`. Write scope: it spends the
    server's compute like an upload does."""
    form = await _form(request)
    role = str(form.get("role", state.gallery_role))
    if role not in state.manifest.models:
        raise HTTPException(400, f"role must be one of {', '.join(sorted(state.manifest.models))}, got {role!r}")
    blobs = await _read_uploads(_uploads(form, state.config), state.config)
    vectors = await run_in_threadpool(_embed_images, state, role, blobs)
    return EmbedResponse(space=state.space, role=role, dim=int(vectors.shape[1]),
                         embeddings_b64=[base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors])


async def _add_embeddings(request: Request, state: ServerState) -> AddItemsResponse:
    """POST /v1/items with JSON: precomputed gallery embeddings."""
    req = await _json_body(request, AddItemsRequest)
    if len(req.items) > state.config.max_items_per_request:
        raise HTTPException(413, f"at most {state.config.max_items_per_request} items per request")
    _check_space(state, req.space, "embed the gallery with the server's bundle")
    vectors = np.stack([decode_embedding(it.embedding, it.embedding_b64, it.dtype, state.dim) for it in req.items])
    ids = [it.id for it in req.items]
    result = await run_in_threadpool(state.index.add, ids, vectors, space=state.space,
                                     metadata=[it.metadata for it in req.items])
    state.after_write()
    return AddItemsResponse(ids=ids, **result)


async def _add_images(request: Request, state: ServerState) -> AddItemsResponse:
    """POST /v1/items with multipart images: the gallery model embeds them; a thumbnail is kept."""
    config = state.config
    form = await _form(request)
    uploads = _uploads(form, config)
    ids = [str(i) for i in form.getlist("ids")]
    if ids and len(ids) != len(uploads):
        raise HTTPException(400, f"{len(ids)} ids for {len(uploads)} images; send one 'ids' field per image")
    ids = ids or [u.filename or "" for u in uploads]
    metas = _form_metadata(form.get("metadata"), ids)
    blobs = await _read_uploads(uploads, config)

    def work():
        vectors = _embed_images(state, state.gallery_role, blobs)
        thumbs = [thumbnail_jpeg(b, config.thumbnail_size) for b in blobs]
        result = state.index.add(ids, vectors, space=state.space, metadata=metas, thumbnails=thumbs)
        state.after_write()
        return result

    return AddItemsResponse(ids=ids, **await run_in_threadpool(work))


@router.post("/v1/items", response_model=AddItemsResponse, dependencies=[WRITE], tags=["items"],
             responses={400: _ERROR, 401: _ERROR, 403: _ERROR, 409: _ERROR, 413: _ERROR, 415: _ERROR},
             openapi_extra=_request_body({"application/json": "AddItemsRequest", "multipart/form-data": "AddImagesForm"}))
async def add_items(request: Request, state: State) -> AddItemsResponse:
    """Add or replace items: precomputed gallery embeddings (JSON) or images (multipart; the server
    embeds them with the gallery model and keeps a thumbnail)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        return await _add_embeddings(request, state)
    if ctype == "multipart/form-data":
        return await _add_images(request, state)
    raise HTTPException(415, "send application/json (embeddings) or multipart/form-data (images)")


@router.get("/v1/items/{item_id:path}/thumbnail", dependencies=[READ], tags=["items"],
            response_class=Response, responses={200: {"content": {"image/jpeg": {}}}, 404: _ERROR})
def thumbnail(item_id: str, state: State) -> Response:
    """The JPEG thumbnail kept for an item added as an image."""
    data, mime = state.index.thumbnail(unquote(item_id))
    return Response(data, media_type=mime)


@router.get("/v1/items/{item_id:path}", response_model=ItemResponse, dependencies=[READ], tags=["items"],
            responses={404: _ERROR})
def get_item(item_id: str, state: State) -> ItemResponse:
    """An item's metadata (the id is one percent-encoded path segment; see sdk/server_asgi.py)."""
    return ItemResponse(**state.index.get(unquote(item_id)))


@router.delete("/v1/items/{item_id:path}", response_model=DeleteResponse, dependencies=[WRITE], tags=["items"],
               responses={404: _ERROR})
def delete_item(item_id: str, state: State) -> DeleteResponse:
    """Delete an item (durable when this returns)."""
    item_id = unquote(item_id)
    state.index.remove([item_id])
    state.after_write()
    return DeleteResponse(deleted=item_id)


class CompactResponse(BaseModel):
    dropped: int
    items: int
    tombstones: int


@router.post("/v1/index/compact", response_model=CompactResponse, dependencies=[WRITE], tags=["service"],
             responses={401: _ERROR, 403: _ERROR})
async def compact(state: State) -> CompactResponse:
    """Drop tombstones (deleted or replaced vectors) now; searches and writes are answered meanwhile."""
    dropped = await run_in_threadpool(state.compact)
    st = state.index.stats()
    return CompactResponse(dropped=dropped, items=st.count, tombstones=st.tombstones)


@router.get("/v1/model", response_model=ModelResponse, dependencies=[READ], tags=["service"])
def model(state: State) -> ModelResponse:
    """The bundle manifest and embedding-space id: clients check theirs against it on connect."""
    st = state.index.stats()
    return ModelResponse(embedding_space=state.space, embedding_dim=state.dim, manifest=state.manifest.to_dict(),
                         gallery_model=state.gallery_role,
                         index={"items": st.count, "factory": st.factory, "tombstones": st.tombstones,
                                "trained": st.trained})


@router.get("/healthz", response_model=Health, tags=["service"])
def healthz(state: State) -> Health:
    return Health(status="ok", items=len(state.index))


@router.get("/metrics", response_class=PlainTextResponse, tags=["service"])
def metrics(state: State) -> PlainTextResponse:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _invalid_request(request, exc):
    # One line, and never echo the input (it may hold NaN, which JSON cannot carry).
    errors = [(".".join(str(p) for p in e.get("loc", ()) if p != "body"), e.get("msg", "invalid"))
              for e in exc.errors()[:3]]
    parts = [f"{where}: {msg}" if where else str(msg) for where, msg in errors]
    return JSONResponse({"detail": "invalid request: " + "; ".join(parts)}, status_code=422)


def _status_handler(status: int):
    async def handle(request, exc):
        retry = getattr(exc, "retry_after", None)
        headers = {"Retry-After": str(int(retry))} if retry else None
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

    return handle


# The runtime's errors as HTTP answers (a more specific class first); anything else is a 500.
ERROR_STATUS = {SpaceMismatchError: 409, UnknownIdError: 404, GalleryIndexError: 400, DiffusionNotReady: 429,
                SdkError: 400}


# ------------------------------------------------------------------------------------------------ the app
def create_app(config: ServerConfig, state: ServerState | None = None) -> FastAPI:
    """The FastAPI app; opens (or creates) the index now, so a bad bundle or index fails here."""
    state = state or ServerState(config)

    @asynccontextmanager
    async def lifespan(app):
        yield
        state.close()

    app = FastAPI(title="retrieval-sdk gallery service", version=__version__, lifespan=lifespan,
                  description="Asymmetric image retrieval: query embeddings from the phone, gallery in the cloud.")
    app.state.retrieval = state
    app.add_exception_handler(RequestValidationError, _invalid_request)
    for error, status in ERROR_STATUS.items():
        app.add_exception_handler(error, _status_handler(status))
    app.include_router(router)
    for prefix, folder in config.static.items():
        mount_static(app, folder, prefix)
    _add_form_schema(app)
    app.add_middleware(ServiceMiddleware, max_body=config.max_body_bytes, body_timeout=config.body_timeout_s,
                       metrics=state.metrics)
    return app


def mount_static(app: FastAPI, folder: str | Path, prefix: str = "/demo") -> None:
    """Serve a static folder (e.g. the mobile web demo) under `prefix`, with index.html at its root."""
    from starlette.staticfiles import StaticFiles

    folder = Path(folder)
    if not folder.is_dir():
        raise SdkError(f"static folder {folder} does not exist")
    app.mount(prefix.rstrip("/") or "/", StaticFiles(directory=str(folder), html=True), name=f"static:{prefix}")


async def _form(request: Request):
    ctype = request.headers.get("content-type", "").lower()
    if not ctype.startswith("multipart/form-data"):
        raise HTTPException(415, "send multipart/form-data")
    try:
        return await request.form(max_files=256, max_fields=1024)
    except HTTPException:
        raise
    except Exception as e:  # noqa: BLE001  (multipart parser errors)
        raise HTTPException(400, f"malformed multipart body ({e.__class__.__name__})") from None


def _int_field(form, name: str, default: int, lo: int, hi: int) -> int:
    value = form.get(name)
    if value is None:
        return default
    try:
        n = int(str(value))
    except ValueError:
        raise HTTPException(400, f"form field '{name}' must be an integer") from None
    if not lo <= n <= hi:
        raise HTTPException(400, f"form field '{name}' must be between {lo} and {hi}")
    return n


def _form_metadata(raw, ids: list[str]) -> list[dict | None]:
    """'metadata' form field: a JSON list (one per image) or object {id: metadata}."""
    if raw is None or isinstance(raw, str) and not raw.strip():
        return [None] * len(ids)
    if not isinstance(raw, str):
        raise HTTPException(400, "the 'metadata' field must be a JSON string")
    value = parse_json(raw, "the 'metadata' field")
    if isinstance(value, list) and len(value) == len(ids) and all(v is None or isinstance(v, dict) for v in value):
        return value
    if isinstance(value, dict) and all(isinstance(v, dict) or v is None for v in value.values()):
        return [value.get(i) for i in ids]
    raise HTTPException(400, "'metadata' must be a JSON list with one object per image, or {id: object}")


def _add_form_schema(app: FastAPI) -> None:
    """Put the JSON and multipart bodies of POST /v1/items into the OpenAPI components."""
    base = app.openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = base()
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (AddItemsRequest, SearchRequest):
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            comps.update(body.pop("$defs", {}))
            comps[model.__name__] = body
        comps["AddImagesForm"] = {
            "type": "object", "required": ["images"],
            "properties": {
                "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                "ids": {"type": "array", "items": {"type": "string"}},
                "metadata": {"type": "string", "description": "JSON list (one object per image) or {id: object}"},
            }}
        path = schema["paths"]["/v1/search/image"]["post"]
        path["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["image"],
            "properties": {"image": {"type": "string", "format": "binary"},
                           "k": {"type": "integer", "minimum": 1, "default": 10},
                           "rerank": {"type": "string", "enum": list(RERANK_METHODS)},
                           "with_metadata": {"type": "boolean"}}}}}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
          on_ready=None, ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> None:
    """Run the service with uvicorn (blocking) until SIGINT/SIGTERM; the index is snapshotted on exit.
    The index and bundle are opened first, so a bad one fails before the port is bound. With a
    certificate and key it serves HTTPS (phones only open the camera on a secure origin)."""
    import uvicorn

    app = create_app(config)
    if host not in ("127.0.0.1", "localhost", "::1") and not config.api_keys:
        log.warning("serving on %s without API keys: anyone who can reach it can read and write the gallery", host)
    if on_ready is not None:
        on_ready(app)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, ssl_certfile=ssl_certfile,
                ssl_keyfile=ssl_keyfile)
