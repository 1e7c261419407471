"""The hostile-client probes of issue 15, re-run through a real HTTP server on 127.0.0.1: each gets a 4xx
with a one-line message or a correct 200, and no write can break later reads."""

from __future__ import annotations

import io
import json
import socket
import struct
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from sdk.client import Client, NotFoundError, ServerUnavailableError
from sdk.server import ServerConfig

from .conftest import SPACE, server_in_thread, unit

READ, WRITE = "read-key-0001", "write-key-0002"
KEYS = {READ: frozenset({"read"}), WRITE: frozenset({"read", "write"})}
R, W = {"X-API-Key": READ}, {"X-API-Key": WRITE}


@pytest.fixture()
def served(tiny_bundle, tmp_path):
    cfg = ServerConfig(bundle=tiny_bundle, index=tmp_path / "index", api_keys=KEYS, max_body_bytes=2_000_000,
                       max_image_bytes=400_000, max_image_pixels=4_000_000, max_request_pixels=6_000_000,
                       body_timeout_s=1.5)
    with server_in_thread(cfg) as (url, app):
        with httpx.Client(base_url=url, timeout=30) as http:
            yield url, http, app


def png(size=(40, 30), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def ztxt_png() -> bytes:
    """A valid small PNG with a zTXt chunk after the image data that inflates past Pillow's text limit."""
    data = png((64, 64))
    body = b"Comment\0\0" + zlib.compress(b"A" * (2 * 1024 * 1024))
    chunk = struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))
    end = data.rindex(b"IEND") - 4
    return data[:end] + chunk + data[end:]


def post_json(http, path: str, text: str, headers=W):
    return http.post(path, content=text.encode(), headers={**headers, "content-type": "application/json"})


def item_json(item_id: str, vector: np.ndarray, metadata_json: str = "null") -> str:
    return (f'{{"space": "{SPACE}", "items": [{{"id": {json.dumps(item_id)}, "embedding": {json.dumps(vector.tolist())}, '
            f'"metadata": {metadata_json}}}]}}')


def search(http, vector, k=10):
    return http.post("/v1/search", json={"space": SPACE, "embedding": vector.tolist(), "k": k}, headers=R)


def one_line_4xx(r, status=400) -> str:
    assert r.status_code == status, (r.status_code, r.text[:300])
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and detail
    return detail


# ------------------------------------------------------------------------------ 1. one write poisons reads
def test_metadata_that_cannot_be_served_is_refused_at_write_time(served):
    _, http, app = served
    x = unit(3, 32, seed=3)
    assert post_json(http, "/v1/items", item_json("good", x[0], '{"n": 1}')).status_code == 200
    poison = {
        "deep": "[" * 300 + "]" * 300,  # 255+ levels
        "deep_object": '{"a": ' * 40 + "1" + "}" * 40,
        "surrogate": '{"x": "\\ud800"}',
        "surrogate_key": '{"\\udfff": 1}',
        "nan": '{"x": NaN}',
        "big_int": '{"x": ' + "9" * 30 + "}",
    }
    for name, meta in poison.items():
        body = item_json("victim", x[1], '{"v": ' + meta + "}" if name != "deep_object" else meta)
        detail = one_line_4xx(post_json(http, "/v1/items", body))
        assert "metadata" in detail, (name, detail)
    # multipart metadata is held to the same rules
    r = http.post("/v1/items", files={"images": ("p.png", png())}, data={"ids": ["img"], "metadata": '[{"x": "\\ud800"}]'},
                  headers=W)
    assert "metadata" in one_line_4xx(r)
    assert app.state.retrieval.index.ids() == ["good"]
    # reads still answer
    assert http.get("/v1/items/good", headers=R).json()["metadata"] == {"n": 1}
    hits = search(http, x[0]).json()["results"]
    assert hits[0]["id"] == "good" and hits[0]["metadata"] == {"n": 1}
    # what is within the limits is stored and served back as it was sent
    ok = {"deep": [[[[["x"]]]]], "text": "żółw 🐢", "int": -(2**63), "float": 1.5e300}
    assert post_json(http, "/v1/items", item_json("fine", x[2], json.dumps(ok))).status_code == 200
    assert http.get("/v1/items/fine", headers=R).json()["metadata"] == ok
    assert search(http, x[2]).status_code == 200


def test_ids_that_cannot_be_encoded_are_refused(served):
    _, http, app = served
    r = post_json(http, "/v1/items", item_json("\\ud800", unit(1, 32)[0]).replace('"\\\\ud800"', '"\\ud800"'))
    assert "id" in one_line_4xx(r, 422)  # the request schema refuses it
    assert len(app.state.retrieval.index) == 0


# ------------------------------------------------------------------------------ 2. the client and item ids
WEIRD_IDS = ["..", ".", "../../etc/passwd", "a/thumbnail", "a", "100%", "%2F", "%252F", "sp ace?q=1#frag&x",
             "ünï/cødé", "a//b", "/lead", "trail/", "thumbnail", "x/..", "./y", "\\back\\slash", "tab\tnew\nline"]


def test_every_accepted_id_round_trips_through_the_client(served):
    url, http, app = served
    x = unit(len(WEIRD_IDS) + 1, 32, seed=5)
    with Client(url, api_key=WRITE, retries=0) as c:
        c.add(["victim-sku"], x[-1:])
        with pytest.raises(NotFoundError):
            c.delete("no-such-sku/../victim-sku")
        assert "victim-sku" in app.state.retrieval.index
        images = [png(colour=(10 * i, 100, 200 - 5 * i)) for i in range(len(WEIRD_IDS))]
        c.add(WEIRD_IDS, images=images, metadata=[{"i": i} for i in range(len(WEIRD_IDS))])
        assert set(app.state.retrieval.index.ids()) == set(WEIRD_IDS) | {"victim-sku"}
        for i, item_id in enumerate(WEIRD_IDS):
            got = c.get(item_id)
            assert got["id"] == item_id and got["metadata"] == {"i": i}, item_id
            assert c.thumbnail(item_id)[:2] == b"\xff\xd8", item_id  # its own JPEG thumbnail, not a's
        assert c.get("a/thumbnail")["metadata"] == {"i": WEIRD_IDS.index("a/thumbnail")}
        for item_id in WEIRD_IDS:
            c.delete(item_id)
            with pytest.raises(NotFoundError):
                c.get(item_id)
        assert app.state.retrieval.index.ids() == ["victim-sku"]
    # an upload without ids takes the file name as id; such ids round-trip too
    r = http.post("/v1/items", files=[("images", ("../../etc/passwd", png())), ("images", ("..", png((20, 20))))],
                  headers=W)
    assert r.status_code == 200 and sorted(r.json()["ids"]) == ["..", "../../etc/passwd"]
    with Client(url, api_key=WRITE, retries=0) as c:
        for item_id in ("..", "../../etc/passwd"):
            assert c.get(item_id)["id"] == item_id
            c.delete(item_id)
    # a client that sends raw slashes (older clients, curl) still reaches ids with '/', and the thumbnail
    with Client(url, api_key=WRITE, retries=0) as c:
        c.add(["sub/dir/p.png"], images=[png()])
    assert http.get("/v1/items/sub/dir/p.png", headers=R).json()["id"] == "sub/dir/p.png"
    assert http.get("/v1/items/sub/dir/p.png/thumbnail", headers=R).headers["content-type"] == "image/jpeg"


# ------------------------------------------------------------------------------ 3. no unhandled 500s
def test_hostile_image_json_and_integers_get_400(served):
    _, http, app = served
    bad = ztxt_png()
    assert len(bad) < 65_000
    r = http.post("/v1/search/image", files={"image": ("z.png", bad)}, headers=R)
    assert "cannot read image" in one_line_4xx(r)
    r = http.post("/v1/items", files={"images": ("z.png", bad)}, headers=W)
    assert "cannot read image" in one_line_4xx(r)
    r = post_json(http, "/v1/items", '{"space": "test-space", "items": ' + "[" * 1000 + "]" * 1000 + "}")
    assert "nested" in one_line_4xx(r)
    r = post_json(http, "/v1/search", "[" * 100_000 + "]" * 100_000, headers=R)
    assert "nested" in one_line_4xx(r)
    r = http.post("/v1/items", files={"images": ("p.png", png())},
                  data={"ids": ["p"], "metadata": '[{"n": ' + "7" * 4400 + "}]"}, headers=W)
    assert "digits" in one_line_4xx(r)
    r = post_json(http, "/v1/items", item_json("p", unit(1, 32)[0], '{"n": ' + "7" * 4400 + "}"))
    assert "digits" in one_line_4xx(r)
    assert len(app.state.retrieval.index) == 0


def test_index_build_skips_and_reports_a_hostile_png(tiny_bundle, tmp_path):
    from typer.testing import CliRunner

    from sdk.cli import app

    images = tmp_path / "images"
    images.mkdir()
    (images / "good.png").write_bytes(png())
    (images / "ztxt.png").write_bytes(ztxt_png())
    r = CliRunner().invoke(app, ["index", "build", str(tiny_bundle), str(images), "--index", str(tmp_path / "ix"),
                                 "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "1 added" in r.stdout and "1 unreadable" in r.stdout and "ztxt.png" in r.output


def test_a_bug_answers_500_and_keeps_the_connection(served):
    url, http, app = served
    state = app.state.retrieval
    real = state.index.stats
    with Client(url, api_key=READ, retries=2, backoff=0.01) as c:
        state.index.stats = lambda: 1 / 0  # a bug in one endpoint
        try:
            r = http.get("/v1/model", headers=R)
            assert r.status_code == 500 and r.json()["detail"].startswith("internal server error")
            assert r.headers.get("connection", "").lower() != "close"
            with pytest.raises(ServerUnavailableError, match="answered 500 after 3 attempts: internal server error"):
                c.model()  # the server's answer is reported, not a dropped connection
        finally:
            state.index.stats = real
        assert c.health()["status"] == "ok"  # the pooled connection still works
    assert http.get("/healthz").status_code == 200


# ------------------------------------------------------------------------------ 5. auth first, body timeout
def test_the_key_is_checked_before_the_body_is_read(served):
    _, http, _ = served
    junk = b"{" * 1_500_000  # parsing it would fail (or take long); the missing key must answer first
    for path in ("/v1/search", "/v1/items"):
        r = http.post(path, content=junk, headers={"content-type": "application/json"})
        assert r.status_code == 401, (path, r.text)
    r = http.post("/v1/search", content=junk, headers={**R, "content-type": "application/json"})
    assert r.status_code == 400


def test_a_body_that_never_arrives_gets_408(served):
    url, http, _ = served
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/search HTTP/1.1\r\nhost: x\r\nx-api-key: " + READ.encode() +
                  b"\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n0123456789")
        t0 = time.perf_counter()
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
        waited = time.perf_counter() - t0
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert waited < 5, waited
    assert http.get("/healthz").status_code == 200


# ------------------------------------------------------------------------------ 4. bounded /metrics
def test_metrics_labels_are_bounded_and_standard(served):
    from prometheus_client.parser import text_string_to_metric_families

    _, http, _ = served
    rng = np.random.default_rng(0)
    http.get("/v1/model", headers=R)
    before = len(http.get("/metrics").content)
    for i in range(200):  # unauthenticated: random methods and paths
        method = "".join(chr(c) for c in rng.integers(65, 91, 217))
        http.request(method, f"/random/{i}")
        http.request("GET", f"/v1/items/id-{i}")
    text = http.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}  # the standard exposition format
    assert {"retrieval_requests", "retrieval_request_seconds", "retrieval_index_items"} <= set(families)
    methods = {s.labels["method"] for s in families["retrieval_requests"].samples if "method" in s.labels}
    routes = {s.labels["route"] for s in families["retrieval_requests"].samples if "route" in s.labels}
    assert methods <= {"GET", "POST", "DELETE", "other"} and "other" in methods
    assert routes <= {"/v1/model", "/metrics", "/v1/items/{item_id:path}", "unmatched"}, routes
    assert len(text) < before + 8000, (before, len(text))


# ------------------------------------------------------------------------------ 6. CPU a read key can burn
def test_pixel_budget_per_request(served):
    _, http, app = served
    big = png((2000, 1500))  # 3 MP each: under the 4 MP per-image limit; the budget is 6 MP per request
    r = http.post("/v1/items", files=[("images", (f"b{i}.png", big)) for i in range(3)], headers=W)
    assert "pixels in all" in one_line_4xx(r, 413)
    r = http.post("/v1/items", files=[("images", (f"b{i}.png", big)) for i in range(2)], headers=W)
    assert r.status_code == 200 and r.json()["added"] == 2


def test_diffusion_searches_never_wait_for_a_refit(tiny_bundle, tmp_path):
    from sdk.rerank import RerankConfig

    rerank = RerankConfig(diffusion_refit_interval_s=1.0, diffusion_refit_factor=1.0, diffusion_wait_s=0.0)
    cfg = ServerConfig(bundle=tiny_bundle, index=tmp_path / "index", api_keys=KEYS, rerank=rerank)
    x = unit(3000, 32, seed=11)
    with server_in_thread(cfg) as (url, app):
        cache = app.state.retrieval.diffusion
        with Client(url, api_key=WRITE, retries=5, backoff=0.05) as c:
            c.add([f"d{i}" for i in range(1500)], x[:1500])
            # the first diffusion search starts the fit and is told when to come back (429 + Retry-After)
            r = httpx.post(url + "/v1/search", json={"space": SPACE, "embedding": x[0].tolist(), "rerank": "diffusion"},
                           headers=R, timeout=30)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "aqe" in r.json()["detail"]
            assert c.search_vector(x[0], k=5, rerank="diffusion").ids[0] == "d0"  # the client waits and retries
            fit_s = cache.last_fit_s
            fits_before, t0 = cache.fits, time.perf_counter()
            latencies, deleted = [], set()
            for i in range(1500, 3000, 10):  # writes all the time (4 s): each one makes the model stale
                if time.perf_counter() - t0 > 4.0:
                    break
                c.add([f"d{j}" for j in range(i, i + 10)], x[i:i + 10])
                newest = i + 9
                c.delete(f"d{i - 1400}")
                deleted.add(f"d{i - 1400}")
                s = time.perf_counter()
                hits = c.search_vector(x[i - 1400], k=10, rerank="diffusion")
                latencies.append(time.perf_counter() - s)
                assert deleted.isdisjoint(hits.ids)  # a stale model never returns a deleted item
            elapsed, refits = time.perf_counter() - t0, cache.fits - fits_before
            deadline = time.time() + 60  # the model follows the gallery: a later fit holds the newest item
            while f"d{newest}" not in c.search_vector(x[newest], k=3, rerank="diffusion").ids:
                assert time.time() < deadline, "the diffusion model was never refitted"
                time.sleep(0.2)
    assert refits <= elapsed / max(1.0, fit_s) + 1, (refits, elapsed, fit_s)  # rate-limited
    assert float(np.median(latencies)) < max(0.5 * fit_s, 0.05), (np.median(latencies), fit_s)


# ------------------------------------------------------------------------------ 7. online compaction
def test_compaction_keeps_writes_made_while_it_runs(tmp_path, monkeypatch):
    """Adds, updates and deletes made while the new index is built are all in the compacted index, on
    disk as in memory."""
    import threading

    import sdk.index as index_module
    from sdk.index import GalleryIndex

    x = unit(400, 32, seed=2)
    idx = GalleryIndex.create(tmp_path / "ix", 32, SPACE, "HNSW16")
    idx.add([f"i{j}" for j in range(300)], x[:300], space=SPACE, metadata=[{"j": j} for j in range(300)])
    idx.remove([f"i{j}" for j in range(0, 300, 3)])  # 100 tombstones
    build = index_module.build_faiss_index

    def build_while_writing(*args):
        def writes():  # another thread, while compact() holds no lock
            idx.add([f"n{j}" for j in range(300, 350)], x[300:350], space=SPACE)
            idx.add(["i1"], x[399:400], space=SPACE, metadata=[{"j": "new"}])  # update
            idx.remove(["i2", "n300"])
            hits = idx.search(x[4], 1, space=SPACE)[0]  # searches answer from the old index
            assert hits[0].id == "i4"

        t = threading.Thread(target=writes)
        t.start()
        t.join()
        return build(*args)

    monkeypatch.setattr(index_module, "build_faiss_index", build_while_writing)
    assert idx.compact() == 100
    monkeypatch.setattr(index_module, "build_faiss_index", build)
    expected = ({f"i{j}" for j in range(300) if j % 3} - {"i2"}) | {f"n{j}" for j in range(301, 350)}
    for reopened in (False, True):
        if reopened:
            idx.close()
            idx = GalleryIndex.open(tmp_path / "ix")
        assert set(idx.ids()) == expected
        assert idx.stats().tombstones == 2  # the old vectors of i1 and i2 (n300 came and went: not copied)
        for item_id, row in (("i4", 4), ("i1", 399), ("n349", 349), ("i299", 299)):
            assert idx.search(x[row], 1, space=SPACE)[0][0].id == item_id
        assert idx.get("i1")["metadata"] == {"j": "new"} and idx.get("i5")["metadata"] == {"j": 5}
    assert idx.compact() == 2 and idx.stats().tombstones == 0 and set(idx.ids()) == expected
    idx.close()


def test_background_and_admin_compaction_while_searching(tiny_bundle, tmp_path):
    import threading

    cfg = ServerConfig(bundle=tiny_bundle, index=tmp_path / "index", api_keys=KEYS, compact_min_tombstones=200,
                       compact_tombstone_fraction=0.3)
    x = unit(3000, 32, seed=4)
    with server_in_thread(cfg) as (url, app):
        state = app.state.retrieval
        failures, latencies, stop = [], [], threading.Event()

        def searcher():
            with Client(url, api_key=READ, retries=0) as c:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    hits = c.search_vector(x[2999], k=1)
                    latencies.append(time.perf_counter() - t0)
                    if hits.ids != ["keep"]:
                        failures.append(hits.ids)

        with Client(url, api_key=WRITE, retries=0) as c:
            c.add(["keep"], x[2999:])
            c.add([f"t{j}" for j in range(2000)], x[:2000])
            threads = [threading.Thread(target=searcher) for _ in range(2)]
            for t in threads:
                t.start()
            try:
                for j in range(0, 1100, 100):  # past 30 % tombstones: a compaction starts in the background
                    c.add([f"t{i}" for i in range(j, j + 100)], x[j:j + 100][::-1])  # replaced: tombstones
                deadline = time.time() + 30
                while state.compactions == 0 and time.time() < deadline:
                    time.sleep(0.05)
                assert state.compactions >= 1
                with pytest.raises(Exception, match="'write' scope"):
                    Client(url, api_key=READ, retries=0).compact()
                c.delete("t0")
                r = c.compact()  # the admin endpoint
                assert r["tombstones"] == 0 and r["items"] == 2000 and r["dropped"] >= 1
            finally:
                stop.set()
                for t in threads:
                    t.join()
        assert not failures and len(latencies) > 10


def test_index_compact_against_a_running_server(tiny_bundle, tmp_path):
    import subprocess

    from .conftest import CLI, ROOT, server_process

    env = {"RETRIEVAL_SDK_API_KEYS": f"{WRITE} read,write"}
    with server_process(tiny_bundle, tmp_path / "idx", env=env) as (url, _):
        with Client(url, api_key=WRITE, retries=0) as c:
            c.add([f"v{j}" for j in range(10)], unit(10, 32))
            c.delete("v3")
        run = lambda *a, **kw: subprocess.run([*CLI, "index", "compact", *a], cwd=ROOT, capture_output=True,  # noqa: E731
                                              text=True, timeout=120, **kw)
        held = run(str(tmp_path / "idx"))
        assert held.returncode == 2 and "--server URL" in held.stderr
        done = run("--server", url, env={**__import__("os").environ, "RETRIEVAL_SDK_API_KEY": WRITE})
        assert done.returncode == 0 and "dropped 1 tombstones; 9 items" in done.stdout, done.stderr
        with Client(url, api_key=WRITE) as c:
            assert c.model()["index"]["tombstones"] == 0 and len(c.search_vector(unit(10, 32)[3], k=20)) == 9


def test_searches_do_not_wait_for_a_snapshot_or_a_commit(tmp_path, monkeypatch):
    """Writers hold the index's read/write lock only to mirror a committed change in memory: a search
    is answered while a snapshot is being written (or an fsync is under way)."""
    import threading

    from sdk.index import GalleryIndex
    from sdk.index_store import IndexStore

    x = unit(200, 32, seed=8)
    idx = GalleryIndex.create(tmp_path / "ix", 32, SPACE, "Flat")
    idx.add([f"s{j}" for j in range(100)], x[:100], space=SPACE)
    writing, release = threading.Event(), threading.Event()
    slow_write = IndexStore.write_snapshot

    def write_snapshot(self, index):
        writing.set()
        release.wait(10)
        return slow_write(self, index)

    monkeypatch.setattr(IndexStore, "write_snapshot", write_snapshot)
    saver = threading.Thread(target=idx.save)
    saver.start()
    try:
        assert writing.wait(10)
        t0 = time.perf_counter()
        assert idx.search(x[7], 1, space=SPACE)[0][0].id == "s7"
        assert time.perf_counter() - t0 < 1.0  # not behind the snapshot (held for up to 10 s)
    finally:
        release.set()
        saver.join()
    assert idx.stats().unsaved == 0
    idx.close()
