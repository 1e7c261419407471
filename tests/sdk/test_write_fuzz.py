"""Property test of the write routes: hypothesis posts random JSON bodies, multipart uploads, ids, metadata
and image bytes to POST /v1/items, POST /v1/embed and DELETE /v1/items/{id} of a live server on 127.0.0.1, then checks
that nothing answered 5xx, that every acknowledged item can be fetched, searched and deleted through
sdk.Client, and that the item count is always adds minus deletes. Bounded: a fixed number of examples,
a deadline per example, loopback only."""

from __future__ import annotations

import base64
import io
import json
import os
from datetime import timedelta

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdk.client import Client, ClientError, NotFoundError
from sdk.embedder import Embedder
from sdk.errors import SdkError
from sdk.server import ServerConfig

from .conftest import SPACE, server_in_thread
from .test_server_hardening import ztxt_png

EXAMPLES = int(os.environ.get("RETRIEVAL_SDK_FUZZ_EXAMPLES", "40"))  # raise for a deep run
DIM = 32

# ------------------------------------------------------------------------------------------ strategies
HOSTILE_IDS = ["..", ".", "../../etc/passwd", "a/thumbnail", "a", "%2F", "x" * 600, "", "\ud800", "nul\x00",
               "no-such-sku/../victim-sku", "sp ace?#", "tab\tnew\nline", "/", "//", "ünï/cødé"]
plain_ids = st.text(min_size=1, max_size=24)
ids = st.one_of(plain_ids, plain_ids, st.sampled_from(HOSTILE_IDS), st.text(max_size=600))
leaves = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                   st.sampled_from(["\ud800", "\udfff x"]))
json_values = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=20)
deep = st.integers(min_value=20, max_value=400).map(lambda n: {"d": json.loads("[" * n + "]" * n)})
plain_metadata = st.dictionaries(st.text(max_size=8), st.one_of(st.integers(-1000, 1000), st.text(max_size=10),
                                                                st.lists(st.booleans(), max_size=3)), max_size=3)
metadata = st.one_of(st.none(), plain_metadata, plain_metadata,
                     st.dictionaries(st.text(max_size=8), json_values, max_size=4), deep, json_values)
floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
good_vectors = st.lists(st.floats(min_value=-1, max_value=1, width=32), min_size=DIM, max_size=DIM).filter(
    lambda v: float(np.linalg.norm(v)) > 1e-3)
vectors = st.one_of(
    good_vectors, good_vectors, good_vectors,  # mostly valid, so that writes are acknowledged
    st.lists(floats32, min_size=DIM, max_size=DIM),
    st.lists(floats32, max_size=40),
    st.just([0.0] * DIM),
)


def _png(w: int, h: int, colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, "PNG")
    return buf.getvalue()


good_images = st.builds(_png, st.integers(8, 64), st.integers(8, 64), st.tuples(*[st.integers(0, 255)] * 3))
images = st.one_of(
    good_images, good_images, good_images,
    st.builds(lambda b, cut: _png(32, 32, (1, 2, 3))[:cut] + b, st.binary(max_size=32), st.integers(0, 80)),
    st.binary(max_size=200),
    st.just(ztxt_png()),
)


@st.composite
def json_add(draw):
    n = draw(st.integers(1, 3))
    items = []
    for _ in range(n):
        hostile = draw(st.integers(0, 9)) < 3  # else a well-formed item, so that writes get acknowledged
        item = {"id": draw(ids if hostile else st.one_of(plain_ids, st.sampled_from(HOSTILE_IDS[:6])))}
        v = draw(vectors if hostile else good_vectors)
        if draw(st.booleans()):
            item["embedding"] = v
        else:
            item["embedding_b64"] = base64.b64encode(np.asarray(v, "<f4").tobytes()).decode()
        m = draw(metadata if hostile else st.one_of(st.none(), plain_metadata))
        if m is not None or draw(st.booleans()):
            item["metadata"] = m
        items.append(item)
    body = {"space": draw(st.sampled_from([SPACE] * 9 + ["other-space"])), "items": items}
    try:
        text = json.dumps(body)
    except (ValueError, RecursionError):
        text = "{}"
    if draw(st.integers(0, 19)) == 0:  # a damaged body now and then
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.text(max_size=8))
    return ("json", text.encode("utf-8", "surrogatepass"))


@st.composite
def multipart_add(draw):
    n = draw(st.integers(1, 2))
    hostile = draw(st.integers(0, 9)) < 4
    blobs = [draw(images if hostile else good_images) for _ in range(n)]
    names = [draw(st.one_of(st.sampled_from(HOSTILE_IDS[:4]), st.text(min_size=1, max_size=12))) for _ in range(n)]
    data = {}
    if draw(st.booleans()):
        data["ids"] = [draw(ids) for _ in range(n)]
    meta = draw(st.one_of(st.none(), st.lists(metadata, min_size=n, max_size=n), metadata, st.text(max_size=30),
                          st.just('[{"n": ' + "7" * 4400 + "}]")) if hostile else
                st.one_of(st.none(), st.lists(plain_metadata, min_size=n, max_size=n)))
    if meta is not None:
        try:
            data["metadata"] = meta if isinstance(meta, str) else json.dumps(meta)
        except (ValueError, RecursionError):
            pass
    return ("multipart", blobs, names, data)


raw_bodies = st.one_of(st.binary(max_size=300), st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
                       st.integers(100, 3000).map(lambda n: b'{"space": "test-space", "items": ' + b"[" * n + b"]" * n + b"}"))


# ------------------------------------------------------------------------------------------------ test
@pytest.fixture(scope="module")
def live(tiny_bundle, tmp_path_factory):
    cfg = ServerConfig(bundle=tiny_bundle, index=tmp_path_factory.mktemp("wfuzz") / "index", max_body_bytes=2_000_000,
                       max_image_bytes=500_000, max_k=1000, compact_min_tombstones=20, compact_tombstone_fraction=0.3)
    with server_in_thread(cfg) as (url, _):
        yield url


@pytest.mark.slow
def test_random_writes_never_5xx_and_every_acknowledged_item_round_trips(live, tiny_bundle):
    gallery = Embedder.from_bundle(tiny_bundle, role="gallery", verify=False)
    model: dict[str, np.ndarray] = {}  # acknowledged live items -> their gallery vector
    statuses: list[int] = []
    http = httpx.Client(base_url=live, timeout=30)

    def check(r: httpx.Response) -> None:
        statuses.append(r.status_code)
        assert r.status_code < 500, (r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert r.json()["detail"], r.text[:300]

    @settings(max_examples=EXAMPLES, deadline=timedelta(seconds=20), derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(action=st.one_of(json_add(), json_add(), multipart_add(), raw_bodies.map(lambda b: ("raw", b)),
                            st.tuples(st.just("delete"), ids)), pick=st.data())
    def step(action, pick):
        kind = action[0]
        if kind == "json":
            r = http.post("/v1/items", content=action[1], headers={"content-type": "application/json"})
            check(r)
            if r.status_code == 200:
                body = json.loads(action[1])
                for item in body["items"]:
                    v = (np.asarray(item["embedding"], np.float32) if "embedding" in item else
                         np.frombuffer(base64.b64decode(item["embedding_b64"]), "<f4"))
                    model[item["id"]] = v / np.linalg.norm(v)
        elif kind == "multipart":
            _, blobs, names, data = action
            files = [("images", (name, blob, "application/octet-stream")) for name, blob in zip(names, blobs)]
            route = pick.draw(st.sampled_from(["/v1/items", "/v1/items", "/v1/embed"]))  # /v1/embed stores nothing
            form = data if route == "/v1/items" else {"role": data.get("ids", ["gallery"])[0]}  # roles: random too
            r = http.post(route, files=files, data=form)
            check(r)
            if r.status_code == 200 and route == "/v1/items":
                for item_id, v in zip(r.json()["ids"], gallery.embed(blobs)):
                    model[item_id] = v
        elif kind == "raw":
            ctype = pick.draw(st.sampled_from(["application/json", "multipart/form-data; boundary=xyz",
                                               "multipart/form-data", "text/plain"]))
            check(http.post("/v1/items", content=action[1], headers={"content-type": ctype}))
        else:
            item_id = pick.draw(st.sampled_from(sorted(model))) if model and pick.draw(st.booleans()) else action[1]
            with Client(live, retries=0, check_space=False) as c:
                try:
                    c.delete(item_id)
                    model.pop(item_id)
                except NotFoundError:
                    assert item_id not in model
                except ClientError as e:
                    assert e.status is not None and e.status < 500, e
                except SdkError as e:  # an id the client cannot send (a lone surrogate)
                    assert "surrogate" in str(e), e
        assert http.get("/healthz").json()["items"] == len(model)  # adds minus deletes

    step()
    assert 200 in statuses and any(400 <= s < 500 for s in statuses)
    assert statuses.count(200) >= 3, "too few writes were acknowledged: the strategies made mostly invalid requests"
    with Client(live, retries=0) as c:
        for item_id, v in sorted(model.items()):
            assert c.get(item_id)["id"] == item_id
            assert item_id in c.search_vector(v, k=len(model)).ids, item_id
        for item_id in sorted(model):
            c.delete(item_id)
        assert c.health()["items"] == 0
    http.close()
