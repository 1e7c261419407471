"""The service's ASGI layer under FastAPI: body limits (size and read time), item-id paths read from the
raw URL, Prometheus metrics with bounded labels, and a JSON 500 that keeps the connection open.

Item ids travel as one percent-encoded path segment (sdk.Client quotes with safe=""). Routing on the
decoded path would take an encoded '/' for a separator (`a%2Fthumbnail` would reach a's thumbnail), so
/v1/items/ requests are routed on their raw path (normalised by `item_route_path`); handlers unquote ids.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from urllib.parse import quote, unquote_to_bytes

from fastapi import HTTPException
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("retrieval_sdk.server")

ITEMS_PREFIX = b"/v1/items/"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})  # others are labelled 'other'
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_KEPT_ESCAPES = re.compile(rb"(%2[fF5])")


def item_route_path(raw_path: bytes) -> str:
    """The path to route a /v1/items/... request on: the raw path with %2F and %25 kept and everything
    else re-encoded uniformly (controls, spaces, non-ASCII), so an id stays one segment the route pattern
    matches; handlers `unquote` the id once."""
    parts = _KEPT_ESCAPES.split(raw_path)
    return "".join(p.decode("ascii") if i % 2 else quote(unquote_to_bytes(p), safe="/") for i, p in enumerate(parts))


class Metrics:
    """Request counts and latencies plus index gauges, in the Prometheus exposition format; labels are the
    standard methods, the app's route templates and the status code, so no client can add series."""

    def __init__(self, index_stats: Callable[[], object]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("retrieval_requests", "HTTP requests by method, route and status.",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("retrieval_request_seconds", "Request latency by route.", ["route"],
                                 buckets=BUCKETS, registry=self.registry)
        self.registry.register(_IndexCollector(index_stats))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method if method in METHODS else "other", route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _IndexCollector:
    """Gauges read from the index at scrape time."""

    GAUGES = (("items", "count", "Live items in the gallery index."),
              ("tombstones", "tombstones", "Deleted or replaced vectors awaiting compaction."),
              ("unsaved", "unsaved", "Vectors in the write-ahead log since the last snapshot."))

    def __init__(self, index_stats: Callable[[], object]):
        self.index_stats = index_stats

    def describe(self):
        return [GaugeMetricFamily(f"retrieval_index_{name}", doc) for name, _, doc in self.GAUGES]

    def collect(self):
        st = self.index_stats()
        for name, attr, doc in self.GAUGES:
            yield GaugeMetricFamily(f"retrieval_index_{name}", doc, value=getattr(st, attr))


class _BodyTooLarge(HTTPException):
    """Raised from the receive channel once a streamed body passes the limit (a 413 wherever it surfaces)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than {limit} bytes")


class _BodyTimeout(HTTPException):
    """Raised from the receive channel when the body does not arrive in time (408)."""

    def __init__(self, seconds: float):
        super().__init__(408, f"request body did not arrive within {seconds:g} s; send it whole and promptly")


class ServiceMiddleware:
    """ASGI middleware: 413 for bodies over `max_body` (Content-Length or streamed), 408 for a body that
    takes more than `body_timeout` seconds, item-id routing from the raw path, a JSON 500 for a bug
    (logged with its traceback; the connection stays usable), and every request timed for /metrics."""

    def __init__(self, app, max_body: int, body_timeout: float, metrics: Metrics):
        self.app, self.max_body, self.body_timeout, self.metrics = app, max_body, body_timeout, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        raw = scope.get("raw_path")
        if raw and raw.startswith(ITEMS_PREFIX):
            scope = {**scope, "path": item_route_path(raw)}
        status = {"code": 500, "started": False}
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            # Read and drop a moderately oversized body first, so the client (which sends it all before
            # reading) gets the 413 instead of a reset connection.
            if int(length) <= 4 * self.max_body:
                more = True
                while more:
                    try:
                        message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
                    except asyncio.TimeoutError:
                        break
                    more = message.get("more_body", False) and message["type"] == "http.request"
            return await self._answer(scope, send, start, 413, f"request body is larger than {self.max_body} bytes")
        seen, done = 0, False

        async def limited_receive():
            nonlocal seen, done
            if done:  # after the body: disconnect notices, no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                raise _BodyTimeout(self.body_timeout) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _BodyTooLarge(self.max_body)
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (_BodyTooLarge, _BodyTimeout) as e:
            if status["started"]:
                raise
            return await self._answer(scope, send, start, e.status_code, e.detail)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if status["started"]:
                raise
            return await self._answer(scope, send, start, 500, "internal server error (logged on the server)")
        self.metrics.observe(scope.get("method", ""), _route_name(scope), status["code"], time.perf_counter() - start)

    async def _answer(self, scope, send, start, code: int, detail: str):
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": code,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        self.metrics.observe(scope.get("method", ""), _route_name(scope) if code == 500 else "rejected", code,
                             time.perf_counter() - start)


def _route_name(scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
