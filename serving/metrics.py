"""Prometheus metrics of one app instance: requests by route and status, latency, what is live and how old.

Each app gets its own registry, so several apps in one process (tests) do not collide. With several
uvicorn workers each worker reports its own numbers.
"""

import math
import time
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.live import LiveView
from serving.lookup import UserRecs

# Lookups take about a millisecond; the upper buckets catch database stalls up to the timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServingMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, view: LiveView) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.requests = Counter(
            "overnight_http_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "overnight_http_request_duration_seconds",
            "Time from request to the end of the response, by route template.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.lookups = Counter(
            "overnight_lookups",
            "Users answered, by source: a falling personalized share means coverage dropped.",
            ["source"],
            registry=self.registry,
        )
        self._personalized = self.lookups.labels("personalized")
        self._fallback = self.lookups.labels("fallback")
        Gauge(
            "overnight_live_batch_id",
            "Batch this process serves (0 when none is loaded).",
            registry=self.registry,
        ).set_function(lambda: 0.0 if view.batch is None else float(view.batch.batch_id))
        # +Inf when nothing is loaded, so a freshness alert on this gauge fires rather than going quiet.
        Gauge(
            "overnight_live_batch_age_seconds",
            "Seconds since the served batch was generated (+Inf when none is loaded).",
            registry=self.registry,
        ).set_function(lambda: _age_seconds(view))

    def count_lookups(self, results: Iterable[UserRecs]) -> None:
        personalized = fallback = 0
        for recs in results:
            if recs.source == "personalized":
                personalized += 1
            else:
                fallback += 1
        if personalized:
            self._personalized.inc(personalized)
        if fallback:
            self._fallback.inc(fallback)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _age_seconds(view: LiveView) -> float:
    batch = view.batch
    return math.inf if batch is None else time.time() - batch.generated_at.timestamp()


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (never the raw path: user ids
    would make a series per user)."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.requests.labels(template, method, str(status)).inc()
            self.metrics.latency.labels(template, method).observe(time.perf_counter() - start)
