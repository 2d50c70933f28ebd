"""Prometheus metrics: requests and latencies per endpoint, time per pipeline stage, batch sizes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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

    def observe_stages(self, endpoint: str, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            self.stage.labels(endpoint, stage).observe(ms / 1000.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
