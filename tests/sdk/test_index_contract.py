"""One contract for every vector backend chosen by URL (faiss, pgvector on a real PostgreSQL, Qdrant local
mode; a Qdrant server too when QDRANT_URL is set): ids, filters, add/update/delete, space and dim checks,
restart durability and bad input, with the same answers from each."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from sdk.cli import app

from sdk.errors import DimensionError, GalleryIndexError, SpaceMismatchError, UnknownIdError
from sdk.index_url import BackendUnavailableError, UnknownSchemeError, open_index

from ..backends import BACKENDS, pg_url
from .conftest import unit

D, S = 16, "space-a"
by_backend = pytest.mark.parametrize("backend_url", BACKENDS, indirect=True)


def ids_of(rows):
    return [[h.id for h in row] for row in rows]


def exact(x: np.ndarray, ids: list[str], q: np.ndarray, k: int) -> list[str]:
    return [ids[j] for j in np.argsort(-(x @ q), kind="stable")[:k]]


@by_backend
def test_ids_search_update_delete_and_restart(backend_url):
    x = unit(60, D, seed=3)
    ids = [f"img/{i:03d}.jpg" for i in range(59)] + ["ünï cødé id"]
    metas = [{"group": f"g{i % 3}", "n": i, "even": i % 2 == 0} for i in range(60)]
    with open_index(backend_url, dim=D, space=S, create=True) as idx:
        assert (idx.dim, idx.space, len(idx)) == (D, S, 0)
        assert idx.add(ids, x, space=S, metadata=metas, thumbnails=[b"jpeg"] + [None] * 59) == {"added": 60, "updated": 0}
        assert len(idx) == 60 and "img/007.jpg" in idx and "nope" not in idx
        rows = idx.search(x[[7, 59]], 5, space=S, ef_search=64)
        assert ids_of(rows) == [exact(x, ids, x[7], 5), exact(x, ids, x[59], 5)]
        assert abs(rows[0][0].score - 1.0) < 1e-4 and rows[0][0].score >= rows[0][1].score
        hit = idx.search(x[12], 1, space=S, with_metadata=True)[0][0]
        assert hit.metadata == metas[12]
        np.testing.assert_allclose(idx.get_vectors(["img/004.jpg", "img/002.jpg"]), x[[4, 2]], atol=1e-6)
        assert idx.thumbnail("img/000.jpg") == (b"jpeg", "image/jpeg")
        with pytest.raises(UnknownIdError, match="no thumbnail"):
            idx.thumbnail("img/001.jpg")
        # update: the id moves to a new vector and metadata, keeps its thumbnail
        assert idx.add(["img/000.jpg", "new"], [-x[1], x[2] + x[3]], space=S, metadata=[{"v": 2}, None]) == \
            {"added": 1, "updated": 1}
        assert idx.search(-x[1], 1, space=S)[0][0].id == "img/000.jpg"
        assert idx.get("img/000.jpg")["metadata"] == {"v": 2} and idx.thumbnail("img/000.jpg")[0] == b"jpeg"
        idx.update_metadata("img/005.jpg", {"group": "g9"})
        assert idx.get("img/005.jpg")["metadata"] == {"group": "g9"}
        # delete: unknown ids raise and delete nothing; missing_ok skips them
        with pytest.raises(UnknownIdError):
            idx.remove(["img/003.jpg", "ghost"])
        assert "img/003.jpg" in idx and len(idx) == 61
        assert idx.remove(["img/003.jpg", "ghost"], missing_ok=True) == 1
        assert "img/003.jpg" not in idx and len(idx) == 60
        assert "img/003.jpg" not in ids_of(idx.search(x[3], 10, space=S))[0]
        with pytest.raises(UnknownIdError):
            idx.update_metadata("img/003.jpg", {})
    # restart: everything acknowledged is there, with the space and dim it was created with
    with open_index(backend_url) as idx:
        assert (idx.dim, idx.space, len(idx)) == (D, S, 60)
        assert sorted(idx.ids()) == sorted(set(ids + ["new"]) - {"img/003.jpg"})
        assert idx.search(-x[1], 1, space=S)[0][0].id == "img/000.jpg"
        assert idx.get("img/005.jpg")["metadata"] == {"group": "g9"}
        live_ids, live = idx.live_vectors()
        assert len(live_ids) == 60 and live.shape == (60, D) and live.dtype == np.float32


@by_backend
def test_metadata_filters(backend_url):
    x = unit(40, D, seed=4)
    ids = [f"i{j}" for j in range(40)]
    metas = [{"color": ["red", "green", "blue", "red"][j % 4], "n": j % 5, "ok": j % 2 == 0} for j in range(38)]
    metas += [{"n": "1", "ok": 1}, None]  # type-exact: "1" is not 1, 1 is not true
    with open_index(backend_url, dim=D, space=S, create=True) as idx:
        idx.add(ids, x, space=S, metadata=metas)
        q = x[0]
        red = [i for i, m in zip(ids, metas) if m and m.get("color") == "red"]
        got = ids_of(idx.search(q, 5, space=S, filter={"color": "red"}))[0]
        assert got == exact(x[[ids.index(i) for i in red]], red, q, 5)
        both = ids_of(idx.search(q, 40, space=S, filter={"color": ["red", "blue"], "n": 1}))[0]
        assert sorted(both) == sorted(i for i, m in zip(ids, metas) if m and m.get("color") in ("red", "blue")
                                      and m.get("n") == 1)
        assert ids_of(idx.search(q, 40, space=S, filter={"ok": True}))[0] == \
            exact(x[0:38:2], ids[0:38:2], q, 40)
        assert "i38" not in ids_of(idx.search(q, 40, space=S, filter={"n": 1}))[0]
        assert ids_of(idx.search(q, 5, space=S, filter={"n": "1"}))[0] == ["i38"]
        assert ids_of(idx.search(q, 5, space=S, filter={"color": "purple"})) == [[]]
        assert len(idx.search(q, 5, space=S, filter={})[0]) == 5
        for bad in ({"a.b": 1}, {"x": 1.5}, {"x": []}, {"x": {"y": 1}}, ["x"]):
            with pytest.raises(GalleryIndexError, match="filter"):
                idx.search(q, 5, space=S, filter=bad)


@by_backend
def test_space_dim_and_bad_input_change_nothing(backend_url):
    x = unit(5, D, seed=5)
    with open_index(backend_url, dim=D, space=S, create=True) as idx:
        idx.add(["a", "b"], x[:2], space=S)
        with pytest.raises(SpaceMismatchError):
            idx.add(["c"], x[2], space="space-b")
        with pytest.raises(SpaceMismatchError):
            idx.search(x[0], 1, space="space-b")
        bad_adds = [(["c"], x[:1, :8], DimensionError), (["c"], np.full((1, D), np.nan), GalleryIndexError),
                    (["c"], np.zeros((1, D)), GalleryIndexError), (["c", "c"], x[:2], GalleryIndexError),
                    ([""], x[:1], GalleryIndexError), (["c", "d"], x[:1], GalleryIndexError)]
        for ids, vecs, err in bad_adds:
            with pytest.raises(err):
                idx.add(ids, vecs, space=S)
        with pytest.raises(GalleryIndexError, match="metadata"):
            idx.add(["c"], x[2], space=S, metadata=[{"x": float("nan")}])
        with pytest.raises(GalleryIndexError, match="k must"):
            idx.search(x[0], 0, space=S)
        assert len(idx) == 2 and "c" not in idx
    # an existing collection of another space or dim is refused on open, and nothing is written to it
    for dim, space in ((D, "space-b"), (D + 1, S)):
        with pytest.raises(GalleryIndexError, match="holds 16-d vectors of space 'space-a'"):
            open_index(backend_url, dim=dim, space=space, create=True)
    with open_index(backend_url) as idx:
        assert len(idx) == 2 and sorted(idx.ids()) == ["a", "b"]


def test_recreated_collection_is_never_written(postgres_uri, tmp_path):
    """A replica holding a collection that was dropped and re-created with another space writes nothing."""
    for url in (pg_url(postgres_uri), f"qdrant+local://{tmp_path / 'q'}/recreated"):
        first = open_index(url, dim=D, space=S, create=True)
        first.add(["a"], unit(1, D), space=S)
        if url.startswith("postgresql"):
            import psycopg

            with psycopg.connect(postgres_uri, autocommit=True) as conn:
                conn.execute("UPDATE rsdk_collections SET space = 'space-b' WHERE name = %s", (first.name,))
        else:
            from sdk.index_qdrant import CATALOGUE, point_id

            first._call("set_payload", CATALOGUE, {"space": "space-b"}, points=[point_id(first.name)], wait=True)
        with pytest.raises(GalleryIndexError, match="nothing was written"):
            first.add(["b"], unit(1, D, seed=1), space=S)
        assert len(first) == 1 and "b" not in first
        first.close()


def test_bad_urls_give_one_line_errors(tmp_path):
    cases = [("mysql://localhost/db", UnknownSchemeError, "not supported"),
             ("postgresql://nobody@127.0.0.1:1/db?collection=g", BackendUnavailableError, "cannot connect to PostgreSQL"),
             ("postgresql://u:secret@127.0.0.1:1/db", BackendUnavailableError, r"u:\*\*\*@"),
             ("qdrant://127.0.0.1:1/gallery", BackendUnavailableError, "cannot reach Qdrant"),
             ("postgresql://u@127.0.0.1:1/db?collection=Bad-Name", GalleryIndexError, "collection name"),
             ("postgresql://u@127.0.0.1:1/db?m=x", GalleryIndexError, "m='x' must be a positive integer"),
             (f"faiss://{tmp_path / 'none'}", GalleryIndexError, "no index at")]
    for url, err, match in cases:
        with pytest.raises(err, match=match) as info:
            open_index(url)
        assert "\n" not in str(info.value) and "secret" not in str(info.value)
    for url in ("mysql://localhost/db", "postgresql://u:secret@127.0.0.1:1/db"):
        r = CliRunner().invoke(app, ["index", "info", url])
        assert r.exit_code == 2 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1, r.output
        assert "secret" not in r.output
    with pytest.raises(GalleryIndexError, match="does not apply to postgresql:// indexes"):
        open_index("postgresql://u@127.0.0.1:1/db", dim=D, space=S, config="HNSW32", create=True)
