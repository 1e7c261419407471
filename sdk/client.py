"""Python client of the gallery service: embed on the device, search in the cloud.

    with Client("http://127.0.0.1:8000", bundle="bundle/", api_key="...") as c:
        for hit in c.search_image("photo.jpg", k=10):
            print(hit.id, hit.score)

On connect the client reads GET /v1/model and refuses a server whose embedding space differs from
its bundle's. Timeouts, and retries with exponential backoff on connection errors and 5xx answers
(every call is idempotent: adds replace by id). Never imports torch.
"""

from __future__ import annotations

import base64
import io
import json
import random
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdk import __version__
from sdk.embedder import Embedder, ImageInput
from sdk.errors import SdkError, SpaceMismatchError

RETRY_STATUS = (429, 500, 502, 503, 504)  # 429: the server said when to retry (Retry-After)


class ClientError(SdkError, RuntimeError):
    """The server refused a request (4xx), or could not be reached after the retries."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class NotFoundError(ClientError, KeyError):
    """An unknown item id."""

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


class AuthError(ClientError):
    """Missing or invalid API key, or a key without the needed scope."""


class ServerUnavailableError(ClientError):
    """Connection errors, timeouts or 5xx answers outlasted the retries."""


@dataclass(frozen=True)
class SearchHit:
    id: str
    score: float
    metadata: dict | None = None


@dataclass(frozen=True)
class SearchResult:
    """Hits best first; iterable and indexable like a list."""

    hits: list[SearchHit]
    took_ms: float = 0.0
    rerank: str = "none"

    def __iter__(self):
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)

    def __getitem__(self, i):
        return self.hits[i]

    @property
    def ids(self) -> list[str]:
        return [h.id for h in self.hits]


@dataclass(frozen=True)
class AddResult:
    added: int
    updated: int
    ids: list[str] = field(default_factory=list)


class Client(AbstractContextManager):  # `with` returns the object and closes it
    """A connection to a `retrieval-sdk serve` endpoint.

    bundle / embedder: the on-device model (the bundle's query model by default) used by
    `search_image`; without one, `search_image(..., on_device=False)` lets the server embed.
    timeout: seconds per attempt. retries: extra attempts after a connection error or 5xx, waiting
    backoff * 2**attempt (+ jitter, at most max_backoff) between them.
    """

    def __init__(self, url: str, *, bundle: str | Path | None = None, embedder: Embedder | None = None,
                 api_key: str | None = None, backend: str = "onnx", timeout: float = 10.0, retries: int = 3,
                 backoff: float = 0.2, max_backoff: float = 5.0, check_space: bool = True, transport=None):
        import httpx

        if retries < 0 or timeout <= 0:
            raise SdkError("retries must be >= 0 and timeout > 0")
        self.url = url.rstrip("/")
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        headers = {"User-Agent": f"retrieval-sdk-client/{__version__}"}
        if api_key:
            headers["X-API-Key"] = api_key
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers, transport=transport)
        self._httpx = httpx
        self.embedder = embedder if embedder is not None else (
            Embedder.from_bundle(bundle, backend=backend, role="query") if bundle is not None else None)
        self.server_model: dict = {}
        self.space: str | None = None
        self.dim: int | None = None
        try:
            self._connect(check_space)
        except BaseException:
            self._http.close()
            raise

    def _connect(self, check_space: bool) -> None:
        self.server_model = self._request("GET", "/v1/model").json()
        self.space = self.server_model["embedding_space"]
        self.dim = int(self.server_model["embedding_dim"])
        if check_space and self.embedder is not None and self.embedder.space != self.space:
            raise SpaceMismatchError(f"server {self.url} serves embedding space {self.space!r} but the client "
                                     f"bundle is {self.embedder.space!r}: use the bundle the server was built with")

    # --------------------------------------------------------------------------------------- transport
    def _request(self, method: str, path: str, *, idempotent_404: bool = False, **kwargs):
        httpx = self._httpx
        last = answered = None  # the last failure; the last 5xx/429 answer
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                if last is not None and getattr(last, "headers", None) and last.headers.get("retry-after", "").isdigit():
                    delay = min(self.max_backoff, float(last.headers["retry-after"]))
                time.sleep(delay)
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as e:  # connection refused/reset, timeouts
                last = e
                continue
            if response.status_code in RETRY_STATUS:
                last = answered = response
                continue
            if response.status_code == 404 and idempotent_404 and attempt:
                return response  # an earlier attempt did it; its answer was lost
            if response.status_code >= 400:
                raise _error(response)
            return response
        if answered is not None:  # a server answered: report its answer, not a later dropped connection
            last = answered
        if isinstance(last, Exception):
            raise ServerUnavailableError(f"cannot reach {self.url}{path} after {self.retries + 1} attempts "
                                         f"({last.__class__.__name__}: {last}); is the server running?") from None
        raise ServerUnavailableError(f"{self.url}{path} answered {last.status_code} after {self.retries + 1} attempts: "
                                     f"{_detail(last)}", status=last.status_code)

    # ------------------------------------------------------------------------------------------ search
    def search_vector(self, vector, k: int = 10, rerank: str = "none", with_metadata: bool = True,
                      filter: dict | None = None) -> SearchResult:
        """Search with an embedding of the server's space (sent as base64 float32); `filter` keeps only items
        whose metadata has one of the given values per key ({"color": "red", "shop": [1, 2]})."""
        x = np.asarray(vector, dtype=np.float32).reshape(-1)
        if self.dim is not None and x.shape[0] != self.dim:
            raise SdkError(f"embedding has {x.shape[0]} dims; the server's space has {self.dim}")
        body = {"space": self.space, "embedding_b64": _b64(x),
                "dtype": "float32", "k": int(k), "rerank": rerank, "with_metadata": with_metadata}
        if filter:
            body["filter"] = filter
        return _result(self._request("POST", "/v1/search", json=body).json())

    def search_image(self, image: ImageInput, k: int = 10, rerank: str = "none", with_metadata: bool = True,
                     on_device: bool = True) -> SearchResult:
        """Embed an image on this device with the bundle's query model and search (on_device=False:
        upload the image and let the server embed it)."""
        if on_device:
            if self.embedder is None:
                raise SdkError("search_image needs the on-device model: Client(url, bundle=PATH), "
                                 "or pass on_device=False to let the server embed the image")
            return self.search_vector(self.embedder.embed_one(image), k, rerank, with_metadata)
        form = {"k": str(int(k)), "rerank": rerank, "with_metadata": str(with_metadata).lower()}
        return _result(self._request("POST", "/v1/search/image", files={"image": _upload(image)}, data=form).json())

    def embed(self, images: Sequence[ImageInput], role: str = "gallery", batch_size: int = 32) -> np.ndarray:
        """The server's embeddings of `images` (its gallery model by default), nothing stored: (n, d) float32.
        Needs a write-scope key."""
        images = list(images)
        out = []
        for s in range(0, len(images), batch_size):
            files = [("images", _upload(img)) for img in images[s:s + batch_size]]
            r = self._request("POST", "/v1/embed", files=files, data={"role": role}).json()
            out += [np.frombuffer(base64.b64decode(v), dtype="<f4") for v in r["embeddings_b64"]]
        if not out:
            raise SdkError("no images to embed")
        return np.stack(out).astype(np.float32)

    # ------------------------------------------------------------------------------------------- items
    def add(self, ids: Sequence[str] | str, vectors=None, *, images: Sequence[ImageInput] | None = None,
            metadata: Sequence[dict | None] | None = None, batch_size: int = 256) -> AddResult:
        """Add or replace items: gallery embeddings (`vectors`, (n, d)) or `images` the server embeds
        with its gallery model. Sent in batches; each acknowledged batch is durable."""
        ids = [ids] if isinstance(ids, str) else list(ids)
        if (vectors is None) == (images is None):
            raise SdkError("give exactly one of vectors or images")
        if metadata is not None and len(metadata) != len(ids):
            raise SdkError(f"{len(metadata)} metadata entries for {len(ids)} ids")
        answers = []
        if vectors is not None:
            x = np.asarray(vectors, dtype=np.float32)
            x = x[None] if x.ndim == 1 else x
            if x.shape[0] != len(ids):
                raise SdkError(f"{len(ids)} ids but {x.shape[0]} vectors")
            for s in range(0, len(ids), batch_size):
                items = [{"id": ids[j], "embedding_b64": _b64(x[j]),
                          **({"metadata": metadata[j]} if metadata is not None and metadata[j] is not None else {})}
                         for j in range(s, min(s + batch_size, len(ids)))]
                answers.append(self._request("POST", "/v1/items", json={"space": self.space, "items": items}).json())
        else:
            images = list(images)
            if len(images) != len(ids):
                raise SdkError(f"{len(ids)} ids but {len(images)} images")
            step = min(batch_size, 32)
            for s in range(0, len(ids), step):
                chunk = range(s, min(s + step, len(ids)))
                files = [("images", _upload(images[j])) for j in chunk]
                data = {"ids": [ids[j] for j in chunk]}
                if metadata is not None:
                    data["metadata"] = json.dumps([metadata[j] for j in chunk])
                answers.append(self._request("POST", "/v1/items", files=files, data=data).json())
        return AddResult(sum(r["added"] for r in answers), sum(r["updated"] for r in answers), ids)

    def delete(self, item_id: str) -> None:
        """Delete an item; NotFoundError if the server does not know it."""
        self._request("DELETE", f"/v1/items/{_quote(item_id)}", idempotent_404=True)

    def get(self, item_id: str) -> dict:
        return self._request("GET", f"/v1/items/{_quote(item_id)}").json()

    def thumbnail(self, item_id: str) -> bytes:
        return self._request("GET", f"/v1/items/{_quote(item_id)}/thumbnail").content

    def model(self) -> dict:
        return self._request("GET", "/v1/model").json()

    def compact(self) -> dict:
        """Make the server drop its index's tombstones now: {'dropped', 'items', 'tombstones'} (write key)."""
        return self._request("POST", "/v1/index/compact").json()

    def health(self) -> dict:
        return self._request("GET", "/healthz").json()

    # -------------------------------------------------------------------------------------------- misc
    def close(self) -> None:
        self._http.close()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r}, space={self.space!r})"


def _quote(item_id: str) -> str:
    """An id as one opaque path segment: '/' is encoded too, and '.' / '..' as %2E so that no URL
    normalisation can turn the id into a path step (the server reads it back whole; sdk/server_asgi.py)."""
    from urllib.parse import quote

    try:
        segment = quote(item_id, safe="")
    except UnicodeEncodeError:
        raise SdkError(f"item id {item_id[:60]!r} is not valid Unicode (a lone surrogate) and cannot be sent; "
                       "the server never stores such ids") from None
    return {".": "%2E", "..": "%2E%2E"}.get(segment, segment)


def _detail(response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):  # FastAPI validation errors
        detail = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" for d in detail[:3])
    return str(detail or response.text[:200] or response.reason_phrase)


def _error(response) -> SdkError:
    status, detail = response.status_code, _detail(response)
    message = f"{response.request.method} {response.request.url.path} -> {status}: {detail}"
    if status == 409:
        return SpaceMismatchError(message)
    return {401: AuthError, 403: AuthError, 404: NotFoundError}.get(status, ClientError)(message, status=status)


def _result(payload: dict) -> SearchResult:
    return SearchResult([SearchHit(h["id"], float(h["score"]), h.get("metadata")) for h in payload["results"]],
                        float(payload.get("took_ms", 0.0)), payload.get("rerank", "none"))


def _b64(vector: np.ndarray) -> str:
    """A vector as the server reads it: base64 of little-endian float32."""
    return base64.b64encode(vector.astype("<f4").tobytes()).decode()


def _upload(image: ImageInput) -> tuple[str, bytes, str]:
    """(file name, bytes, content type) of a multipart upload: files are sent as they are, PIL/arrays as PNG."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        p = Path(image)
        try:
            return p.name, p.read_bytes(), "application/octet-stream"
        except OSError as e:
            raise SdkError(f"cannot read image {p}: {e.strerror}") from None
    if isinstance(image, bytes):
        return "image", image, "application/octet-stream"
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.convert("RGB").save(buf, "PNG")
        return "image.png", buf.getvalue(), "application/octet-stream"
    raise SdkError(f"unsupported image type {type(image).__name__}")
