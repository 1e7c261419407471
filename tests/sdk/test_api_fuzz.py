"""Property test of the HTTP API: schemathesis generates requests from the OpenAPI schema (valid and
invalid ones) against a live server on 127.0.0.1; no request may produce a 5xx."""

from __future__ import annotations

import base64
import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from sdk.server import ServerConfig

from .conftest import SPACE, server_in_thread, unit


@pytest.fixture(scope="module")
def live_api(tiny_bundle, tmp_path_factory):
    cfg = ServerConfig(bundle=tiny_bundle, index=tmp_path_factory.mktemp("fuzz") / "index",
                       max_body_bytes=2_000_000, max_image_bytes=500_000)
    with server_in_thread(cfg) as (url, _):
        # some items so searches, gets and deletes have something to find
        items = [{"id": f"item{i}", "embedding_b64": base64.b64encode(v.tobytes()).decode()}
                 for i, v in enumerate(unit(30, 32))]
        assert httpx.post(url + "/v1/items", json={"space": SPACE, "items": items}).status_code == 200
        yield url


@pytest.fixture(scope="module")
def api_schema(live_api):
    return schemathesis.openapi.from_url(live_api + "/openapi.json")


# The operations are listed statically (the schema test below checks they are all of them), so that
# each gets its own test id; schemathesis' pytest plugin does not support this pytest version.
_OPERATIONS = [("POST", "/v1/search"), ("POST", "/v1/search/image"), ("POST", "/v1/items"),
               ("GET", "/v1/items/{item_id}"), ("DELETE", "/v1/items/{item_id}"),
               ("GET", "/v1/items/{item_id}/thumbnail"), ("POST", "/v1/embed"), ("GET", "/v1/model"),
               ("POST", "/v1/index/compact"), ("GET", "/healthz"), ("GET", "/metrics")]


EXAMPLES = int(os.environ.get("RETRIEVAL_SDK_FUZZ_EXAMPLES", "40"))  # per operation and mode; raise for a deep run
_NO_INPUT = {("GET", "/healthz"), ("GET", "/metrics"), ("POST", "/v1/index/compact")}  # nothing to make invalid


@pytest.mark.slow
@pytest.mark.parametrize("method,path,mode", [(m, p, mode) for m, p in _OPERATIONS for mode in ("positive", "negative")
                                              if mode == "positive" or (m, p) not in _NO_INPUT])
def test_no_server_errors(api_schema, live_api, method, path, mode):
    operation = api_schema[path][method]
    strategy = operation.as_strategy(generation_mode=GenerationMode(mode))
    seen = []

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case):
        response = case.call(base_url=live_api, timeout=30)
        seen.append(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])
        assert response.status_code < 500, (method, path, response.status_code, response.text[:300])

    run()
    assert seen and httpx.get(live_api + "/healthz", timeout=10).status_code == 200


def test_schema_lists_every_endpoint(live_api):
    paths = httpx.get(live_api + "/openapi.json").json()["paths"]
    ops = {(m.upper(), p) for p, item in paths.items() for m in item}
    assert ops == set(_OPERATIONS)
