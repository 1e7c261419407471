"""sdk.Client over real HTTP: on-device embedding + server round trips, typed results, the space check
on connect, auth errors, and retries with backoff on 5xx / connection errors / timeouts."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from sdk import Client, Embedder
from sdk.client import AuthError, ClientError, NotFoundError, SearchResult, ServerUnavailableError, SpaceMismatchError
from sdk.server import ServerConfig

from .conftest import SPACE, free_port, server_in_thread, unit

KEYS = {"reader-key-1": frozenset({"read"}), "writer-key-2": frozenset({"read", "write"})}


@pytest.fixture(scope="module")
def live(tiny_bundle, tmp_path_factory):
    cfg = ServerConfig(bundle=tiny_bundle, index=tmp_path_factory.mktemp("client") / "index", api_keys=KEYS)
    with server_in_thread(cfg) as (url, app):
        yield url


def test_round_trip_embed_on_device_search_in_cloud(live, tiny_bundle, ukbench_dir):
    photos = sorted(ukbench_dir.glob("*.jpg"))[:8]
    with Client(live, bundle=tiny_bundle, api_key="writer-key-2") as c:
        assert c.space == SPACE and c.dim == 32 and c.health()["status"] == "ok"
        res = c.add([p.name for p in photos[:4]], images=photos[:4], metadata=[{"i": i} for i in range(4)])
        assert (res.added, res.updated) == (4, 0)
        gallery = Embedder.from_bundle(tiny_bundle, role="gallery").embed(photos[4:])
        c.add([p.name for p in photos[4:]], gallery)
        # the server embedded the uploaded images with the same gallery model the Embedder runs here
        same = c.search_vector(Embedder.from_bundle(tiny_bundle, role="gallery").embed_one(photos[0]), k=1)
        assert same[0].id == photos[0].name and same[0].score > 0.9999 and same[0].metadata == {"i": 0}
        hits = c.search_vector(gallery[1], k=3)
        assert isinstance(hits, SearchResult) and hits[0].id == photos[5].name and hits[0].score > 0.999
        on_device = c.search_image(photos[2], k=8)
        server_side = c.search_image(photos[2], k=8, on_device=False)
        assert on_device.ids == server_side.ids and len(on_device) == 8
        np.testing.assert_allclose([h.score for h in on_device], [h.score for h in server_side], atol=1e-5)
        assert c.search_image(np.zeros((50, 60, 3), np.uint8), k=2, rerank="aqe").rerank == "aqe"
        assert c.get(photos[1].name)["metadata"] == {"i": 1}
        assert c.thumbnail(photos[1].name)[:2] == b"\xff\xd8"  # a JPEG
        c.delete(photos[1].name)
        with pytest.raises(NotFoundError, match="unknown id"):
            c.delete(photos[1].name)
        with pytest.raises(ValueError, match="dims"):
            c.search_vector(np.ones(5))


def test_space_check_and_auth(live, other_space_bundle, tiny_bundle):
    with pytest.raises(SpaceMismatchError, match="other-space"):
        Client(live, bundle=other_space_bundle, api_key="reader-key-1")
    with pytest.raises(AuthError, match="401"):
        Client(live)
    with Client(live, bundle=tiny_bundle, api_key="reader-key-1") as c:
        with pytest.raises(AuthError, match="write"):
            c.add(["x"], unit(1, 32))
    with Client(live, api_key="reader-key-1") as thin:  # no bundle: no on-device model
        with pytest.raises(ValueError, match="on_device=False"):
            thin.search_image("x.jpg")


class Flaky(BaseHTTPRequestHandler):
    """Answers /v1/model, then 503 for the first `fail` searches, optionally sleeping first."""

    state = {"calls": 0, "fail": 2, "sleep": 0.0, "times": []}

    def log_message(self, *args):
        pass

    def _json(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._json(200, {"embedding_space": SPACE, "embedding_dim": 4})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        st = self.state
        st["calls"] += 1
        st["times"].append(time.monotonic())
        time.sleep(st["sleep"])
        if st["calls"] <= st["fail"]:
            self._json(503, {"detail": "busy"})
        else:
            self._json(200, {"results": [{"id": "a", "score": 0.5}], "took_ms": 0.1, "rerank": "none"})


@pytest.fixture()
def flaky():
    Flaky.state.update(calls=0, fail=2, sleep=0.0, times=[])
    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Flaky)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", Flaky.state
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_retries_with_backoff_on_5xx(flaky):
    url, state = flaky
    with Client(url, retries=3, backoff=0.1) as c:
        res = c.search_vector(np.ones(4), k=1)
    assert res.ids == ["a"] and state["calls"] == 3
    gaps = np.diff(state["times"])
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1  # exponential: ~0.1 then ~0.2 (with jitter in [0.5, 1])
    state.update(calls=0, fail=10, times=[])
    with Client(url, retries=2, backoff=0.01) as c:
        with pytest.raises(ServerUnavailableError, match="503 after 3 attempts"):
            c.search_vector(np.ones(4))
    assert state["calls"] == 3


def test_timeouts_and_connection_errors(flaky):
    url, state = flaky
    state.update(fail=0, sleep=0.5)
    with Client(url, retries=1, backoff=0.01, timeout=0.2) as c:
        with pytest.raises(ServerUnavailableError, match="ReadTimeout"):
            c.search_vector(np.ones(4))
    assert state["calls"] == 2
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailableError, match="is the server running"):
        Client(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.05)
    assert time.monotonic() - t0 >= 0.05


def test_client_error_carries_status(live, tiny_bundle):
    with Client(live, bundle=tiny_bundle, api_key="reader-key-1") as c:
        with pytest.raises(ClientError) as info:
            c.search_vector(np.ones(32), k=0)
        assert info.value.status == 422
