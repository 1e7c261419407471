"""The HTTP service over real HTTP on 127.0.0.1: endpoints, API-key scopes, limits, clear 4xx errors,
concurrent searches during adds, OpenAPI schema and metrics."""

from __future__ import annotations

import base64
import io
import json
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from sdk.server import ServerConfig, load_api_keys, parse_api_keys

from .conftest import SPACE, server_in_thread, unit

READ, WRITE = "read-key-0001", "write-key-0002"
KEYS = {READ: frozenset({"read"}), WRITE: frozenset({"read", "write"})}


@pytest.fixture()
def server(tiny_bundle, tmp_path):
    cfg = ServerConfig(bundle=tiny_bundle, index=tmp_path / "index", api_keys=KEYS, max_body_bytes=1_000_000,
                       max_image_bytes=400_000, max_image_pixels=4_000_000, max_k=50)
    with server_in_thread(cfg) as (url, app):
        with httpx.Client(base_url=url, timeout=30) as http:
            yield http, app


def png(size=(40, 30), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def b64(x: np.ndarray, dtype=np.float32) -> str:
    return base64.b64encode(np.asarray(x, dtype).tobytes()).decode()


R, W = {"X-API-Key": READ}, {"Authorization": f"Bearer {WRITE}"}


def add_vectors(http, ids, x, meta=None):
    items = [{"id": i, "embedding": v.tolist(), **({"metadata": meta[j]} if meta else {})} for j, (i, v) in
             enumerate(zip(ids, x))]
    return http.post("/v1/items", json={"space": SPACE, "items": items}, headers=W)


def test_vectors_round_trip_in_every_encoding(server):
    http, _ = server
    x = unit(20, 32, seed=1)
    r = add_vectors(http, [f"v{i}" for i in range(20)], x, meta=[{"n": i} for i in range(20)])
    assert r.status_code == 200 and r.json()["added"] == 20
    for body in ({"embedding": x[3].tolist()}, {"embedding_b64": b64(x[3])},
                 {"embedding_b64": b64(np.round(x[3] * 127), np.int8), "dtype": "int8"}):
        r = http.post("/v1/search", json={"space": SPACE, "k": 3, **body}, headers=R)
        assert r.status_code == 200, r.text
        res = r.json()["results"]
        assert res[0]["id"] == "v3" and res[0]["metadata"] == {"n": 3} and res[0]["score"] > 0.99
    for rerank in ("aqe", "alpha_qe", "diffusion"):
        r = http.post("/v1/search", json={"space": SPACE, "k": 3, "rerank": rerank, "embedding": x[5].tolist()},
                      headers=R)
        assert r.status_code == 200 and r.json()["results"][0]["id"] == "v5" and r.json()["rerank"] == rerank
    # replace, get, delete
    assert add_vectors(http, ["v3"], -x[3:4]).json() == {"added": 0, "updated": 1, "ids": ["v3"]}
    assert http.get("/v1/items/v4", headers=R).json()["metadata"] == {"n": 4}
    assert http.delete("/v1/items/v4", headers=W).json() == {"deleted": "v4"}
    assert http.get("/v1/items/v4", headers=R).status_code == 404
    assert http.delete("/v1/items/v4", headers=W).status_code == 404
    r = http.post("/v1/search", json={"space": SPACE, "k": 20, "embedding": x[4].tolist()}, headers=R).json()
    assert "v4" not in [h["id"] for h in r["results"]]


def test_images_thumbnails_and_server_side_query_embedding(server, ukbench_dir):
    http, _ = server
    photos = sorted(ukbench_dir.glob("*.jpg"))[:3]
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
    r = http.post("/v1/items", files=files, data={"ids": ["a/1", "a/2", "a/3"],
                                                  "metadata": json.dumps([{"k": 1}, None, {"k": 3}])}, headers=W)
    assert r.status_code == 200, r.text
    thumb = http.get("/v1/items/a/2/thumbnail", headers=R)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256
    assert http.get("/v1/items/a/1", headers=R).json()["metadata"] == {"k": 1}
    r = http.post("/v1/search/image", files={"image": ("q.jpg", photos[0].read_bytes())}, data={"k": "2"}, headers=R)
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    add_vectors(http, ["vec"], unit(1, 32))
    assert http.get("/v1/items/vec/thumbnail", headers=R).status_code == 404  # added as an embedding


@pytest.mark.parametrize("body,status,match", [
    ({"space": "other-space", "embedding": [0.1] * 32}, 409, "does not match"),
    ({"space": SPACE, "embedding": [0.1] * 31}, 400, "dimension 31"),
    ({"space": SPACE, "embedding_b64": "@@@"}, 400, "not valid base64"),
    ({"space": SPACE, "embedding_b64": base64.b64encode(b"abc").decode()}, 400, "decodes to 3 bytes"),
    ({"space": SPACE, "embedding": [0.0] * 32}, 400, "all-zero"),
    ({"space": SPACE}, 400, "exactly one of"),
    ({"space": SPACE, "embedding": [0.1] * 32, "k": 51}, 400, "limit of 50"),
    ({"space": SPACE, "embedding": [0.1] * 32, "k": 0}, 422, "k"),
    ({"space": SPACE, "embedding": [0.1] * 32, "rerank": "magic"}, 422, "rerank"),
    ({"embedding": [0.1] * 32}, 422, "space"),
])
def test_search_errors_are_clear_4xx(server, body, status, match):
    http, _ = server
    r = http.post("/v1/search", json=body, headers=R)
    assert r.status_code == status and match in r.json()["detail"], r.text


def test_nan_inf_and_bad_json(server):
    http, _ = server
    for token in (b"NaN", b"Infinity", b"-Infinity"):
        body = b'{"space": "test-space", "embedding": [' + token + b',' + b','.join([b"0.1"] * 31) + b']}'
        r = http.post("/v1/search", content=body, headers={**R, "content-type": "application/json"})
        assert r.status_code == 422 and "finite" in r.json()["detail"]
    nan_b64 = b64(np.full(32, np.nan))
    r = http.post("/v1/search", json={"space": SPACE, "embedding_b64": nan_b64}, headers=R)
    assert r.status_code == 400 and "NaN" in r.json()["detail"]
    r = http.post("/v1/items", content=b"{not json", headers={**W, "content-type": "application/json"})
    assert r.status_code == 400
    r = http.post("/v1/items", json={"space": SPACE, "items": [{"id": "x", "embedding": [1e39] * 32}]}, headers=W)
    assert r.status_code in (400, 422)


def test_item_errors_leave_the_index_unchanged(server):
    http, app = server
    index = app.state.retrieval.index
    add_vectors(http, ["keep"], unit(1, 32))
    bad = [
        ({"space": "other-space", "items": [{"id": "a", "embedding": [0.1] * 32}]}, 409),
        ({"space": SPACE, "items": [{"id": "a", "embedding": [0.1] * 32}, {"id": "b", "embedding": [0.1] * 3}]}, 400),
        ({"space": SPACE, "items": [{"id": "a", "embedding": [0.1] * 32, "metadata": "str"}]}, 422),
        ({"space": SPACE, "items": []}, 422),
        ({"space": SPACE, "items": [{"id": "", "embedding": [0.1] * 32}]}, 422),
        ({"space": SPACE, "items": [{"id": "a", "embedding": [0.1] * 32}, {"id": "a", "embedding": [0.2] * 32}]}, 400),
    ]
    for body, status in bad:
        r = http.post("/v1/items", json=body, headers=W)
        assert r.status_code == status, (body, r.text)
    assert index.ids() == ["keep"]
    # uploads: not an image, too large in bytes, too many pixels, wrong content type, missing field
    r = http.post("/v1/items", files={"images": ("x.jpg", b"this is text")}, headers=W)
    assert r.status_code == 400 and "not a readable image" in r.json()["detail"]
    r = http.post("/v1/items", files={"images": ("big.bmp", b"BM" + b"\0" * 500_000)}, headers=W)
    assert r.status_code == 413
    r = http.post("/v1/items", files={"images": ("huge.png", png((2100, 2000)))}, headers=W)
    assert r.status_code == 413 and "pixels" in r.json()["detail"]
    r = http.post("/v1/items", content=b"abc", headers={**W, "content-type": "text/plain"})
    assert r.status_code == 415
    r = http.post("/v1/items", files={"other": ("x.png", png())}, headers=W)
    assert r.status_code == 400 and "images" in r.json()["detail"]
    r = http.post("/v1/search/image", files={"image": ("x.png", b"GIF89a broken")}, headers=R)
    assert r.status_code == 400
    r = http.post("/v1/items", files={"images": ("x.png", png())}, data={"ids": ["a", "b"]}, headers=W)
    assert r.status_code == 400 and "ids" in r.json()["detail"]
    assert index.ids() == ["keep"]


def test_request_size_limit(server):
    http, _ = server
    r = http.post("/v1/items", content=b"x" * 1_500_000, headers={**W, "content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["detail"]

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(20):
            yield b"x" * 100_000

    r = http.post("/v1/search", content=chunks(), headers={**R, "content-type": "application/json"})
    assert r.status_code == 413


def test_api_key_scopes(server):
    http, _ = server
    body = {"space": SPACE, "embedding": [0.1] * 32}
    assert http.post("/v1/search", json=body).status_code == 401
    assert http.post("/v1/search", json=body, headers={"X-API-Key": "wrong-key-123"}).status_code == 401
    assert http.post("/v1/search", json=body, headers=R).status_code == 200
    assert http.post("/v1/search", json=body, headers=W).status_code == 200
    r = http.post("/v1/items", json={"space": SPACE, "items": [{"id": "a", "embedding": [0.1] * 32}]}, headers=R)
    assert r.status_code == 403 and "'write' scope" in r.json()["detail"]
    assert http.delete("/v1/items/a", headers=R).status_code == 403
    assert http.get("/v1/model", headers=R).status_code == 200
    assert http.get("/healthz").status_code == 200  # liveness needs no key


def test_model_openapi_metrics(server):
    http, _ = server
    m = http.get("/v1/model", headers=R).json()
    assert m["embedding_space"] == SPACE and m["embedding_dim"] == 32
    assert set(m["manifest"]["models"]) == {"query", "gallery"} and m["index"]["factory"] == "Flat"
    schema = http.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/v1/search", "/v1/search/image", "/v1/items", "/v1/items/{item_id}", "/v1/items/{item_id}/thumbnail",
                 "/v1/model", "/healthz", "/metrics"):
        assert path in paths, path
    assert set(paths["/v1/items"]["post"]["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    http.post("/v1/search", json={"space": SPACE, "embedding": [0.1] * 32}, headers=R)
    text = http.get("/metrics").text
    assert 'retrieval_requests_total{method="POST",route="/v1/search",status="200"}' in text
    assert "retrieval_request_seconds_bucket" in text and "retrieval_index_items 0.0" in text


def test_concurrent_searches_during_adds(server):
    http, _ = server
    x = unit(2000, 32, seed=7)
    add_vectors(http, [f"c{i}" for i in range(100)], x[:100])
    failures, stop = [], threading.Event()

    def searcher():
        with httpx.Client(base_url=str(http.base_url), timeout=30) as h:
            while not stop.is_set():
                r = h.post("/v1/search", json={"space": SPACE, "k": 5, "embedding_b64": b64(x[0])}, headers=R)
                if r.status_code != 200 or r.json()["results"][0]["id"] != "c0":
                    failures.append(r.text)

    threads = [threading.Thread(target=searcher) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for s in range(100, 2000, 100):
            assert add_vectors(http, [f"c{i}" for i in range(s, s + 100)], x[s:s + 100]).status_code == 200
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures
    assert http.get("/healthz").json()["items"] == 2000


def test_api_keys_file_and_env(tmp_path, monkeypatch):
    f = tmp_path / "keys"
    f.write_text("# comment\nreader-000001 read\nwriter-000002 read, write\n")
    monkeypatch.setenv("RETRIEVAL_SDK_API_KEYS", "envkey-00003 write")
    keys = load_api_keys(f)
    assert keys == {"reader-000001": {"read"}, "writer-000002": {"read", "write"}, "envkey-00003": {"write"}}
    assert parse_api_keys('{"jsonkey-0001": ["read"]}') == {"jsonkey-0001": {"read"}}
    with pytest.raises(ValueError, match="scopes"):
        parse_api_keys("somekey-0001 admin")
    with pytest.raises(ValueError, match="at least 8"):
        parse_api_keys("short read")
    with pytest.raises(ValueError, match="cannot read"):
        load_api_keys(tmp_path / "missing")


def test_refuses_index_of_another_space(tiny_bundle, other_space_bundle, tmp_path):
    from sdk.index import GalleryIndexError
    from sdk.server import create_app

    create_app(ServerConfig(bundle=tiny_bundle, index=tmp_path / "ix")).state.retrieval.close()
    with pytest.raises(GalleryIndexError, match="serve it with the bundle it was built with"):
        create_app(ServerConfig(bundle=other_space_bundle, index=tmp_path / "ix"))


def test_static_folder_mount(tiny_bundle, tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "index.html").write_text("<h1>demo</h1>")
    cfg = ServerConfig(bundle=tiny_bundle, index=tmp_path / "ix", static={"/demo": tmp_path / "demo"})
    with server_in_thread(cfg) as (url, _):
        assert "demo" in httpx.get(url + "/demo/").text
        assert httpx.get(url + "/healthz").status_code == 200


def test_serve_https_with_a_certificate(tiny_bundle, tmp_path):
    """`serve --ssl-certfile/--ssl-keyfile` serves HTTPS (phones open the camera only on a secure origin);
    a certificate without its key is refused before anything starts."""
    import ssl
    import subprocess

    from .conftest import CLI, ROOT, server_process

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    extra = ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    trust = ssl.create_default_context(cafile=str(cert))
    with server_process(tiny_bundle, tmp_path / "idx", extra, verify=trust) as (url, _):
        assert url.startswith("https://")
        r = httpx.get(url + "/v1/model", verify=trust)
        assert r.status_code == 200 and r.json()["embedding_space"] == SPACE
        with pytest.raises(httpx.TransportError):  # plain HTTP is not answered
            httpx.get(url.replace("https://", "http://") + "/healthz", timeout=2.0)
    bad = subprocess.run([*CLI, "serve", "--bundle", str(tiny_bundle), "--index", str(tmp_path / "idx"),
                          "--ssl-certfile", str(cert)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--ssl-keyfile" in bad.stderr
