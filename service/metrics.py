"""Prometheus metrics: requests and latencies per route template, time per pipeline stage, batch sizes,
index reloads, queue depths; and the ASGI middleware that counts every request, refused ones included."""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import BaseRoute, Match

from .gate import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UNMATCHED = "unmatched"  # any path no route matches: one label, so random paths cannot grow the series


class Metrics:
    """One registry per app, so several apps (tests) never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("alignsearch_requests", "HTTP requests", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("alignsearch_request_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stage = Histogram("alignsearch_stage_seconds", "time per search stage", ["endpoint", "stage"],
                               buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("alignsearch_batch_size", "queries encoded per forward pass", ["kind"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.write_group = Histogram("alignsearch_write_group_size", "uploads committed by one index update",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.reloads = Counter("alignsearch_index_reloads", "new index versions swapped in", registry=self.registry)
        self.waiting = Gauge("alignsearch_queue_waiting", "search requests waiting for a batch, per lane", ["lane"],
                             registry=self.registry)
        self.decoding = Gauge("alignsearch_decodes_busy", "image decodes running or waiting for the decode pool",
                              registry=self.registry)
        self.decode_kills = Gauge("alignsearch_decode_processes_killed", "decode processes killed at their time "
                                  "limit (or found dead) since the start", registry=self.registry)
        self.decode_overrun = Gauge("alignsearch_decode_kill_overrun_seconds_max", "the longest time from a decode's "
                                    "time limit until its killed process was gone", registry=self.registry)
        self.decode_idle = Gauge("alignsearch_decode_processes_idle", "decode processes started and waiting for an "
                                 "upload", registry=self.registry)

    def observe_stages(self, endpoint: str, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            self.stage.labels(endpoint, stage).observe(ms / 1000.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def route_template(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The template of the first of ``routes`` that ``scope`` matches (``/images/{image_id:path}``, ``/docs``,
    ``/static``), or ``unmatched``. Matched here, not read from routing, so requests refused before routing
    (by the gate) are counted under their route too."""
    for route in routes:
        if route.matches(scope)[0] != Match.NONE:
            return getattr(route, "path", UNMATCHED)
    return UNMATCHED


class RequestMetrics:
    """ASGI middleware (outermost): counts each request by route template and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        endpoint = route_template(self.routes, scope)  # before routing, which rewrites the scope's paths
        status = 500

        async def recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
