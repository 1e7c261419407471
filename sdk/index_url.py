"""Gallery indexes chosen by URL: one front door, `open_index(url, ...)`, for every vector backend.

  faiss:///path/to/folder  (or a plain path)      the embedded default: GalleryIndex (sdk/index.py)
  postgresql://user@host/db?collection=NAME       pgvector HNSW (sdk/index_pgvector.py); `host=/dir` for a socket
  qdrant://host:6333/collection                   a Qdrant server (sdk/index_qdrant.py)
  qdrant+local:///path/to/folder/collection       qdrant-client's local mode (a brute-force stand-in, tests)

Every backend has GalleryIndex's public surface (add / remove / update_metadata / search with per-call
parameters and metadata filters / get / thumbnail / stats / close) and the same checks: the
embedding-space id and dim are stored with the collection and checked on open, add and search; an
acknowledged write is durable. HNSW knobs travel as URL query parameters (m, ef_construction, ef_search).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sdk.errors import GalleryIndexError

SCHEMES = ("faiss", "postgresql", "postgres", "qdrant", "qdrant+local")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
COLLECTION_RE = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")


class UnknownSchemeError(GalleryIndexError):
    """An index URL whose scheme no backend serves."""


class BackendUnavailableError(GalleryIndexError):
    """The database or vector engine behind an index URL cannot be reached (or its client is not installed)."""


@dataclass(frozen=True)
class HnswConfig:
    """HNSW knobs of a database backend (URL query parameters): graph degree, build and search breadth."""

    m: int = 16
    ef_construction: int = 100
    ef_search: int = 128


def url_scheme(url: str | Path) -> str:
    """'faiss' for a plain path, else the URL's scheme (UnknownSchemeError for one no backend serves)."""
    m = _SCHEME_RE.match(str(url))
    if m is None:
        return "faiss"
    scheme = m.group(1).lower()
    if scheme not in SCHEMES:
        raise UnknownSchemeError(f"index URL scheme {scheme!r} is not supported; use faiss:///PATH (or a folder), "
                                 "postgresql://... (pgvector), qdrant://HOST:PORT/COLLECTION or "
                                 "qdrant+local:///PATH/COLLECTION")
    return scheme


def split_options(url: str, names: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """(the URL without the query parameters in `names`, those parameters)."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    ours, rest = {k: v for k, v in pairs if k in names}, [(k, v) for k, v in pairs if k not in names]
    return urlunsplit(parts._replace(query=urlencode(rest))), ours


def hnsw_config(options: dict[str, str]) -> HnswConfig:
    """HnswConfig from URL query parameters; one-line error for a non-integer or non-positive value."""
    values = {}
    for f in fields(HnswConfig):
        if f.name in options:
            try:
                values[f.name] = int(options[f.name])
                assert values[f.name] > 0
            except (ValueError, AssertionError):
                raise GalleryIndexError(f"index URL parameter {f.name}={options[f.name]!r} must be a positive "
                                        "integer") from None
    return HnswConfig(**values)


def check_collection(name: str, url: str) -> str:
    if not COLLECTION_RE.match(name):
        raise GalleryIndexError(f"collection name {name!r} in {redact(url)} must be 1-48 lowercase letters, "
                                "digits or '_' (not starting with a digit)")
    return name


def redact(url: str) -> str:
    """The URL with any password replaced by '***' (for messages and logs)."""
    parts = urlsplit(str(url))
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return str(url)


def faiss_path(url: str | Path) -> Path:
    text = str(url)
    return Path(urlsplit(text).path) if text.lower().startswith("faiss://") else Path(text)


def index_exists(url: str | Path) -> bool:
    """Whether an index (or collection) is already at `url`."""
    scheme = url_scheme(url)
    if scheme == "faiss":
        from sdk.index_store import DB_NAME

        return (faiss_path(url) / DB_NAME).exists()
    return _backend(scheme).exists(str(url))


def open_index(url: str | Path, *, dim: int | None = None, space: str | None = None, config=None,
               create: bool = False, read_only: bool = False):
    """Open the index at `url`; with `create`, make it (dim, space and config needed) when absent.

    An existing index keeps its own space and dim: when `dim`/`space` are given and differ, the error
    says so and nothing is written. `config` is a faiss IndexConfig or factory string (faiss only).
    """
    scheme = url_scheme(url)
    if scheme != "faiss" and config is not None:
        raise GalleryIndexError(f"a faiss config ({getattr(config, 'factory', config)!r}) does not apply to "
                                f"{scheme}:// indexes; set m, ef_construction and ef_search as URL parameters")
    exists = index_exists(url)
    if scheme == "faiss":
        from sdk.index import GalleryIndex, IndexConfig

        path = faiss_path(url)
        if exists or not create:  # GalleryIndex.open says what is missing
            index = GalleryIndex.open(path, read_only=read_only)
        else:
            cfg = config if isinstance(config, IndexConfig) else IndexConfig(factory=config or "Flat")
            index = GalleryIndex.create(path, dim, space, cfg)
    else:
        if not exists and not create:
            raise GalleryIndexError(f"no index at {redact(str(url))}; create one with "
                                    "`retrieval-sdk index build BUNDLE IMAGES --index URL`")
        backend = _backend(scheme)
        index = backend.open_collection(str(url)) if exists else backend.create_collection(str(url), dim, space)
    if (space is not None and index.space != space) or (dim is not None and index.dim != dim):
        index.close()
        raise GalleryIndexError(f"index {redact(str(url))} holds {index.dim}-d vectors of space {index.space!r}, "
                                f"but the bundle is {dim}-d space {space!r}; serve it with the bundle it was built "
                                "with (or use another index URL); nothing was written")
    return index


def _backend(scheme: str):
    """The module implementing a database scheme (imported only when used: its client is an extra)."""
    if scheme in ("postgresql", "postgres"):
        from sdk import index_pgvector as module
    else:
        from sdk import index_qdrant as module
    return module
